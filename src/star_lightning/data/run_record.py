"""The run record ``OUT.jsonl.run.json``: which run made a predictions file, so a resume never mixes two runs.

Written atomically beside the output (every line of the output stays a prediction record, so other tools read it
unchanged). It holds the settings that decide a prediction (:data:`PREDICTION_SETTINGS`) and, for people, what
else the run used. A rerun onto the same output compares its own prediction settings with the record's: equal ->
the requests already written are skipped; different -> refused, naming each difference.

Every ``--model.*`` option is in exactly one of :data:`MODEL_OPTIONS_THAT_DECIDE`, :data:`MODEL_OPTIONS_RESOLVED`
and :data:`MODEL_OPTIONS_THAT_DO_NOT` (a test holds the lists to the module's signature), so a new option is one
line in one list, and cannot be forgotten. Resolved before they are recorded: ``pretrained`` as the model's files
(``model``, a fingerprint: :func:`star_lightning.models.model_fingerprint`) and ``dtype`` for the device (``auto``
is bfloat16 on GPUs, float32 on CPUs). Deciding settings from elsewhere: ``--trainer.precision`` and the request
file's bytes (``requests``). Never deciding: devices, nodes, hosts (``context_parallel_size``, exact for a fixed
block size), ``gpus_per_host``, timeouts, kernels, decode and prefill modes, logging, the profiler, ``--data.limit``
and ``--data.on_too_long`` (they choose which requests run, not what a request predicts). Hosts decide once tokens
pass between them (``passing_tokens``): then ``hosts`` is recorded (the context-parallel size, or the hosts
``simulate_hosts`` plays in one process).

Settings that cannot matter for the chosen method are recorded as null, so changing them resumes: the block sizes
and the anchor for ``ring``/``dense`` (exact attention), ``anchor_block_size`` without the anchor, ``top_p`` and
``seed`` for greedy decoding (``temperature`` 0).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from star_lightning.data.jsonl import write_json_atomic
from star_lightning.errors import ConfigurationError

RECORD_SUFFIX = ".run.json"
FORMAT = 1

# ``--model.*`` options whose value can change what a request predicts.
MODEL_OPTIONS_THAT_DECIDE = (
    "attention",
    "block_size",
    "anchor_block_size",
    "anchor",
    "anchor_query",  # the query in every block's prefix: the blocks are encoded differently
    "anchor_query_positions",
    "passing_tokens",
    "passing_selection",
    "passing_pool_kernel",
    "lookback_tokens",  # the blocks are encoded after more of the context
    "simulate_hosts",  # with passing tokens, the number of hosts decides which tokens pass (see ``hosts``)
    "max_new_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop_strings",
    "trust_remote_code",  # with it, a folder's own code may replace transformers' class for a known model type
)
# ``--model.*`` options that decide too, recorded resolved: ``pretrained`` as the ``model`` fingerprint of its files,
# ``dtype`` as the dtype it means on this device.
MODEL_OPTIONS_RESOLVED = ("pretrained", "dtype")
# ``--model.*`` options that cannot change a prediction: exact reformulations and kernels.
MODEL_OPTIONS_THAT_DO_NOT = (
    "anchor_source",  # where a host gets the anchor's K/V: the same K/V either way
    "ring_layout",  # which chunks a ring host holds: exact attention either way
    "reuse_context",  # a kept context answers exactly as a re-encoded one
    "backend",
    "decode",
    "prefill",  # Phase 1 blocks replayed as CUDA graphs: the same kernels on the same inputs
)
# ``anchor_query_form``: with ``anchor_query``, which text follows the anchor (``question``, ``input_query_stripped``
# or both for a file that mixes them, :mod:`star_lightning.anchor_text`); older runs put the whole ``input_query``
# there and recorded no form, so their records differ from any run with ``anchor_query`` now.
PREDICTION_SETTINGS = (
    *MODEL_OPTIONS_THAT_DECIDE, "model", "dtype", "precision", "requests", "hosts", "anchor_query_form"
)  # fmt: skip
# Settings added after records were first written: absent from an old record reads as null.
_ADDED_LATER = ("anchor_query_form", "lookback_tokens")


def record_path(output: str | os.PathLike[str]) -> Path:
    """``OUT.jsonl`` -> ``OUT.jsonl.run.json``, beside the file the path resolves to (links followed): every name of
    one output has one record."""
    return Path(f"{os.path.realpath(output)}{RECORD_SUFFIX}")


def prediction_settings(
    model_options: Mapping[str, Any],
    *,
    model: str,
    dtype: str,
    precision: str,
    requests: str,
    hosts: int = 1,
    anchor_query_form: str | None = None,
) -> dict[str, Any]:
    """The settings a resume must match, with the values that cannot matter for this method set to None.

    ``hosts``: the hosts of a request (the context-parallel size); they decide a prediction only with passing tokens
    (each host passes its own block's tokens), where the hosts played in one process (``simulate_hosts``) count
    instead."""
    settings = {name: model_options[name] for name in MODEL_OPTIONS_THAT_DECIDE}
    settings.update(model=model, dtype=dtype, precision=str(precision), requests=requests)
    passing = settings["attention"] == "star" and bool(settings["passing_tokens"])
    played = int(settings["simulate_hosts"] if settings["simulate_hosts"] is not None else 1)
    settings["hosts"] = (("one per block" if played == 0 else played) if played != 1 else hosts) if passing else None
    settings["simulate_hosts"] = None
    if not settings["anchor_query"]:
        settings["anchor_query_positions"] = None
    if not passing:
        settings.update(passing_selection=None, passing_pool_kernel=None)
    settings["stop_strings"] = list(settings["stop_strings"] or [])
    if settings["anchor_block_size"] is None:
        settings["anchor_block_size"] = settings["block_size"]
    if not settings["anchor"]:
        settings["anchor_block_size"] = None
    if settings["attention"] != "star":
        settings.update(block_size=None, anchor_block_size=None, anchor=None, anchor_query=None, passing_tokens=None)
    if settings["temperature"] == 0:
        settings.update(top_p=None, seed=None)
    settings["anchor_query_form"] = anchor_query_form if settings["anchor_query"] else None
    # Off (0) is recorded as null, as records written before the option read: their runs resume.
    settings["lookback_tokens"] = (settings["lookback_tokens"] or None) if settings["attention"] == "star" else None
    return settings


def build_record(
    settings: Mapping[str, Any],
    *,
    model_path: str,
    request_file: str,
    run: Mapping[str, Any],
    contexts_file: str | None = None,
) -> dict:
    """The JSON document: prediction settings (compared) and what else the run used (for people)."""
    from star_lightning import __version__

    return {
        "format": FORMAT,
        "written_by": f"star-lightning {__version__}",
        "prediction_settings": dict(settings),
        "model_path": model_path,
        "request_file": request_file,
        "contexts_file": contexts_file,
        "run": {"host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **run},
    }


def index_ranges(indices: Iterable[int]) -> list[list[int]]:
    """``{0, 1, 2, 5}`` -> ``[[0, 2], [5, 5]]``: a run's request indices, compact (a generated file's are one range),
    so a reader of the output can tell a line of these requests from one added by hand or by another run."""
    ranges: list[list[int]] = []
    for index in sorted(indices):
        if ranges and index == ranges[-1][1] + 1:
            ranges[-1][1] = index
        else:
            ranges.append([index, index])
    return ranges


def in_ranges(index: int, ranges: Iterable[Iterable[int]]) -> bool:
    return any(start <= index <= end for start, end in ranges)


def load_record(output: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The record beside ``output``, None when there is none; ``ValueError`` (the reason) for an unreadable one."""
    path = record_path(output)
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(str(error)) from None
    if not isinstance(record, dict) or not isinstance(record.get("prediction_settings"), dict):
        raise ValueError("no prediction_settings object")
    return record


def read_record(output: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The record beside ``output``, None when there is none; an unreadable one is refused (it cannot vouch)."""
    try:
        return load_record(output)
    except ValueError as error:
        raise ConfigurationError(
            f"the run record {record_path(output)} is unreadable ({error}), so {output} cannot be resumed safely; "
            "choose another --output, or pass --overwrite true to start it over"
        ) from None


def write_record(output: str | os.PathLike[str], record: Mapping[str, Any]) -> None:
    write_json_atomic(record_path(output), dict(record))


def _short(value: Any) -> str:
    if isinstance(value, str):
        return value[7:19] if value.startswith("sha256:") else value
    return json.dumps(value, ensure_ascii=False)


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``name old -> new`` for every prediction setting that differs (the model and the requests by their files)."""
    before, after = old["prediction_settings"], new["prediction_settings"]
    changes: list[str] = []
    for name in PREDICTION_SETTINGS:
        if (name in before or name in _ADDED_LATER) and before.get(name) == after.get(name):
            continue
        was = _short(before[name]) if name in before else "(not recorded)"
        now = _short(after.get(name))
        if name == "requests" and name in before:
            changes.extend(_input_changes(old, new))
        elif name in _DESCRIBED_BY:
            label, where = _DESCRIBED_BY[name]
            changes.append(f"{label} {old.get(where)} ({was}) -> {new.get(where)} ({now})")
        else:
            changes.append(f"{name} {was} -> {now}")
    return changes


# Settings recorded as hashes: a difference names the files (``model_path``, ``request_file``) with short hashes.
_DESCRIBED_BY = {"model": ("model", "model_path"), "requests": ("request file", "request_file")}


def _input_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The input files that changed, each named with its short hashes: the request file, the contexts file, or both
    (the ``requests`` setting holds ``sha256:<requests>[ + contexts sha256:<contexts>]``)."""
    was = str(old["prediction_settings"]["requests"]).split(" + contexts ")
    now = str(new["prediction_settings"].get("requests")).split(" + contexts ")
    changes = []
    if was[0] != now[0]:
        changes.append(
            f"request file {old.get('request_file')} ({_short(was[0])}) -> {new.get('request_file')} ({_short(now[0])})"
        )
    old_contexts, new_contexts = was[1] if len(was) > 1 else None, now[1] if len(now) > 1 else None
    if old_contexts != new_contexts:
        before = f"{old.get('contexts_file')} ({_short(old_contexts)})" if old_contexts else "none"
        after = f"{new.get('contexts_file')} ({_short(new_contexts)})" if new_contexts else "none"
        changes.append(f"contexts file (--data.contexts) {before} -> {after}")
    return changes
