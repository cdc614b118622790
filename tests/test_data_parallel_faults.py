"""Data-parallel groups (``--trainer.strategy.context_parallel_size 1`` on 2 processes) as real processes: a group with
no request waits and the job exits 0; SIGTERM to one rank stops the job after the requests in flight, exit 143, one
line (issue 27, bugs 7 and 9)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from slurm_cluster import STAR_LIGHTNING, cli_env, predict_args, read_indices, wait_for_lines, write_requests

DATA_PARALLEL = ("--trainer.devices", "2", "--trainer.strategy.context_parallel_size", "1", "--trainer.logger", "false")


def _run(model: Path, tmp_path: Path, requests: Path, *extra: str) -> subprocess.Popen[str]:
    args = predict_args(model, requests, tmp_path / "out.jsonl", *DATA_PARALLEL, *extra)
    log = (tmp_path / "job.log").open("w")
    return subprocess.Popen(
        [str(STAR_LIGHTNING), *args], cwd=tmp_path, env=cli_env(), stdout=log, stderr=subprocess.STDOUT, text=True
    )


def test_sigterm_to_one_rank_of_a_data_parallel_job_stops_it_with_143_and_one_line(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    requests = write_requests(tmp_path / "requests.jsonl", 40)
    process = _run(tiny_model_dir, tmp_path, requests, "--model.max_new_tokens", "40")
    wait_for_lines(tmp_path / "out.jsonl", 2, process, timeout_s=180)
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    ranks = [int(pid) for pid in children if b"predict" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(ranks) == 1, ranks
    os.kill(ranks[0], signal.SIGTERM)  # rank 1 alone
    start = time.monotonic()
    try:
        code = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    log = (tmp_path / "job.log").read_text()
    assert code == 128 + signal.SIGTERM, log[-3000:]
    stops = [line for line in log.splitlines() if "received SIGTERM: stopped after writing the current request" in line]
    assert len(stops) == 1, log[-3000:]
    assert "zombies" not in log and "Traceback" not in log, log[-3000:]
    assert time.monotonic() - start < 120
    indices = read_indices(tmp_path / "out.jsonl")
    assert len(indices) == len(set(indices)) < 40


def test_a_data_parallel_group_with_no_request_waits_and_the_job_exits_0(tiny_model_dir: Path, tmp_path: Path) -> None:
    """One request on 2 processes of dense attention, from a config file: the context-parallel size follows the
    attention (1, not given), the second group has nothing to do and waits; and the console of a config-file run has
    no seed lines and one weights bar (not one per rank)."""
    requests = write_requests(tmp_path / "requests.jsonl", 1, filler=2)
    config = tmp_path / "dense.yaml"
    config.write_text("model:\n  attention: dense\n  max_new_tokens: 4\ntrainer:\n  devices: 2\n  logger: false\n")
    args = predict_args(tiny_model_dir, requests, tmp_path / "out.jsonl", "--config", str(config))
    log = (tmp_path / "job.log").open("w")
    process = subprocess.Popen([str(STAR_LIGHTNING), *args], cwd=tmp_path, env=cli_env(), stdout=log, stderr=log)
    assert process.wait(timeout=240) == 0, (tmp_path / "job.log").read_text()[-3000:]
    text = (tmp_path / "job.log").read_text()
    assert "Traceback" not in text, text[-3000:]
    assert "2 process(es) on cpu, 1 host(s) per request" in text, text[-3000:]
    assert read_indices(tmp_path / "out.jsonl") == [0]
    assert "Seed set" not in text and "seed set" not in text, text[-3000:]
    assert text.count("Loading weights: 100%") == 1, text[-3000:]
