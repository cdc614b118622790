"""A rank that dies or hangs ends the whole 2-process job non-zero within a bounded time, never a silent hang."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from slurm_cluster import STAR_LIGHTNING, cli_env, predict_args, wait_for_lines, write_requests

TIMEOUT_S = 15  # --trainer.strategy.timeout_s: how long a collective may wait for a peer


def _children(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(child) for child in children]


def _start(model: Path, tmp_path: Path) -> tuple[subprocess.Popen[str], Path]:
    """Start a 2-process predict job; its output goes to a file (a stopped child could hold a pipe open)."""
    data = write_requests(tmp_path / "requests.jsonl", 40)
    output = tmp_path / "predictions.jsonl"
    args = predict_args(model, data, output, "--trainer.devices", "2", "--trainer.strategy.timeout_s", str(TIMEOUT_S))
    args += ["--model.max_new_tokens", "40"]
    process = subprocess.Popen(
        [str(STAR_LIGHTNING), *args],
        cwd=tmp_path,
        env=cli_env(),
        stdout=(tmp_path / "job.log").open("w"),
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    wait_for_lines(output, 2, process, timeout_s=120)
    return process, tmp_path / "job.log"


def _rank1_pid(process: subprocess.Popen[str]) -> int:
    """Lightning's launcher: rank 0 is the command's process, rank 1 the python child it started."""
    candidates = [pid for pid in _children(process.pid) if b"predict" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(candidates) == 1, candidates
    return candidates[0]


def _wait(process: subprocess.Popen[str], log_path: Path, bound_s: float) -> tuple[str, float]:
    start = time.monotonic()
    try:
        process.wait(timeout=bound_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        log = log_path.read_text()
        raise AssertionError(f"the job was still running {bound_s} s after the fault:\n{log[-3000:]}") from None
    return log_path.read_text(), time.monotonic() - start


def test_a_killed_rank_ends_the_job_nonzero_naming_the_rank(tiny_model_dir: Path, tmp_path: Path) -> None:
    process, log_path = _start(tiny_model_dir, tmp_path)
    os.kill(_rank1_pid(process), signal.SIGKILL)
    log, elapsed = _wait(process, log_path, bound_s=TIMEOUT_S + 30)
    assert process.returncode != 0, log
    assert "rank: 1" in log or "rank 1" in log, log[-3000:]
    assert elapsed < TIMEOUT_S + 30


def test_a_hung_rank_ends_the_job_after_the_collective_timeout(tiny_model_dir: Path, tmp_path: Path) -> None:
    process, log_path = _start(tiny_model_dir, tmp_path)
    rank1 = _rank1_pid(process)
    os.kill(rank1, signal.SIGSTOP)  # alive but silent: only the collective timeout can notice
    try:
        log, elapsed = _wait(process, log_path, bound_s=TIMEOUT_S + 45)
    finally:
        os.kill(rank1, signal.SIGKILL)
    assert process.returncode != 0, log
    assert elapsed >= TIMEOUT_S - 1, f"ended after {elapsed:.0f} s, before the {TIMEOUT_S} s timeout:\n{log[-3000:]}"
    print(log[-4000:])
