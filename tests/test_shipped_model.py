"""The shipped tiny_lm: it loads offline, and it retrieves, with dense and with Star Attention.

These tests guard the package asset itself (a wrong copy, a broken tokenizer or a model that no longer retrieves
would make every accuracy number in the README meaningless), through the same commands a user runs.
"""

from __future__ import annotations

import contextlib
import io
import json
import string
from pathlib import Path

import pytest

from star_lightning import assets
from star_lightning.assets import DEFAULT_MODEL_DIR, default_model_path
from star_lightning.cli import main

LENGTH = 2048
NUM_REQUESTS = 20


def test_default_model_path_points_at_the_package_folder():
    path = default_model_path()
    assert path == DEFAULT_MODEL_DIR
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert (path / "README.md").is_file()
    total = sum(f.stat().st_size for f in path.iterdir())
    assert total <= 25 * 2**20, f"the shipped model folder is {total / 2**20:.1f} MB (limit 25 MB)"


def test_default_model_path_names_the_missing_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    missing = tmp_path / "no_such_model"
    monkeypatch.setattr(assets, "DEFAULT_MODEL_DIR", missing)
    with pytest.raises(FileNotFoundError, match=str(missing)):
        assets.default_model_path()


def test_loads_offline_and_tokenizes_printable_ascii(monkeypatch: pytest.MonkeyPatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(default_model_path(), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)
    assert model.config.model_type == "llama"
    assert sum(p.numel() for p in model.parameters()) < 6_000_000
    text = string.printable.replace("\r", "").replace("\x0b", "").replace("\x0c", "")  # ASCII + tab + newline
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert len(ids) == len(text)  # one token per character
    assert tokenizer.decode(ids) == text
    assert None not in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)


def _cli(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return out.getvalue()


def _predict(data: Path, output: Path, *extra: str) -> float:
    _cli([
        "predict",
        "--model.pretrained", str(default_model_path()),
        "--model.max_new_tokens", "12",
        "--data.path", str(data),
        "--output", str(output),
        "--trainer.accelerator", "cpu",
        "--trainer.devices", "1",
        "--trainer.enable_progress_bar", "false",
        *extra,
    ])  # fmt: skip
    scores = json.loads(_cli(["score", str(output)]))
    assert scores["counts"]["niah_single_1"] == NUM_REQUESTS
    return scores["tasks"]["niah_single_1"]


@pytest.mark.slow
def test_niah_2k_dense_and_star_through_the_cli(tmp_path: Path):
    data = tmp_path / "niah.jsonl"
    _cli([
        "generate", "--benchmark", "ruler", "--task", "niah_single_1", "--tokenizer", str(default_model_path()),
        "--length", str(LENGTH), "--num_samples", str(NUM_REQUESTS), "--seed", "1234", "--output", str(data),
    ])  # fmt: skip
    dense = _predict(data, tmp_path / "dense.jsonl", "--model.attention", "dense")
    block = str(LENGTH // 4)
    star = _predict(
        data, tmp_path / "star.jsonl", "--model.attention", "star", "--model.block_size", block,
        "--model.anchor_block_size", block,
    )  # fmt: skip
    assert dense >= 80.0, f"dense NIAH accuracy {dense} at {LENGTH} tokens"
    assert abs(star - dense) <= 10.0, f"star (block {block}) {star} vs dense {dense}"
