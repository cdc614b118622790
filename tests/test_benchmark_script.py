"""scripts/benchmark.py end to end on CPU (2 gloo processes, a 2-layer model): the records the README's tables
are made of. Times on CPU mean nothing here; the test checks the script runs and reports every method."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIELDS = {"method", "hosts", "seq_len", "phase1_s", "ttft_s", "decode_ms_per_token", "total_s", "peak_mem_gib", "gpu"}


@pytest.mark.slow
def test_cpu_smoke_run_reports_every_method_and_host_count(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env = {key: value for key, value in env.items() if not key.startswith(("MASTER_", "SLURM_", "PL_"))}
    command = [sys.executable, str(REPO / "scripts" / "benchmark.py"), "--device", "cpu", "--tiny", "--nprocs", "2",
               "--out", str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records = json.loads((tmp_path / "results.json").read_text())
    assert all(FIELDS <= record.keys() for record in records)
    seen = {(record["method"], record["hosts"], record["seq_len"]) for record in records}
    for length in (256, 512):
        assert ("dense", 1, length) in seen
        for method in ("star", "ring", "star_recompute_anchor"):
            assert {(method, 1, length), (method, 2, length)} <= seen
    star = [r for r in records if r["method"] == "star" and r["hosts"] == 2]
    assert all(r["phase2_bytes"] > 0 and r["phase1_s"] > 0 for r in star)
    assert (tmp_path / "results.md").read_text().count("| star |") == 4
    assert (tmp_path / "results.png").stat().st_size > 0
