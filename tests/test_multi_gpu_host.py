"""A host of several GPUs (``gpus_per_host``): the model's layers spread over them give what one GPU gives.

Needs 2 CUDA GPUs and the ``multi-gpu`` extra (accelerate); skipped elsewhere with the reason.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from star_lightning.cli import main
from star_lightning.engine.forward import model_devices
from star_lightning.engine.request import generate
from star_lightning.engine.settings import GenerationSettings, StarSettings
from star_lightning.models import load_model
from star_lightning.parallel.group import SingleHostGroup

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
    pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="needs accelerate (the multi-gpu extra)"),
]


def _request(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    context = torch.randint(3, 90, (1, 300), generator=generator)  # [1, 300]
    query = torch.randint(3, 90, (1, 6), generator=generator)  # [1, 6]
    return context.to(device), query.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16 decodes with the Triton kernel
@pytest.mark.parametrize("attention", ["star", "dense"])
def test_layers_over_two_gpus_give_the_tokens_of_one(tiny_model_dir: Path, attention: str, dtype: torch.dtype) -> None:
    star = StarSettings(attention=attention, block_size=64, decode="eager")
    settings = GenerationSettings(max_new_tokens=8)
    results = {}
    for gpus in (1, 2):
        devices = [torch.device("cuda", i) for i in range(gpus)]
        model = load_model(str(tiny_model_dir), dtype=dtype, devices=devices, attention=attention)
        assert len(model_devices(model)) == gpus
        with torch.no_grad():
            results[gpus] = generate(model, *_request(devices[0]), SingleHostGroup(), star, settings)
    assert results[2].token_ids == results[1].token_ids
    assert results[2].stats.peak_mem_bytes > 0


def test_cli_with_gpus_per_host_two(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "in.jsonl"
    rows = [{"input_context": "The grass is green. " * 40 + f"The number is {i}.", "input_query": " Number?"}
            for i in range(3)]  # fmt: skip
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    outputs = {}
    for gpus in ("1", "2"):
        output = tmp_path / f"out{gpus}.jsonl"
        args = ["predict", "--model.pretrained", str(tiny_model_dir), "--model.block_size", "64",
                "--model.dtype", "bfloat16", "--model.decode", "eager", "--model.max_new_tokens", "6",
                "--data.path", str(data), "--output", str(output), "--trainer.accelerator", "gpu",
                "--trainer.devices", "1",
                "--trainer.strategy.gpus_per_host", gpus, "--trainer.logger", "false"]  # fmt: skip
        assert main(args) == 0
        outputs[gpus] = [json.loads(line)["pred"] for line in output.read_text().splitlines()]
    assert outputs["2"] == outputs["1"]
