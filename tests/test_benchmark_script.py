"""scripts/benchmark.py end to end on CPU with a 2-layer model: simulated hosts on one process, real hosts on two
(gloo, through the project's Fabric strategy), K queries on one context. Times on CPU mean nothing here; the test
checks the records the README's tables are made of: every method, layout and host count, and their fields."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIELDS = {"method", "anchor_source", "ring_layout", "hosts", "seq_len", "block_size", "anchor_block_size", "phase1_s",
          "phase1_host_s", "phase1_bytes", "ttft_s", "decode_ms_per_token", "total_s", "peak_mem_gib", "simulated",
          "gpu", "phase1_floor_s", "decode_floor_ms", "predicted_ttft_s", "predicted_peak_gib", "anchor_query",
          "passing_tokens", "predicted_phase1_bytes"}  # fmt: skip


def _run(tmp_path: Path, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env = {key: value for key, value in env.items() if not key.startswith(("MASTER_", "SLURM_", "PL_"))}
    command = [sys.executable, str(REPO / "scripts" / "benchmark.py"), "--device", "cpu", "--tiny", "--out",
               str(tmp_path), *args]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "results.md").stat().st_size > 0 and (tmp_path / "results.png").stat().st_size > 0
    return json.loads((tmp_path / "results.json").read_text())


@pytest.mark.slow
def test_simulated_hosts_report_every_method_layout_and_host(tmp_path: Path) -> None:
    payload = _run(tmp_path, "--simulate-hosts", "2,4,1", "--block-size", "64", "--anchor-sizes", "64,16",
                   "--anchor-sources", "broadcast,host,block", "--queries-per-context", "1,3")  # fmt: skip
    records = [r for r in payload["records"] if "queries_per_context" not in r]
    assert all(FIELDS <= r.keys() for r in records)
    seen = {(r["method"], r["anchor_source"], r["ring_layout"], r["hosts"], r["seq_len"], r["anchor_block_size"])
            for r in records}  # fmt: skip
    assert ("star", "host", None, 1, 64, 0) in seen  # a one-host plan (one block, no anchor): the decode sweep
    for hosts in (2, 4):
        length = hosts * 64
        for source in ("broadcast", "host", "block"):
            assert {("star", source, None, hosts, length, 64), ("star", source, None, hosts, length, 16)} <= seen
        assert {
            ("ring", None, "zigzag", hosts, length, None),
            ("ring", None, "contiguous", hosts, length, None),
        } <= seen
        assert ("dense", None, None, 1, length, None) in seen
    for r in records:
        assert r["simulated"] == (r["method"] != "dense")
        if r["simulated"]:
            assert len(r["phase1_host_s"]) == r["hosts"] and all(t > 0 for t in r["phase1_host_s"])
            assert r["phase1_s"] == max(r["phase1_host_s"])
        # Only the anchor broadcast (host 0) and the ring send in Phase 1.
        sends = r["hosts"] > 1 and (
            (r["method"] == "star" and r["anchor_source"] == "broadcast") or r["method"] == "ring"
        )
        assert (r["phase1_bytes"] > 0) == sends
    reuse = {r["queries_per_context"]: r for r in payload["records"] if "queries_per_context" in r}
    assert sorted(reuse) == [1, 3]
    assert reuse[3]["total_s"] > reuse[1]["total_s"] and reuse[3]["goal_total_over_single"] == pytest.approx(1.3)


@pytest.mark.slow
def test_real_hosts_through_the_fabric_strategy(tmp_path: Path) -> None:
    payload = _run(tmp_path, "--nprocs", "2", "--lengths", "200", "--block-size", "50", "--methods", "star,ring",
                   "--anchor-sources", "broadcast,host")  # fmt: skip
    records = payload["records"]
    assert {(r["method"], r["anchor_source"] or r["ring_layout"]) for r in records} == {
        ("star", "broadcast"),
        ("star", "host"),
        ("ring", "zigzag"),
        ("ring", "contiguous"),
    }
    for r in records:
        assert not r["simulated"] and r["hosts"] == 2 and FIELDS <= r.keys()
        assert len(r["phase1_host_s"]) == 2
    tokens = {r["method"] + str(r["anchor_source"]): r["tokens"] for r in records if r["method"] == "star"}
    assert tokens["starbroadcast"] == tokens["starhost"]  # the anchor's source changes no token


def test_query_aware_records_count_their_bytes(tmp_path: Path) -> None:
    """The query in the anchor and passing tokens beside plain star: the bytes each host sent (the prefix broadcast
    with the query and the selection queries, every host's passing all-gathers) are what the cost model predicts."""
    payload = _run(tmp_path, "--simulate-hosts", "4", "--block-size", "64", "--anchor-sizes", "64,16",
                   "--anchor-sources", "broadcast,host", "--methods", "star", "--query-aware", "star,aq,aq+pt",
                   "--passing-tokens", "4", "--query-tokens", "8", "--new-tokens", "2", "--no-warmup")  # fmt: skip
    records = {(r["anchor_source"], r["anchor_block_size"], r["anchor_query"], r["passing_tokens"]): r
               for r in payload["records"]}  # fmt: skip
    for source in ("broadcast", "host"):
        for anchor in (64, 16):
            plain, query, passing = (records[(source, anchor, q, p)] for q, p in ((False, 0), (True, 0), (True, 4)))
            for r in (plain, query, passing):
                assert FIELDS <= r.keys() and r["phase1_bytes"] == r["predicted_phase1_bytes"]
            if source == "broadcast":  # the prefix grows by the query's K/V
                assert plain["phase1_bytes"] < query["phase1_bytes"] < passing["phase1_bytes"]
            else:
                assert plain["phase1_bytes"] == query["phase1_bytes"] == 0 < passing["phase1_bytes"]
