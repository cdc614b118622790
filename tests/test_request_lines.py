"""A request line that cannot run is refused before any model work, naming its line, the field and the fix; a
file saved with a byte-order mark reads as UTF-8."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from slurm_cluster import predict_args, read_indices
from star_lightning.cli import main

CONTEXT = "The grass is green. The sky is blue. " * 8 + "The magic number is 7. "


def _rows(count: int, **extra: str) -> list[dict[str, str]]:
    return [{"input_context": CONTEXT, "input_query": "What is the magic number?", **extra} for _ in range(count)]


def _write(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")  # \ud800 stays escaped
    return path


def _one_error_line(capsys: pytest.CaptureFixture[str], code: int, *words: str) -> str:
    lines = capsys.readouterr().err.splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("star-lightning predict: error: "), lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("note", "x\ud800y", ("line 2", "'note'", "unpaired UTF-16 surrogate", "\\ud800")),  # copied through
        ("input_context", CONTEXT + "\udfff", ("line 2", "'input_context'", "unpaired UTF-16 surrogate")),
        ("pred", "an old answer", ("line 2", "'pred' is reserved", "rename it")),
    ],
)
def test_a_request_line_that_cannot_run_is_refused_before_the_model_loads(
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    field: str,
    value: str,
    words: tuple[str, ...],
) -> None:
    requests = _write(tmp_path / "requests.jsonl", [*_rows(1), *_rows(1, **{field: value}), *_rows(1)])
    output = tmp_path / "out.jsonl"
    code = main(predict_args(tiny_model_dir, requests, output, "--trainer.devices", "1", "--trainer.logger", "false"))
    _one_error_line(capsys, code, *words)
    assert not output.exists()  # refused before any request ran


def test_a_request_file_with_a_byte_order_mark_reads_as_utf8(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    requests = tmp_path / "requests.jsonl"
    requests.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(row) + "\n" for row in _rows(2)).encode())
    output = tmp_path / "out.jsonl"
    args = predict_args(tiny_model_dir, requests, output, "--trainer.devices", "1", "--trainer.logger", "false")
    assert main(args) == 0
    assert sorted(read_indices(output)) == [0, 1]


def test_a_context_far_too_long_is_refused_without_tokenizing_it_all(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """20 MB of context on the shipped model (8192 positions): counted on a prefix (tokenizing it all took 45 s
    and 4 GB)."""
    context = "The grass is green and the sky is blue today. " * (20_000_000 // 46)
    requests = _write(tmp_path / "requests.jsonl", [{"input_context": context, "input_query": "What colour?"}])
    args = ["predict", "--data.path", str(requests), "--output", str(tmp_path / "out.jsonl")]
    start = time.monotonic()
    code = main([*args, "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.logger", "false"])
    elapsed = time.monotonic() - start
    _one_error_line(
        capsys, code, "request 0", "line 1", "more than the 8192 the model can place", "--data.on_too_long skip"
    )
    assert elapsed < 15, f"{elapsed:.1f} s to refuse"


def test_any_integer_index_runs_and_tensorboard_steps_are_positions(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An index is the user's (2**70 included); TensorBoard's 64-bit step is the request's position in the file.
    Sampled, so the per-request seed (seed + index) is used too."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    big = 2**70
    rows = [{**row, "index": index} for row, index in zip(_rows(2), (big, 5), strict=True)]
    requests, output, logs = _write(tmp_path / "requests.jsonl", rows), tmp_path / "out.jsonl", tmp_path / "logs"
    args = predict_args(tiny_model_dir, requests, output, "--trainer.devices", "1", "--model.temperature", "0.7")
    args += ["--trainer.logger.init_args.save_dir", str(logs)]
    assert main(args) == 0, capsys.readouterr().err[-2000:]
    assert sorted(read_indices(output)) == [5, big]
    (events,) = list(logs.rglob("events.out.tfevents*"))
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    assert sorted(event.step for event in accumulator.Scalars("request/new_tokens")) == [0, 1]
    # Where the start-up went, logged once with the first request; the parts add up to the whole.
    parts = ["imports", "parse", "checks", "model_load", "to_first_request", "interpreter"]
    values = {}
    for name in [*parts, "total"]:
        (event,) = accumulator.Scalars(f"startup/{name}_s")
        assert event.step == 0 and event.value >= 0, name
        values[name] = event.value
    assert sum(values[name] for name in parts) == pytest.approx(values["total"], abs=1e-3)
