"""A rank that dies or hangs ends the whole 2-process job non-zero within a bounded time, never a silent hang; a
signal at any moment stops every process of the job; a dead peer is one line, not every rank's traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import STAR_LIGHTNING, cli_env, predict_args, wait_for_lines, write_requests

TIMEOUT_S = 15  # --trainer.strategy.timeout_s: how long a collective may wait for a peer


def _children(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(child) for child in children]


def _launch(model: Path, tmp_path: Path) -> tuple[subprocess.Popen[str], Path]:
    """Start a 2-process predict job; its output goes to a file (a stopped child could hold a pipe open)."""
    data = write_requests(tmp_path / "requests.jsonl", 40)
    output = tmp_path / "predictions.jsonl"
    args = predict_args(model, data, output, "--trainer.devices", "2", "--trainer.strategy.timeout_s", str(TIMEOUT_S))
    args += ["--model.max_new_tokens", "40", "--trainer.logger", "false"]
    process = subprocess.Popen(
        [str(STAR_LIGHTNING), *args],
        cwd=tmp_path,
        env=cli_env(),
        stdout=(tmp_path / "job.log").open("w"),
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    return process, tmp_path / "job.log"


def _start(model: Path, tmp_path: Path) -> tuple[subprocess.Popen[str], Path]:
    """A 2-process predict job that has written 2 predictions."""
    process, log_path = _launch(model, tmp_path)
    wait_for_lines(tmp_path / "predictions.jsonl", 2, process, timeout_s=120)
    return process, log_path


def _rank_children(process: subprocess.Popen[str]) -> list[int]:
    """The launcher's children that run predict (it may start other short-lived helpers)."""
    ranks = []
    for pid in _children(process.pid):
        try:
            if b"predict" in Path(f"/proc/{pid}/cmdline").read_bytes():
                ranks.append(pid)
        except FileNotFoundError:
            continue
    return ranks


def _rank1_pid(process: subprocess.Popen[str]) -> int:
    """Lightning's launcher: rank 0 is the command's process, rank 1 the python child it started."""
    candidates = _rank_children(process)
    assert len(candidates) == 1, candidates
    return candidates[0]


def _alive(pid: int) -> bool:
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def _wait_until(condition: object, process: subprocess.Popen[str], what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert process.poll() is None, f"the job ended (rc={process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
        time.sleep(0.02)


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


def test_a_killed_rank_ends_the_job_with_one_line_naming_the_rank(tiny_model_dir: Path, tmp_path: Path) -> None:
    process, log_path = _start(tiny_model_dir, tmp_path)
    rank1 = _rank1_pid(process)
    os.kill(rank1, signal.SIGKILL)
    log, elapsed = _wait(process, log_path, bound_s=TIMEOUT_S + 30)
    assert process.returncode == 1, log[-3000:]
    assert f"rank 1 (pid {rank1}) ended (killed by SIGKILL), so the job stops" in log, log[-3000:]
    assert "rerun the same command to resume" in log
    assert "Traceback" not in log and "Connection closed" not in log, log[-3000:]  # no echo of the dead peer
    assert elapsed < TIMEOUT_S + 30


@pytest.mark.parametrize("window", ["rank 1 started, not yet connected", "the ranks connected"])
def test_sigterm_to_the_launcher_at_start_up_leaves_no_process_of_the_job(
    tiny_model_dir: Path, tmp_path: Path, window: str
) -> None:
    """Before the predict loop the launcher may sit in a C++ rendezvous: it still stops at once, with its ranks."""
    process, log_path = _launch(tiny_model_dir, tmp_path)
    try:
        _wait_until(lambda: _rank_children(process), process, "rank 1")
        rank1 = _rank1_pid(process)
        if window == "the ranks connected":
            _wait_until(lambda: "All distributed processes registered" in log_path.read_text(), process, "connect")
        else:
            assert "All distributed processes registered" not in log_path.read_text()
        os.kill(process.pid, signal.SIGTERM)  # the launcher alone, as `kill PID` or a parent process does
        log, _ = _wait(process, log_path, bound_s=10)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _alive(rank1) and time.monotonic() < deadline:
        time.sleep(0.1)
    orphan = _alive(rank1)
    if orphan:
        os.kill(rank1, signal.SIGKILL)
    assert not orphan, f"rank 1 (pid {rank1}) outlived its launcher by 10 s:\n{log[-3000:]}"
    assert process.returncode == 128 + signal.SIGTERM, log[-3000:]
    assert "star-lightning predict: stopped by SIGTERM; what --output holds is kept" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


def test_a_rank_dies_with_its_launcher_however_the_launcher_dies(tmp_path: Path) -> None:
    """The tie itself: a rank whose launcher is SIGKILLed (no handler runs) is killed by the kernel."""
    tied = tmp_path / "tied"
    rank = "import pathlib, sys, time; from star_lightning.parallel import lifetime; lifetime.tie_to_launcher(); "
    rank += "pathlib.Path(sys.argv[1]).touch(); time.sleep(60)"
    launcher = (
        "import os, subprocess, sys, time; os.environ['STAR_LIGHTNING_LAUNCHER_PID'] = str(os.getpid()); "
        f"child = subprocess.Popen([sys.executable, '-c', {rank!r}, {str(tied)!r}], "
        "env={**os.environ, 'LOCAL_RANK': '1'}); print(child.pid, flush=True); time.sleep(60)"
    )
    process = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    child = int(process.stdout.readline())
    deadline = time.monotonic() + 30
    while not tied.exists() and _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.kill()
    process.wait()
    assert tied.exists(), "the rank did not tie itself to its launcher"
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = _alive(child)
    if alive:
        os.kill(child, signal.SIGKILL)
    assert not alive, "the rank outlived its SIGKILLed launcher"


def test_a_hung_rank_ends_the_job_after_the_collective_timeout(tiny_model_dir: Path, tmp_path: Path) -> None:
    process, log_path = _start(tiny_model_dir, tmp_path)
    rank1 = _rank1_pid(process)
    os.kill(rank1, signal.SIGSTOP)  # alive but silent: only the collective timeout can notice
    try:
        log, elapsed = _wait(process, log_path, bound_s=TIMEOUT_S + 45)
    finally:
        if _alive(rank1):
            os.kill(rank1, signal.SIGKILL)
    assert process.returncode == 1, log[-3000:]
    assert elapsed >= TIMEOUT_S - 1, f"ended after {elapsed:.0f} s, before the {TIMEOUT_S} s timeout:\n{log[-3000:]}"
    assert "a collective failed" in log and "Traceback" not in log, log[-3000:]
