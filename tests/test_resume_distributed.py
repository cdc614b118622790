"""A 2-process predict job stopped midway (SIGTERM, or killed outright) and rerun writes every request exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
from collections import Counter
from pathlib import Path

from slurm_cluster import STAR_LIGHTNING, cli_env, predict_args, read_indices, wait_for_lines, write_requests

REQUESTS = 16
SLOW = ("--model.max_new_tokens", "40")  # each request takes a while, so a signal lands midway through the job


def _start(model: Path, data: Path, output: Path, cwd: Path, *extra: str) -> subprocess.Popen[str]:
    """Two ranks launched by Lightning (rank 0 starts rank 1), in their own process group like a SLURM step."""
    args = predict_args(model, data, output, "--trainer.devices", "2", "--trainer.strategy.timeout_s", "60", *SLOW,
                        *extra)  # fmt: skip
    return subprocess.Popen(
        [str(STAR_LIGHTNING), *args],
        cwd=cwd,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _rerun(model: Path, data: Path, output: Path, cwd: Path) -> None:
    process = _start(model, data, output, cwd)
    log, _ = process.communicate(timeout=240)
    assert process.returncode == 0, log
    counts = Counter(read_indices(output))
    assert sorted(counts) == list(range(REQUESTS)), log
    assert max(counts.values()) == 1, f"requests written twice: {[i for i, n in counts.items() if n > 1]}"


def test_sigterm_stops_after_the_current_request_and_a_rerun_completes(tiny_model_dir: Path, tmp_path: Path) -> None:
    """With a tokenizing worker per rank (the default on a GPU): the signal reaches the workers too (the whole
    process group), and they leave the stop to their rank (a worker killed by it made the rank fail mid-request)."""
    data = write_requests(tmp_path / "requests.jsonl", REQUESTS)
    output = tmp_path / "predictions.jsonl"
    process = _start(tiny_model_dir, data, output, tmp_path, "--data.num_workers", "1")
    wait_for_lines(output, 2, process, timeout_s=120)
    os.killpg(process.pid, signal.SIGTERM)  # every rank, as SLURM signals every task of a step
    log, _ = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, log
    assert "received SIGTERM: stopped after writing the current request" in log
    written = read_indices(output)
    assert 2 <= len(written) < REQUESTS, "the signal should land midway; make the requests slower"
    assert len(set(written)) == len(written)
    assert output.read_bytes().endswith(b"\n")
    _rerun(tiny_model_dir, data, output, tmp_path)


def test_a_killed_job_with_a_torn_last_line_resumes_exactly_once(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_requests(tmp_path / "requests.jsonl", REQUESTS)
    output = tmp_path / "predictions.jsonl"
    process = _start(tiny_model_dir, data, output, tmp_path)
    wait_for_lines(output, 2, process, timeout_s=120)
    os.killpg(process.pid, signal.SIGKILL)  # no grace at all: what SLURM does after KillWait
    process.communicate(timeout=60)
    written = read_indices(output)
    assert len(written) < REQUESTS
    with output.open("a", encoding="utf-8") as handle:  # a line cut by the kill while being written
        handle.write('{"index": ' + str(REQUESTS - 1) + ', "pred": "cut o')
    _rerun(tiny_model_dir, data, output, tmp_path)
