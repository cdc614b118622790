"""scripts/cli_throughput.py end to end on CPU with the shipped model: generate, then predict as a user runs it, the
records read back from the runs' TensorBoard scalars. Times on CPU mean nothing here; the test checks the records:
exactly the fields, one per (model, attention, length), every request counted, figures that are consistent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from star_lightning.bench import throughput
from star_lightning.plan import GpuSpec

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_script_writes_one_record_per_run_with_exactly_the_fields(tmp_path: Path) -> None:
    out = tmp_path / "cli_throughput.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "SLURM_", "PL_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, str(REPO / "scripts" / "cli_throughput.py"), "--model", "tiny=", "--device", "cpu",
               "--lengths", "1024", "40000000", "--requests", "2", "--max-new-tokens", "4", "--work-dir",
               str(tmp_path / "runs"), "--out", str(out), "--variant", "eager=--model.prefill eager"]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "beyond what it can place" in result.stdout  # 40M tokens: more than the shipped model places
    payload = json.loads(out.read_text())
    records = payload["records"]
    [run] = payload["runs"]  # the one command that wrote them, with its date and versions
    assert "--variant" in run["command"] and len(run["date"]) == 10 and run["versions"]["torch"] == torch.__version__
    assert [(r["model"], r["attention"], r["seq_len"]) for r in records] == [
        ("tiny", "star", 1024),
        ("tiny", "dense", 1024),
    ]
    for record in records:
        assert tuple(record) == throughput.RECORD_FIELDS
        assert record["requests"] == 2 and record["gpu"] and record["compute_floor_s"] is None  # no rates on CPU
        assert record["phase1_floor_s"] is None and record["new_tokens"] > 0 and record["query_s"] > 0
        assert (record["variant"], record["predict_args"]) == ("eager", "--model.prefill eager")
        assert 0 < record["startup_s"] < record["wall_s"]
        parts = record["startup_parts"]  # the run's own startup/* scalars: imports, model load, ... in seconds
        assert {"imports_s", "model_load_s", "total_s"} <= set(parts) and 0 < parts["imports_s"] < parts["total_s"]
        assert 0 < record["phase1_s"] <= record["per_request_s"] < record["wall_s"]
        assert record["decode_ms_per_token"] > 0


def test_the_summary_reads_the_scalars_as_the_run_wrote_them() -> None:
    """Three requests 1.5 s apart: per request 1.5 s; start-up = first scalars less the first request's phases; the
    phases' medians are over the requests after the first (the ones the intervals measure), not the warm-up's."""
    first = throughput.RequestScalars(
        0, 110.0, {"phase1_s": 0.9, "query_s": 0.5, "decode_setup_s": 0.3, "decode_s": 0.3, "decode_tokens_per_s": 5.0}
    )
    second = throughput.RequestScalars(
        1, 111.5, {"phase1_s": 0.6, "query_s": 0.1, "decode_setup_s": 0.0, "decode_s": 0.2, "decode_tokens_per_s": 25.0}
    )
    third = throughput.RequestScalars(
        2, 113.0, {"phase1_s": 0.4, "query_s": 0.1, "decode_setup_s": 0.3, "decode_s": 0.2, "decode_tokens_per_s": 50.0}
    )
    summary = throughput.summarize([first, second, third], launched_at=100.0, ended_at=114.0)
    assert summary["requests"] == 3 and summary["wall_s"] == pytest.approx(14.0)
    assert summary["startup_s"] == pytest.approx(10.0 - 2.0)
    assert summary["per_request_s"] == pytest.approx(1.5)
    assert summary["phase1_s"] == pytest.approx(0.5) and summary["decode_ms_per_token"] == pytest.approx(30.0)
    assert summary["decode_setup_s"] == pytest.approx(0.15) and summary["query_s"] == pytest.approx(0.1)
    # One request: its own figures (nothing steady to take them from).
    alone = throughput.summarize([first], launched_at=100.0, ended_at=111.0)
    assert alone["per_request_s"] == pytest.approx(2.0) and alone["phase1_s"] == pytest.approx(0.9)
    assert alone["decode_ms_per_token"] == pytest.approx(200.0)


def test_the_floor_counts_windows_within_their_reach() -> None:
    """Gemma-3-like: a window of 512 on 5 of 6 layers makes an 8K forward's attention far cheaper than global."""
    from model_zoo import tiny_config

    gpu = GpuSpec("test", 0, 1e12, 1e12, "given")
    hybrid = tiny_config(
        "gemma3", sliding_window=512, num_hidden_layers=6, layer_types=["sliding_attention"] * 5 + ["full_attention"]
    )
    plain = tiny_config("gemma3", sliding_window=512, num_hidden_layers=6, layer_types=["full_attention"] * 6)
    assert throughput.window_layers(hybrid) == (5, 512) and throughput.window_layers(plain) == (0, 512)
    windowed = throughput.compute_floor_s(hybrid, "dense", 8192, 1, 2048, gpu)
    full = throughput.compute_floor_s(plain, "dense", 8192, 1, 2048, gpu)
    assert windowed is not None and full is not None and windowed < full
    star = throughput.compute_floor_s(plain, "star", 8192, 1, 2048, gpu)
    assert star is not None and star < full  # blocks after an anchor see less than the whole causal context
    assert throughput.compute_floor_s(plain, "dense", 8192, 9, 2048, gpu) > full  # decode steps add their bytes
    assert throughput.phase1_floor_s(plain, "dense", 8192, 2048, gpu) == pytest.approx(full)  # one token: no step
