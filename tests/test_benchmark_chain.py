"""The whole benchmark chain on CPU: generate -> predict (star and dense) -> score -> results table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from star_lightning.bench.metrics import string_match_all
from star_lightning.bench.results import main as results_main
from star_lightning.cli import main as cli_main
from tokenizer_factory import build_tokenizer

LENGTHS = (384, 512)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight Llama (2 layers, width 32) saved with the small tokenizer, as a user's model folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("chain_model")
    tokenizer = build_tokenizer(directory)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_generate_predict_score_table(tiny_model: Path, tmp_path: Path, capsys) -> None:
    runs = tmp_path / "runs"
    for length in LENGTHS:
        requests = tmp_path / f"niah_{length}.jsonl"
        argv = ["generate", "--benchmark", "ruler", "--task", "niah_single_1", "--tokenizer", str(tiny_model)]
        argv += ["--length", str(length), "--num_samples", "2", "--seed", "0", "--output", str(requests)]
        assert cli_main(argv) == 0
        for attention in ("star", "dense"):
            output = runs / attention / f"niah_{length}.jsonl"
            code = cli_main(
                [
                    "predict", "--model.pretrained", str(tiny_model), "--model.attention", attention,
                    "--model.block_size", "64", "--model.max_new_tokens", "4", "--data.path", str(requests),
                    "--output", str(output), "--trainer.accelerator", "cpu", "--trainer.devices", "1",
                    "--trainer.logger", "false",
                ]
            )  # fmt: skip
            assert code == 0
            predictions = read(output)
            assert sorted(record["index"] for record in predictions) == [0, 1]
            for record in predictions:
                assert isinstance(record["pred"], str)
                assert record["task"] == "niah_single_1" and record["length"] == length
                assert "input_context" not in record and "input_query" not in record

    capsys.readouterr()
    star_file = runs / "star" / f"niah_{LENGTHS[0]}.jsonl"
    assert cli_main(["score", str(star_file)]) == 0
    summary = json.loads(capsys.readouterr().out)
    expected = 100 * sum(string_match_all(r["pred"], r["outputs"]) for r in read(star_file)) / 2
    assert summary["tasks"] == {"niah_single_1": pytest.approx(expected)}
    assert summary["mean"] == pytest.approx(expected)

    out = tmp_path / "table"
    assert results_main(["--dir", str(runs), "--out", str(out)]) == 0
    table = json.loads(out.with_suffix(".json").read_text())
    assert [(row["task"], row["length"]) for row in table["rows"]] == [("niah_single_1", n) for n in LENGTHS]
    for row in table["rows"]:
        assert 0 <= row["star"] <= 100 and 0 <= row["dense"] <= 100 and row["ring"] is None
        assert row["global"] == row["dense"]
    assert out.with_suffix(".md").exists() and out.with_suffix(".png").exists()
