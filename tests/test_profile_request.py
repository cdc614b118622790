"""scripts/profile_request.py on CPU (the tiny shape): one record per variant with every phase's median, and the
profiler's table written beside the JSON. Times on CPU mean nothing; the records and files are checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from script_loader import load_script


def _script():
    return load_script("profile_request")


def test_the_script_writes_a_record_and_a_table_per_variant(tmp_path: Path) -> None:
    script = _script()
    out = tmp_path / "profile"
    argv = ["--shape", "tiny", "--device", "cpu", "--length", "400", "--block-size", "96", "--requests", "3",
            "--new-tokens", "3", "--out", str(out)]  # fmt: skip
    assert script.main(argv) == 0
    payload = json.loads((out / "profile.json").read_text())
    assert payload["weights"].startswith("random") and payload["device"] == "cpu"
    assert [r["label"] for r in payload["records"]] == ["star_eager", "dense"]
    for record in payload["records"]:
        assert record["phase1_s"] > 0 and record["decode_ms_per_token"] > 0 and record["block_replays"] == 0
        assert record["stores_reused"] == 3  # every request after the first took the last one's buffers
        table = (out / f"profile_{record['label']}.txt").read_text()
        assert "star_lightning/phase1" in table and table.startswith("kernel launches 0")


def test_graphs_on_a_cpu_are_refused_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        _script().parse_args(["--device", "cpu", "--prefill", "graph"])
    assert stopped.value.code == 2
    assert "--prefill graph captures CUDA graphs" in capsys.readouterr().err
