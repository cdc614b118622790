"""``star-lightning tune``: end to end on the shipped model on CPU (2 candidates, 10 requests) it writes a config that
``predict --config`` runs and a table of every candidate; the pick is the fastest whose LOWER bound reaches the
target; bad values are one line, exit 2, before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from star_lightning.cli import main
from star_lightning.tune.candidates import default_candidates, nearest_target, parse_candidate, pick
from star_lightning.tune.command import NONE_QUALIFIES


def test_candidates_and_the_pick() -> None:
    assert default_candidates(4) == ["star_L/4", "aq_L/4", "star_L/8", "star_L/8_a/4", "star_L/8_w/4", "aq_L/8",
                                     "aq+pt_L/8"]  # fmt: skip
    candidate = parse_candidate("aq+pt_L/8_a/4")
    assert candidate.model_options(16000, 4) == {"attention": "star", "block_size": 2000, "anchor_block_size": 500,
                                                 "anchor_query": True, "passing_tokens": 62}  # fmt: skip
    assert parse_candidate("star_L/8_w/4").model_options(16000, 4) == {
        "attention": "star",
        "block_size": 2000,
        "anchor_block_size": 2000,
        "lookback_tokens": 500,
    }
    table = [
        {"name": "fast_but_unsure", "qualifies": False, "predicted_ttft_s": 0.1},
        {"name": "slow", "qualifies": True, "predicted_ttft_s": 0.5},
        {"name": "fast", "qualifies": True, "predicted_ttft_s": 0.3},
    ]
    assert pick(table, 0.98)["name"] == "fast"
    assert pick(table[:1], 0.98) is None
    assert NONE_QUALIFIES == 3


def test_the_target_that_would_pick_something_on_a_real_table() -> None:
    """Session 32's H100 table (Qwen2.5-Coder-0.5B, 16K, 4 hosts): nothing keeps 0.98 at its lower bound; the
    highest lower bound is aq_L/4's 86.52%, so 0.86 picks it; at 0.80 four candidates qualify and the fastest,
    aq_L/8 (0.0587 s), is taken."""
    table = json.loads(Path("benchmarks/tune/qwen2.5-coder-0.5b_16384_h100x4.json").read_text())["candidates"]
    assert pick(table, 0.98) is None and not any(row["qualifies"] for row in table)
    target, chosen = nearest_target(table)
    assert target == 0.86 and chosen["name"] == "aq_L/4"
    at_80 = [{**row, "qualifies": row["share_of_dense"]["low"] >= 80.0} for row in table]
    assert sorted(row["name"] for row in at_80 if row["qualifies"]) == ["aq+pt_L/8", "aq_L/4", "aq_L/8", "star_L/4"]
    assert pick(at_80, 0.80)["name"] == "aq_L/8"
    # A faster candidate within the same whole percent is the one the suggested target picks.
    faster = {**table[0], "name": "faster", "predicted_ttft_s": 0.01, "share_of_dense": {"low": 86.1}}
    assert nearest_target([*table, faster])[1]["name"] == "faster"
    assert nearest_target([{**row, "fits": False} for row in table]) is None
    assert nearest_target([{"name": "x", "fits": True, "share_of_dense": {"low": 0.4}}]) is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--target", "1.5"], "--target 1.5: give a share of dense in (0, 1]"),
        (["--samples", "0"], "--samples 0: give a positive number"),
        (["--candidates", "star_L/0"], "--candidates star_L/0: not a candidate name"),
        (["--candidates", "star_L/8_w/0"], "--candidates star_L/8_w/0: not a candidate name"),
        (["--candidates", "aq+pt_L/8_w/4"], "not with aq+pt"),
        (["--ruler", "niah_single_1"], "one of the two"),
        (["--output", "tuned.txt"], "give a .yaml file"),
    ],
)
def test_bad_values_are_one_line_exit_2(extra: list[str], message: str, tmp_path: Path, capsys) -> None:
    data = tmp_path / "req.jsonl"
    data.write_text(json.dumps({"input_context": "a b c", "input_query": "q?", "index": 0}) + "\n")
    args = ["tune", "--data.path", str(data), "--output", str(tmp_path / "tuned.yaml"), "--gpu", "H100", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "tuned.yaml").exists()


@pytest.mark.slow
def test_tune_writes_a_config_predict_runs(tmp_path: Path, capsys) -> None:
    requests = tmp_path / "req.jsonl"
    assert main(["generate", "--benchmark", "ruler", "--task", "niah_single_1", "--length", "1024", "--num_samples",
                 "10", "--output", str(requests)]) == 0  # fmt: skip
    tuned = tmp_path / "tuned.yaml"
    args = ["tune", "--data.path", str(requests), "--samples", "10", "--candidates", "star_L/2", "aq_L/4_w/2", "--gpu",
            "H100", "--trainer.devices", "2", "--device", "cpu", "--target", "0.5", "--output", str(tuned)]  # fmt: skip
    status = main(args)
    err = capsys.readouterr().err
    assert "tune: [2/2] aq_L/4_w/2" in err and "share of dense" in err
    table = json.loads(Path(f"{tuned}.json").read_text())
    assert [row["name"] for row in table["candidates"]] == ["star_L/2", "aq_L/4_w/2"] and table["hosts"] == 2
    wider = table["candidates"][1]["model"]
    assert wider["lookback_tokens"] == wider["block_size"] // 2  # _w/2: a lookback of half a block
    for row in table["candidates"]:
        assert row["share_of_dense"]["n"] == 10 and row["share_of_dense"]["method"] == "paired bootstrap"
        assert row["predicted_ttft_s"] > 0
        assert row["qualifies"] == (row["share_of_dense"]["low"] >= 50.0)
    # A target none meets: exit 3, the table kept, and the one line names the target that picks something. The
    # rerun over the same work (the candidates short of 100% only) predicts nothing again.
    short = [row for row in table["candidates"] if row["fits"] and row["share_of_dense"]["low"] < 100.0]
    if short:
        names = [row["name"] for row in short]
        strict = ["tune", "--data.path", str(requests), "--samples", "10", "--candidates", *names, "--gpu", "H100",
                  "--trainer.devices", "2", "--device", "cpu", "--target", "1.0", "--output",
                  str(tmp_path / "strict.yaml"), "--work", f"{tuned}.work"]  # fmt: skip
        capsys.readouterr()
        assert main(strict) == NONE_QUALIFIES and not (tmp_path / "strict.yaml").exists()
        err = capsys.readouterr().err
        near = nearest_target(short)
        assert near is not None and f"--target {near[0]:g} picks {near[1]['name']}" in err
        assert err.count("0 of 10 requests to run") == 1 + len(short)  # dense and each candidate resumed
    expected = pick(table["candidates"], 0.5)
    if expected is None:
        assert status == NONE_QUALIFIES and not tuned.exists()
        return
    assert status == 0 and table["chosen"] == expected["name"]
    config = yaml.safe_load(tuned.read_text())["model"]
    assert config["attention"] == "star" and config["block_size"] == expected["model"]["block_size"]
    # Resumable: a rerun predicts nothing again and picks the same.
    assert main(args) == 0 and json.loads(Path(f"{tuned}.json").read_text())["chosen"] == expected["name"]
    out = tmp_path / "pred.jsonl"
    assert main(["predict", "--config", str(tuned), "--data.path", str(requests), "--data.limit", "2", "--output",
                 str(out), "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.logger", "false",
                 "--trainer.enable_progress_bar", "false"]) == 0  # fmt: skip
    assert len(out.read_text().splitlines()) == 2
