"""An output never mixes runs (issue 17), with real 1- and 2-process predict jobs on one output.

A resume after a setting that decides predictions is refused (one line naming old -> new), leaving the requests,
the predictions and the run record byte-identical; after settings that cannot change a prediction (hosts,
kernels, decode mode) it resumes; ``--overwrite true`` starts over. A second job on a running job's output is
refused naming the holder; Ctrl-C stops a 2-process job with exit code 130 and a resume hint, after the requests
in flight are written, and the rerun writes every request exactly once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from slurm_cluster import (
    STAR_LIGHTNING,
    assert_one_error_line,
    cli_env,
    predict_args,
    read_indices,
    run_all,
    run_cli,
    wait_for_lines,
    write_requests,
)
from star_lightning.cli import main

STAR = ("--model.block_size", "32", "--model.anchor_block_size", "16")


def _files(*paths: Path) -> dict[Path, bytes | None]:
    return {path: path.read_bytes() if path.exists() else None for path in paths}


def test_resume_refuses_other_settings_resumes_exact_ones_and_overwrite_starts_over(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Runs as processes where they start ranks or are the issue's own rows (another block size, regenerated
    requests); the other steps run in this process (``main``), which saves seconds of imports each."""
    monkeypatch.chdir(tmp_path)  # lightning_logs/ of the in-process runs too
    requests = write_requests(tmp_path / "requests.jsonl", 4, filler=3)
    output = tmp_path / "out.jsonl"
    record = tmp_path / "out.jsonl.run.json"
    one = ("--trainer.devices", "1")

    def job(data: Path, out: Path, *extra: str) -> list[str]:
        return [*predict_args(tiny_model_dir, data, out, *STAR, "--model.max_new_tokens", "4"), *extra]

    def in_process(args: list[str]) -> subprocess.CompletedProcess[str]:
        capsys.readouterr()
        code = main(args)
        return subprocess.CompletedProcess(args, code, "", capsys.readouterr().err)

    assert in_process(job(requests, output, *one, "--data.limit", "2")).returncode == 0
    assert read_indices(output) == [0, 1]
    assert len(list((tmp_path / "lightning_logs" / "predict").iterdir())) == 1  # one version for the run

    regenerated = tmp_path / "regenerated.jsonl"
    regenerated.write_text(requests.read_text().replace("magic number is 3", "magic number is 33"))

    def copy_of_output(name: str, *, with_record: bool = True) -> Path:
        """The output (and its record) copied, so the refused runs can run at once (each takes its output's lock)."""
        copy = tmp_path / f"{name}.jsonl"
        shutil.copy(output, copy)
        if with_record:
            shutil.copy(record, tmp_path / f"{name}.jsonl.run.json")
        return copy

    as_processes = {
        "block_size": (job(requests, copy_of_output("a"), *one, "--model.block_size", "64"), ("block_size 32 -> 64",)),
        "requests": (job(regenerated, copy_of_output("b"), *one), ("request file", str(requests), str(regenerated))),
    }
    here = {
        "attention": (job(requests, copy_of_output("c"), *one, "--model.attention", "dense"), ("star -> dense",)),
        # As an older version, or a person, would have left it.
        "no_record": (job(requests, copy_of_output("d", with_record=False), *one), ("but no run record",)),
    }
    watched = (requests, regenerated, *sorted(tmp_path.glob("[abcd].jsonl*")))
    before = _files(*watched)
    results = run_all([(args, tmp_path) for args, _ in as_processes.values()])
    results += [in_process(args) for args, _ in here.values()]
    for (_, words), result in zip([*as_processes.values(), *here.values()], results, strict=True):
        assert_one_error_line(result, *words, "another --output", "--overwrite true")
    assert _files(*watched) == before
    assert len(list((tmp_path / "lightning_logs" / "predict").iterdir())) == 1  # refused runs log nothing

    # Two hosts instead of one, another kernel, eager decoding: the same predictions, so the run resumes.
    exact = ["--trainer.devices", "2", "--model.backend", "math", "--model.decode", "eager"]
    resumed = run_cli(job(requests, output, *exact), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "2 of 4 requests to run; 2 already in" in resumed.stderr
    assert sorted(read_indices(output)) == [0, 1, 2, 3]
    assert output.read_bytes().startswith((tmp_path / "a.jsonl").read_bytes())  # the first run's lines stay

    # --overwrite true with a changed setting: the old predictions go, the new run's record replaces the old.
    assert in_process(job(requests, output, *one, "--model.block_size", "64", "--overwrite", "true")).returncode == 0
    assert sorted(read_indices(output)) == [0, 1, 2, 3]
    assert json.loads(record.read_text())["prediction_settings"]["block_size"] == 64
    assert not (tmp_path / "out.jsonl.lock").exists()


def _start(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    """A predict job in its own session, as a terminal's foreground job (Ctrl-C signals all its processes)."""
    return subprocess.Popen(
        [str(STAR_LIGHTNING), *args],
        cwd=cwd,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def test_one_writer_per_output_and_ctrl_c_stops_with_130_and_resumes(tiny_model_dir: Path, tmp_path: Path) -> None:
    count = 16
    requests = write_requests(tmp_path / "requests.jsonl", count)
    output = tmp_path / "out.jsonl"
    args = predict_args(tiny_model_dir, requests, output, "--model.max_new_tokens", "40", "--trainer.logger", "false")
    job = _start([*args, "--trainer.devices", "2"], tmp_path)
    try:
        wait_for_lines(output, 1, job, timeout_s=120)
        os.killpg(job.pid, signal.SIGSTOP)  # the first job holds still (and holds its lock) while the second tries
        second = run_cli([*args, "--trainer.devices", "1"], tmp_path)
        os.killpg(job.pid, signal.SIGCONT)
        assert_one_error_line(second, "being written by another", f"host {socket.gethostname()}", f"pid {job.pid}")

        os.killpg(job.pid, signal.SIGINT)  # Ctrl-C: both ranks finish the request in flight, write it, stop
        _, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 130, err[-3000:]
    assert "received SIGINT: stopped after writing the current request" in err
    assert "rerun the same command to resume" in err
    written = read_indices(output)
    assert 1 <= len(written) < count and len(set(written)) == len(written)

    rerun = run_cli([*args, "--trainer.devices", "1"], tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    counts = Counter(read_indices(output))
    assert sorted(counts) == list(range(count)) and max(counts.values()) == 1, counts
    assert not (tmp_path / "out.jsonl.lock").exists()
