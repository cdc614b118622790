"""``sbatch slurm/predict.sh`` on a real one-node SLURM cluster (CPU tasks, gloo), as on a GPU cluster."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from slurm_cluster import REPO, STAR_LIGHTNING, SlurmCluster, predict_args, read_indices, slurm_cluster, write_requests

pytestmark = pytest.mark.slurm
__all__ = ["slurm_cluster"]  # the fixture, imported so pytest finds it

SCRIPT = REPO / "slurm" / "predict.sh"
CPU_OPTIONS = ("--gpus-per-node=0", "--cpus-per-task=1", "--time=5", "--nodes=1")


def _sbatch(cluster: SlurmCluster, workdir: Path, options: list[str], args: list[str]) -> tuple[str, str]:
    """Submit with ``--wait``; returns (job id, the job's output file's text)."""
    output = workdir / "job.out"
    result = subprocess.run(
        ["sbatch", "--parsable", "--wait", f"--chdir={workdir}", f"--output={output}", *options, str(SCRIPT), *args],
        env=cluster.env(STAR_ACCELERATOR="cpu", STAR_LIGHTNING=str(STAR_LIGHTNING)),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    text = output.read_text() if output.exists() else ""
    assert result.returncode == 0, f"sbatch failed (rc={result.returncode}): {result.stderr}\njob output:\n{text}"
    return result.stdout.strip().split(";")[0], text


def _scalars(log_dir: Path) -> dict[str, dict[int, list[float]]]:
    """Every scalar of the TensorBoard event files under ``log_dir``, read back with tensorboard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = {path.parent for path in log_dir.rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    scalars: dict[str, dict[int, list[float]]] = {}
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            scalars.setdefault(tag, {}).setdefault(event.step, []).append(event.value)
    return scalars


def test_sbatch_two_by_two_groups_split_the_requests_and_log_them(
    slurm_cluster: SlurmCluster, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """4 tasks as 2 data-parallel groups of 2 hosts: Lightning takes the ranks and the world from SLURM, every
    request is written once, each by one group, all logged, and the job ends cleanly in SLURM's accounting."""
    count = 7  # odd: the groups get 4 and 3 requests, and no request is repeated to even them out
    data = write_requests(tmp_path / "requests.jsonl", count)
    output = tmp_path / "predictions.jsonl"
    args = predict_args(tiny_model_dir, data, output, "--trainer.strategy.context_parallel_size", "2",
                        "--trainer.strategy.timeout_s", "60")[1:]  # fmt: skip
    args = [arg for arg in args if arg not in ("--trainer.accelerator", "cpu")]
    start = time.monotonic()
    job, text = _sbatch(slurm_cluster, tmp_path, [*CPU_OPTIONS, "--ntasks-per-node=4"], args)
    indices = read_indices(output)
    assert sorted(indices) == list(range(count)), text
    # The sizes the script derived from the allocation, and the ranks Lightning took from SLURM.
    assert "1 node(s) x 4 task(s), accelerator cpu" in text
    assert "Initializing distributed: GLOBAL_RANK: 3, MEMBER: 4/4" in text
    accounting = slurm_cluster.run("scontrol", "show", "job", job).stdout
    assert "ExitCode=0:0" in accounting, accounting
    assert time.monotonic() - start < 110
    scalars = _scalars(tmp_path / "lightning_logs")
    groups = scalars["request/data_parallel_group"]
    assert sorted(groups) == list(range(count)) and all(len(values) == 1 for values in groups.values())
    served = {group: {step for step, values in groups.items() if values[0] == group} for group in (0.0, 1.0)}
    assert served[0.0] and served[1.0] and not served[0.0] & served[1.0]
    for step in range(count):
        # The two hosts of a group hold disjoint blocks that make up the whole context.
        local = scalars["host0/local_context_tokens"][step][0] + scalars["host1/local_context_tokens"][step][0]
        assert local == scalars["request/context_tokens"][step][0]
        assert scalars["request/phase2_bytes"][step][0] > 0  # the Phase 2 merge moved partials between hosts
        assert scalars["request/phase1_s"][step][0] > 0 and scalars["request/peak_mem_gib"][step][0] > 0
        assert 0 < scalars["request/new_tokens"][step][0] <= 8


def test_sbatch_outside_slurm_explains_how_to_submit() -> None:
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert "submit it with sbatch" in result.stderr
