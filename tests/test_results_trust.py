"""Results you can trust, errors you can read (issue 17), through the command line as real processes.

Every bad input of the issue's table is refused with exit code 2 and exactly one line on stderr, printed once
(also with 2 ranks), before any process group, model or log folder exists; the request file is left
byte-identical and no output is created. Too-long requests are refused or skipped; ``score`` refuses a file that
holds a request twice; ``--help`` / ``--version`` answer without torch. The runs that compute (resume, concurrent
runs, Ctrl-C) are in ``test_results_trust_distributed.py``.
"""

from __future__ import annotations

import inspect
import json
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch.callbacks import Callback

from slurm_cluster import assert_one_error_line, predict_args, read_indices, run_all, run_cli, write_requests
from star_lightning.cli import main

SHORT_POSITIONS = 160  # max_position_embeddings of the "short" model copy


def model_copy(source: Path, destination: Path, **config: object) -> Path:
    shutil.copytree(source, destination)
    path = destination / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return destination


@pytest.fixture(scope="module")
def short_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model, told it places only ``SHORT_POSITIONS`` positions."""
    destination = tmp_path_factory.mktemp("short") / "model"
    return model_copy(tiny_model_dir, destination, max_position_embeddings=SHORT_POSITIONS)


def test_help_and_version_answer_without_importing_torch(tmp_path: Path) -> None:
    probe = (
        "import sys; from star_lightning.cli import main; "
        "assert main(['--help']) == 0 and main(['--version']) == 0; "
        "assert 'torch' not in sys.modules and 'lightning' not in sys.modules, 'a heavy import'"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "star-lightning 0.1.0" in result.stdout and "predict" in result.stdout
    assert run_cli(["--version"], tmp_path).stdout.strip() == "star-lightning 0.1.0"


def test_predict_help_shows_inference_options_only(capsys: pytest.CaptureFixture[str]) -> None:
    from star_lightning.predict_cli import DESCRIPTION

    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--model.pretrained", "--model.attention", "--model.temperature", "--data.path", "--data.limit",
        "--data.on_too_long", "--output", "--overwrite", "--config", "--trainer.devices", "--trainer.num_nodes",
        "--trainer.accelerator", "--trainer.precision", "--trainer.logger", "--trainer.profiler",
        "--trainer.callbacks", "--trainer.enable_progress_bar", "--trainer.strategy",
    ):  # fmt: skip
        assert option in text, option
    for training_only in (
        "--ckpt_path", "--trainer.gradient_clip_val", "--trainer.max_epochs", "--trainer.accumulate_grad_batches",
        "--trainer.limit_val_batches", "--trainer.enable_checkpointing", "--seed_everything", "--return_predictions",
    ):  # fmt: skip
        assert training_only not in text, training_only
    assert " ".join(DESCRIPTION.split()) in " ".join(text.split())  # whole, not cut after its first line
    assert DESCRIPTION.endswith(".")


def test_every_model_option_is_classified_for_resume() -> None:
    """A new ``--model.*`` option must be declared as deciding predictions or not (one line in one list)."""
    from star_lightning.data.run_record import (
        MODEL_OPTIONS_RESOLVED,
        MODEL_OPTIONS_THAT_DECIDE,
        MODEL_OPTIONS_THAT_DO_NOT,
    )
    from star_lightning.module import StarAttentionLM

    options = [name for name in inspect.signature(StarAttentionLM.__init__).parameters if name != "self"]
    declared = [*MODEL_OPTIONS_THAT_DECIDE, *MODEL_OPTIONS_RESOLVED, *MODEL_OPTIONS_THAT_DO_NOT]
    assert sorted(declared) == sorted(options)


def test_every_bad_input_gets_one_line_and_exit_2_before_any_work(
    tiny_model_dir: Path, short_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's table, a process per row (2 ranks where ranks used to repeat or hide the error); a second
    variant of a row runs in this process (each process spends seconds importing, CI has 2 cores)."""
    requests = write_requests(tmp_path / "requests.jsonl", 3, filler=4)
    lines = requests.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b"green", b"gr\xffen")
    not_utf8 = tmp_path / "not_utf8.jsonl"
    not_utf8.write_bytes(b"\n".join(lines))
    long_requests = tmp_path / "long.jsonl"
    long_requests.write_text(
        "".join(
            json.dumps({"input_context": "The sky is blue. " * n, "input_query": "What color is the sky?"}) + "\n"
            for n in (2, 40, 2)
        )
    )
    truncated = model_copy(tiny_model_dir, tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    corrupt = model_copy(tiny_model_dir, tmp_path / "corrupt")
    data = bytearray((corrupt / "model.safetensors").read_bytes())
    data[9:20] = b"\xff" * 11  # inside the JSON header
    (corrupt / "model.safetensors").write_bytes(bytes(data))
    remote = model_copy(
        tiny_model_dir,
        tmp_path / "remote",
        model_type="tiny_custom",
        auto_map={"AutoConfig": "configuration_tiny.TinyConfig", "AutoModelForCausalLM": "modeling_tiny.TinyLM"},
    )
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.jsonl").symlink_to(requests)
    two_ranks = ("--trainer.devices", "2")
    out = str(tmp_path / "out.jsonl")

    def case(name: str, model: Path, data: Path, output: str, *extra: str) -> tuple[list[str], Path]:
        cwd = tmp_path / f"cwd_{name}"
        cwd.mkdir()
        return predict_args(model, data, Path(output), *extra), cwd

    rows = {
        "not_utf8": (case("not_utf8", tiny_model_dir, not_utf8, out, *two_ranks), ("line 3", "not UTF-8")),
        "temperature": (
            case("temperature", tiny_model_dir, requests, out, "--model.temperature", "-1"),
            ("--model.temperature", "-1"),
        ),
        "truncated": (case("truncated", truncated, requests, out), ("model.safetensors", "truncated", "again")),
        "unwritable": (
            case("unwritable", tiny_model_dir, requests, str(tmp_path / "a_file" / "out.jsonl"), *two_ranks),
            ("--output", "a_file is a file"),
        ),
        "remote_code": (case("remote_code", remote, requests, out), ("--model.trust_remote_code true",)),
        "input_by_link": (
            case("input_by_link", tiny_model_dir, requests, str(tmp_path / "link.jsonl")),
            ("request file", "another --output"),
        ),
        "too_long": (
            case("too_long", short_model_dir, long_requests, out, *two_ranks, "--model.block_size", "4"),
            ("request 1", "line 2", f"the {SHORT_POSITIONS} the model can place", "--data.on_too_long skip"),
        ),
    }
    in_process = {
        "top_p": (predict_args(tiny_model_dir, requests, Path(out), "--model.top_p", "1.5"), ("--model.top_p", "1.5")),
        "corrupt": (predict_args(corrupt, requests, Path(out)), ("model.safetensors", "not valid JSON")),
        "input_by_relative_path": (
            predict_args(tiny_model_dir, requests, Path(f"{tmp_path}/sub/../requests.jsonl")),
            ("request file", "another --output"),
        ),
    }
    before = {path: path.read_bytes() for path in (requests, not_utf8, long_requests)}
    results = run_all([job for job, _ in rows.values()])
    for (name, (job, words)), result in zip(rows.items(), results, strict=True):
        line = assert_one_error_line(result, *words)
        assert not (job[1] / "lightning_logs").exists(), f"{name}: a refused run created a log folder"
        print(f"{name}: {line}")
    capsys.readouterr()
    for name, (args, words) in in_process.items():
        code = main(args)
        err = capsys.readouterr().err
        assert_one_error_line(subprocess.CompletedProcess(args, code, "", err), *words)
        print(f"{name}: {err.strip()}")
    assert {path: path.read_bytes() for path in before} == before
    assert not Path(out).exists() and not list(tmp_path.glob("*.lock")), "a refused run left an output or a lock"


def test_too_long_requests_are_skipped_listed_once_and_checked_again_on_resume(
    short_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    requests = tmp_path / "requests.jsonl"
    requests.write_text(
        "".join(
            json.dumps(
                {"input_context": "The sky is blue. " * n, "input_query": "Sky?", "outputs": ["blue"], "task": "qa_1"}
            )
            + "\n"
            for n in (2, 40, 3, 50)
        )
    )
    output = tmp_path / "out.jsonl"
    skip = predict_args(short_model_dir, requests, output, "--data.on_too_long", "skip", "--trainer.devices", "1")
    first = run_cli(skip, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = [line for line in first.stderr.splitlines() if "skipped 2 request(s)" in line]
    assert len(summary) == 1, first.stderr[-3000:]
    assert "index 1 (line 2," in summary[0] and "index 3 (line 4," in summary[0]
    assert f"the {SHORT_POSITIONS} positions" in summary[0]
    assert sorted(read_indices(output)) == [0, 2]  # the skipped ones are not predictions
    record = json.loads((tmp_path / "out.jsonl.run.json").read_text())
    assert [item["index"] for item in record["skipped_too_long"]] == [1, 3]
    written = output.read_bytes()
    # Resumed: nothing to compute, the same two skipped again (listed again); with "error" the run is refused,
    # since those requests were never predicted.
    again = run_cli(skip, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert sum("skipped 2 request(s)" in line for line in again.stderr.splitlines()) == 1
    assert output.read_bytes() == written
    assert len(list((tmp_path / "lightning_logs" / "predict").iterdir())) == 1  # nothing run, nothing logged
    capsys.readouterr()
    assert main(["score", str(output)]) == 0  # the scores say they leave the skipped requests out
    assert "leaves out 2 request(s) too long for the model" in capsys.readouterr().err
    capsys.readouterr()
    code = main(predict_args(short_model_dir, requests, output, "--trainer.devices", "1"))
    refused = subprocess.CompletedProcess([], code, "", capsys.readouterr().err)
    assert_one_error_line(refused, "request 1", "line 2", "--data.on_too_long skip")
    assert output.read_bytes() == written


def test_score_refuses_a_file_that_holds_a_request_twice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{"index": i, "task": "niah_single_1", "outputs": ["7"], "pred": "7"} for i in (0, 1, 2, 1)]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(["score", str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "index 1 is on line 2 and line 4" in err[0]
    assert main(["table", "--run", f"attention=star,path={path},length=4096", "--out", str(tmp_path / "t")]) == 2
    assert "index 1 is on line 2 and line 4" in capsys.readouterr().err


def test_prompt_lengths_are_the_module_own_tokenization(tiny_model_dir: Path) -> None:
    """The length check counts the tokens ``encode_request`` will feed the model (special tokens included)."""
    from star_lightning.models import load_tokenizer
    from star_lightning.module import StarAttentionLM
    from star_lightning.preflight import prompt_lengths

    module = StarAttentionLM(pretrained=str(tiny_model_dir))
    module.tokenizer = load_tokenizer(str(tiny_model_dir))
    requests = [
        {"input_context": "The grass is green. " * n + "Magic: 7.", "input_query": " What is magic?"} for n in (1, 9)
    ]
    expected = [tuple(ids.shape[1] for ids in module.encode_request(request)) for request in requests]
    assert prompt_lengths(module.tokenizer, requests) == expected


@pytest.mark.parametrize(
    ("config", "positions"),
    [
        ({"max_position_embeddings": 8192}, 8192),
        (
            {
                "max_position_embeddings": 131072,
                "rope_parameters": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "original_max_position_embeddings": 8192,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "rope_theta": 500000.0,
                },
            },
            131072,
        ),  # Llama-3.1
        (
            {
                "max_position_embeddings": 32768,
                "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
            },
            131072,
        ),  # Qwen2.5's YaRN recipe
        ({"max_position_embeddings": 4096, "rope_parameters": {"rope_type": "linear", "factor": 4.0}}, 16384),
        ({"max_position_embeddings": 4096, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, 8192),
    ],
)
def test_placeable_positions_follow_rope_scaling(config: dict, positions: int) -> None:
    from transformers import LlamaConfig

    from star_lightning.models import placeable_positions

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert placeable_positions(LlamaConfig(**config)) == positions


def test_placeable_positions_of_other_position_schemes() -> None:
    from transformers import Gemma3TextConfig, GPT2Config, Phi3Config

    from star_lightning.models import placeable_positions

    longrope = {"type": "longrope", "long_factor": [1.0] * 48, "short_factor": [1.0] * 48}
    phi3 = Phi3Config(max_position_embeddings=131072, original_max_position_embeddings=4096, rope_scaling=longrope)
    assert placeable_positions(phi3) == 131072
    assert placeable_positions(Gemma3TextConfig(max_position_embeddings=131072)) == 131072  # a rope per layer type
    assert placeable_positions(GPT2Config(n_positions=1024)) == 1024  # learned absolute positions


def test_fingerprint_sees_weights_and_config_not_the_model_card(tiny_model_dir: Path, tmp_path: Path) -> None:
    from star_lightning.model_files import fingerprint_folder

    copy = model_copy(tiny_model_dir, tmp_path / "copy")
    original = fingerprint_folder(copy)
    (copy / "README.md").write_text("a new model card")
    assert fingerprint_folder(copy) == original
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor: inside the last sample
    weights.write_bytes(bytes(data))
    changed = fingerprint_folder(copy)
    assert changed != original
    config = copy / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "rope_theta": 1.0}))
    assert fingerprint_folder(copy) != changed


def test_the_lock_names_its_holder_and_goes_with_it(tmp_path: Path) -> None:
    import os
    import socket

    from star_lightning.data.output_lock import OutputLock
    from star_lightning.errors import ConfigurationError

    output = tmp_path / "out.jsonl"
    with OutputLock(output):
        # Another holder (flock locks belong to the open file, so a second open in this process competes).
        with pytest.raises(ConfigurationError, match=f"host {socket.gethostname()}, pid {os.getpid()}"):
            OutputLock(output).acquire()
    assert not (tmp_path / "out.jsonl.lock").exists()
    with OutputLock(output):
        pass


def test_the_predict_path_uses_no_deprecated_jsonargparse_api(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """jsonargparse 5 removes ``add_instantiator``, ``instantiate_classes`` and ``skip_none``: none is called."""
    monkeypatch.setenv("JSONARGPARSE_DEPRECATION_WARNINGS", "all")
    requests = write_requests(tmp_path / "requests.jsonl", 1, filler=2)
    args = predict_args(tiny_model_dir, requests, tmp_path / "out.jsonl", "--trainer.devices", "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main([*args, "--trainer.logger", "false"]) == 0
    deprecated = [str(w.message) for w in caught if w.category.__name__ == "JsonargparseDeprecationWarning"]
    assert deprecated == []


class InterruptAtSecondRequest(Callback):
    """Raises KeyboardInterrupt as the second request starts: what a second Ctrl-C does in the middle of one."""

    def on_predict_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, *args: Any) -> None:
        if batch_idx == 1:
            raise KeyboardInterrupt


def test_an_interrupted_run_exits_130_with_the_resume_hint(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    requests = write_requests(tmp_path / "requests.jsonl", 3, filler=2)
    output = tmp_path / "out.jsonl"
    args = predict_args(tiny_model_dir, requests, output, "--trainer.devices", "1", "--trainer.logger", "false")
    callback = f"{InterruptAtSecondRequest.__module__}.{InterruptAtSecondRequest.__name__}"
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as exit_info:
            main([*args, "--trainer.callbacks", callback])
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores Ctrl-C while it shuts down
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    assert "stopped by Ctrl-C" in err and "rerun the same command to resume" in err
    assert read_indices(output) == [0]  # the request in flight is not written; the rerun computes it
    assert main(args) == 0 and sorted(read_indices(output)) == [0, 1, 2]


def test_a_second_ctrl_c_stops_at_once() -> None:
    from star_lightning.callbacks.prediction_writer import JsonlPredictionWriter

    writer = JsonlPredictionWriter("unused.jsonl")
    writer._note_signal(signal.SIGINT, None)  # the first: noted, the request in flight finishes
    with pytest.raises(KeyboardInterrupt):
        writer._note_signal(signal.SIGINT, None)
