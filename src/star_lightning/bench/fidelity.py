"""Star-vs-dense fidelity from prediction files: per-request scores, each task's score with its 95% interval, the
share of dense with a paired interval, the hardest tasks dense can do, and a manifest that keeps stale work out.

Shared by ``scripts/fidelity_table.py``, ``star-lightning tune`` and the oracle script, so the three compute the
same numbers the same way. Scores come from the project's own scorer (:func:`star_lightning.bench.scoring.
score_records`, one request per group), intervals from :mod:`star_lightning.bench.intervals` (Wilson for 0/1 scores,
percentile bootstrap for fractions; the share of dense: paired, task-stratified percentile bootstrap over the same
requests).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from star_lightning.bench.intervals import score_interval, share_of_dense
from star_lightning.bench.scoring import read_predictions, score_records
from star_lightning.data.jsonl import write_json_atomic
from star_lightning.errors import ConfigurationError

PAIRING = "paired task-stratified percentile bootstrap over the same requests (10,000 resamples, seed 0)"
SCORE_INTERVAL = "Wilson score interval (0/1 scores) or percentile bootstrap over requests (fractional scores)"
Scores = dict[str, dict[str, float]]  # task -> request key -> score in [0, 1]


def request_key(record: Mapping[str, Any]) -> str:
    """What pairs a request across cells: its task's own index (``source_index``, kept when files are joined)."""
    return str(record.get("source_index", record.get("index")))


def per_request_scores(path: str | Path, *, references: Scores | None = None) -> Scores:
    """Every request's score in [0, 1] from a predictions file, by task and :func:`request_key`.

    ``references``: score against another cell's answers instead of the file's references (a request file without
    references is scored against dense's own predictions); then a request counts 1 when its answer holds the
    other's (trimmed), else 0."""
    located = read_predictions([path])
    if references is not None:
        return _agreement(located, references)
    by_request, _ = score_records(located, group=lambda record: (record["task"], request_key(record)))
    scores: Scores = {}
    for (task, key), value in by_request.items():
        scores.setdefault(task, {})[key] = value / 100.0
    return scores


def predictions_of(path: str | Path) -> dict[str, dict[str, str]]:
    """Each request's prediction text, by task and :func:`request_key`."""
    out: dict[str, dict[str, str]] = {}
    for _, record in read_predictions([path]):
        out.setdefault(str(record.get("task", "request")), {})[request_key(record)] = str(record.get("pred", ""))
    return out


def _agreement(located: Iterable[tuple[str, dict[str, Any]]], answers: Mapping[str, Mapping[str, Any]]) -> Scores:
    scores: Scores = {}
    for where, record in located:
        task, key = str(record.get("task", "request")), request_key(record)
        if key not in answers.get(task, {}):
            raise ConfigurationError(f"{where}: request {key} of {task} has no answer to compare with")
        reference = str(answers[task][key]).strip()
        scores.setdefault(task, {})[key] = float(bool(reference) and reference in str(record.get("pred", "")))
    return scores


def task_intervals(scores: Scores) -> dict[str, dict[str, Any]]:
    """Each task's score (0-100) with its 95% interval and the per-request scores it rests on."""
    out = {}
    for task, by_key in sorted(scores.items()):
        keys = sorted(by_key, key=_numeric)
        interval = score_interval([by_key[k] for k in keys])
        out[task] = {**interval.as_dict(scale=100.0, digits=2), "per_request": {k: by_key[k] for k in keys}}
    return out


def share(star: Scores, dense: Scores, tasks: Iterable[str]) -> dict[str, Any] | None:
    """Star's share of dense over ``tasks`` (the same requests in both), with its paired interval; None when dense
    scores 0 on all of them. Refuses cells that scored different requests."""
    chosen = [t for t in tasks if t in dense]
    if not chosen:
        return None
    paired_star, paired_dense = {}, {}
    for task in chosen:
        if set(star.get(task, {})) != set(dense[task]):
            raise ConfigurationError(
                f"{task}: the star cell scored requests {_span(star.get(task, {}))} and dense {_span(dense[task])}; "
                "they must be the same requests (stale work? rerun the cell)"
            )
        keys = sorted(dense[task], key=_numeric)
        paired_star[task] = [star[task][k] for k in keys]
        paired_dense[task] = [dense[task][k] for k in keys]
    try:
        interval = share_of_dense(paired_star, paired_dense)
    except ValueError:
        return None
    return {**interval.as_dict(scale=100.0, digits=2), "tasks": chosen}


def hardest_tasks(dense: Mapping[str, float], floor: float, count: int) -> tuple[list[str], dict[str, float]]:
    """The ``count`` tasks with the lowest dense score (0-100) at or above ``floor``, and the others with theirs."""
    able = sorted((score, task) for task, score in dense.items() if score >= floor)
    chosen = [task for _, task in able[:count]]
    return chosen, {task: score for task, score in dense.items() if task not in chosen}


def _numeric(key: str) -> tuple[int, str]:
    return (int(key), "") if key.lstrip("-").isdigit() else (0, key)


def _span(keys: Iterable[str]) -> str:
    ordered = sorted(keys, key=_numeric)
    return f"{len(ordered)} ({ordered[0]}..{ordered[-1]})" if ordered else "none"


def spec_digest(spec: Mapping[str, Any]) -> str:
    """A short digest of what a work file is made from (its name carries it: another spec, another file)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


class WorkManifest:
    """``WORK/manifest.json``: for each work file (requests, joined requests, predictions), what it was made from.

    A file is reused only when its recorded spec equals the one asked for now; a file there without an entry (made
    by an older script, or by hand) or with another spec is stale: :meth:`check` refuses it in one line naming the
    file, what differs and the fix. Work file names carry :func:`spec_digest`, so runs with other tasks or sample
    counts over the same ``--work`` write other files and never read each other's."""

    def __init__(self, work: Path) -> None:
        self.path = work / "manifest.json"
        self.entries: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def check(self, file: Path, spec: Mapping[str, Any]) -> bool:
        """True when ``file`` exists and was made from ``spec``; False when it is not there (make it)."""
        recorded = self.entries.get(file.name)
        if not file.exists():
            return False
        wanted = json.loads(json.dumps(spec, default=str))
        if recorded != wanted:
            what = "no record of what made it" if recorded is None else _diff(recorded, wanted)
            raise ConfigurationError(
                f"stale work file {file}: {what}; remove it (and the predictions made from it) or choose another --work"
            )
        return True

    def record(self, file: Path, spec: Mapping[str, Any]) -> None:
        self.entries[file.name] = json.loads(json.dumps(spec, default=str))
        write_json_atomic(self.path, self.entries)


def _diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    names = sorted(set(old) | set(new))
    changed = [f"{n} {old.get(n)!r} -> {new.get(n)!r}" for n in names if old.get(n) != new.get(n)]
    return "made from other inputs (" + "; ".join(changed)[:300] + ")"


ASCII_FIXES = {"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "\u2026": "...", "\u2014": "--",
               "\u2013": "-"}  # fmt: skip


def table_paths(prefix: Path) -> tuple[Path, Path]:
    """The JSON and Markdown files of an output prefix: ``qwen2.5-coder-0.5b_16384`` -> ``..._16384.json`` / ``.md``
    (``Path.with_suffix`` would take ``.5b_16384`` for a suffix); a prefix given with ``.json`` or ``.md`` loses it."""
    stem = prefix.name.removesuffix(".json").removesuffix(".md")
    return prefix.with_name(stem + ".json"), prefix.with_name(stem + ".md")


def essays_file(path: Path) -> Path:
    """Python's documentation text as the essay haystack (RULER's Paul Graham essays need a download), written once."""
    if not path.exists():
        import pydoc_data.topics as topics

        text = "\n".join(topics.topics[k] for k in sorted(topics.topics))
        for bad, good in ASCII_FIXES.items():
            text = text.replace(bad, good)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return path
