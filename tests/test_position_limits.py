"""``generate`` and ``plan`` refuse a length beyond the positions the model can place, as ``predict`` refuses such a
request: at once (exit 2, one line naming the length, the limit and the fix), before any work."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from star_lightning.cli import main


def test_generate_refuses_a_length_the_tokenizers_model_cannot_place(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "requests.jsonl"
    start = time.monotonic()
    args = ["generate", "--benchmark", "ruler", "--task", "niah_single_1", "--num_samples", "2"]
    args += ["--output", str(output)]
    code = main([*args, "--length", "100000000"])
    elapsed = time.monotonic() - start
    lines = capsys.readouterr().err.splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert "--length 100000000" in lines[0] and "8192 positions" in lines[0] and "--length 8192 or less" in lines[0]
    assert elapsed < 30 and not output.exists()
    assert main([*args, "--length", "8192"]) == 0  # the limit itself is fine


def test_plan_refuses_a_request_predict_would_refuse(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["plan", "--length", "100000", "--gpu", "H100"])  # the shipped model: 8192 positions
    lines = capsys.readouterr().err.splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert "--length 100000" in lines[0] and "more than the 8192 the model can place" in lines[0]
    assert "lower --length to 8032 or less" in lines[0]  # 8192 - 128 query - 32 new tokens
    assert main(["plan", "--length", "8032", "--gpu", "H100"]) == 0
