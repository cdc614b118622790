"""Launcher variables left in the environment (a notebook, another launcher) that contradict the command, or are no
numbers, are one line naming them, exit 2, before any run record or lock is written (issue 27, bug 8)."""

from __future__ import annotations

from pathlib import Path

import pytest

from slurm_cluster import predict_args, write_requests
from star_lightning.cli import main
from star_lightning.options import check_launch_environment


@pytest.mark.parametrize(
    ("variables", "devices", "expected"),
    [
        ({"LOCAL_RANK": "1"}, "1", "LOCAL_RANK=1 (--trainer.devices 1 has local ranks 0-0)"),
        ({"LOCAL_RANK": "0"}, "2", "LOCAL_RANK=0 without MASTER_PORT"),
        ({"LOCAL_RANK": "0", "MASTER_PORT": "29500", "WORLD_SIZE": "4"}, "2", "WORLD_SIZE=4 (the command makes 2"),
        ({"NODE_RANK": "1"}, "1", "NODE_RANK=1 (--trainer.num_nodes 1 has node ranks 0-0)"),
        ({"NODE_RANK": "abc"}, "1", "the environment variable NODE_RANK='abc' is not a number"),
        ({"MASTER_PORT": "http"}, "2", "MASTER_PORT='http' is not a port number"),
    ],
)
def test_launcher_variables_that_contradict_the_command_are_one_line_before_any_record(
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variables: dict[str, str],
    devices: str,
    expected: str,
) -> None:
    requests = write_requests(tmp_path / "requests.jsonl", 1, filler=2)
    output = tmp_path / "out.jsonl"
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    args = predict_args(tiny_model_dir, requests, output, "--trainer.devices", devices, "--trainer.logger", "false")
    assert main(args) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("star-lightning predict: error: "), lines
    assert expected in lines[0], lines[0]
    assert "unset" in lines[0], lines[0]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["requests.jsonl"]


def test_a_real_launch_is_let_through() -> None:
    """What Lightning's own launcher gives its ranks, and what torchrun gives them, pass."""
    lightning = {"LOCAL_RANK": "1", "NODE_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "x", "MASTER_PORT": "29500"}
    check_launch_environment(2, 1, lightning)
    torchrun = {"LOCAL_RANK": "0", "RANK": "0", "GROUP_RANK": "0", "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "2"}
    check_launch_environment("auto", 1, {**torchrun, "TORCHELASTIC_RUN_ID": "1", "MASTER_PORT": "29500"})
    check_launch_environment(1, 1, {"SLURM_NTASKS": "4", "SLURM_JOB_NAME": "job", "LOCAL_RANK": "3"})
    check_launch_environment(1, 1, {})
