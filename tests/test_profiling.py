"""Profiling a predict run: Lightning's PyTorch profiler writes a trace next to the TensorBoard scalars."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from star_lightning.cli import main
from star_lightning.engine.forward import PHASE1, PHASE2_DECODE, PHASE2_QUERY


def test_pytorch_profiler_trace_shows_the_phases(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "in.jsonl"
    # Two different contexts: a repeated one would be answered over the kept KV, with no Phase 1 to trace.
    rows = [{"input_context": f"The grass is green {i}. " * 30, "input_query": " Color?"} for i in range(2)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = ["predict", "--model.pretrained", str(tiny_model_dir), "--model.block_size", "64",
            "--model.max_new_tokens", "4", "--data.path", str(data), "--output", "out.jsonl",
            "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.profiler", "pytorch"]  # fmt: skip
    assert main(args) == 0
    (log_dir,) = (tmp_path / "lightning_logs" / "predict").iterdir()
    traces = sorted(log_dir.glob("*.pt.trace.json"))
    assert traces, f"no trace in {sorted(p.name for p in log_dir.iterdir())}"
    names = {event.get("name") for event in json.loads(traces[0].read_text())["traceEvents"]}
    assert {PHASE1, PHASE2_QUERY, PHASE2_DECODE} <= names
    assert any(path.name.startswith("events.out.tfevents") for path in log_dir.iterdir())  # the scalars beside it


def test_progress_bar_names_the_request_count_and_the_running_phase(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "in.jsonl"
    # Two different contexts: a repeated one would be answered over the kept KV, with no Phase 1 to trace.
    rows = [{"input_context": f"The grass is green {i}. " * 30, "input_query": " Color?"} for i in range(2)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = ["predict", "--model.pretrained", str(tiny_model_dir), "--model.block_size", "64",
            "--model.max_new_tokens", "4", "--data.path", str(data), "--output", str(tmp_path / "out.jsonl"),
            "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.logger", "false",
            # tqdm prints every update (rich, where installed, only its last frame when not on a terminal)
            "--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar"]  # fmt: skip
    assert main(args) == 0
    captured = capsys.readouterr()
    shown = captured.out + captured.err
    for text in ("req 0/2 | 0: phase1", "req 0/2 | 0: phase2_query", "req 0/2 | 0: decode", "req 2/2 | prefill"):
        assert text in shown, shown[-2000:]
