"""Tensor parallelism inside a host, with real processes (gloo): 2 hosts x 2 GPUs give the tokens of 2 hosts x 1.

The heads are split by the model's own transformers plan; Star Attention's Phase 1 (the anchor broadcast per head
shard), Phase 2's merge per head shard and the ring run unchanged on each shard, and one rank writes each prediction.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from star_lightning.cli import main
from star_lightning.errors import ConfigurationError

FAMILIES = ("llama", "olmo2")  # heads split; q and k gathered (OLMo-2 normalizes them over all heads)

CONTEXT = "The grass is green. The sky is blue. " * 8 + "The secret code is 4711. " + "Birds sing. " * 6


def _args(model: Path, data: Path, output: Path, devices: int, tp: int, *extra: str) -> list[str]:
    return ["predict", "--model.pretrained", str(model), "--model.max_new_tokens", "6", "--model.dtype", "float32",
            "--model.block_size", "48", "--model.anchor_block_size", "24", "--data.path", str(data),
            "--output", str(output), "--trainer.accelerator", "cpu", "--trainer.devices", str(devices),
            "--trainer.strategy.context_parallel_size", "2", "--trainer.strategy.tensor_parallel_size", str(tp),
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", *extra]  # fmt: skip


def _run(model: Path, data: Path, output: Path, devices: int, tp: int, *extra: str) -> subprocess.CompletedProcess:
    args = _args(model, data, output, devices, tp, *extra)
    launch = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")
    env = {k: v for k, v in os.environ.items() if k not in launch and not k.startswith("PL_")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "star_lightning", *args], cwd=output.parent, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def _preds(path: Path) -> dict[int, str]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == len({row["index"] for row in rows}), "a prediction was written twice"
    return {row["index"]: row["pred"] for row in rows}


@pytest.mark.slow
def test_two_hosts_of_two_tensor_shards_write_what_two_hosts_write(tiny_model_dir: Path, tmp_path: Path) -> None:
    rows = [{"input_context": CONTEXT + f" Item {i}.", "input_query": " What is the code?", "index": i}
            for i in range(2)]  # fmt: skip
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    for method in ("star",):  # the ring over tensor shards: test_hosts_of_tensor_shards_compute_what_whole_hosts_do
        reference, sharded = tmp_path / f"{method}_tp1.jsonl", tmp_path / f"{method}_tp2.jsonl"
        # One host, one GPU (in this process): star's blocks do not depend on the host count, ring is exact.
        one = _args(tiny_model_dir, data, reference, 1, 1, "--model.attention", method)
        one[one.index("--trainer.strategy.context_parallel_size") + 1] = "1"
        assert main(one) == 0
        two = _run(tiny_model_dir, data, sharded, 4, 2, "--model.attention", method)
        assert two.returncode == 0, two.stderr[-3000:]
        assert _preds(sharded) == _preds(reference) and sorted(_preds(sharded)) == [0, 1]


def test_a_layout_that_cannot_split_the_heads_is_refused_before_weights_load(tiny_model_dir: Path) -> None:
    from transformers import AutoConfig, LlamaForCausalLM

    from star_lightning.parallel.tensor_parallel import check_tensor_parallel

    config = AutoConfig.from_pretrained(tiny_model_dir)  # 4 attention heads, 2 key/value heads
    check_tensor_parallel(config, LlamaForCausalLM, 2)
    with pytest.raises(ConfigurationError, match="does not divide the model's key/value heads 2"):
        check_tensor_parallel(config, LlamaForCausalLM, 4)
    from star_lightning.parallel.layout import make_layout

    layout = make_layout(8, 2, 2)
    assert layout.shape == (2, 2, 2)
    assert layout.all_context_parallel_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert [layout.tensor_parallel_rank(r) for r in range(4)] == [0, 1, 0, 1]
    with pytest.raises(ConfigurationError, match="not divisible by context_parallel_size 3"):
        make_layout(8, 3, 2)


def _sharded_request(rank: int, world_size: int) -> dict:
    """Host ``rank // 2`` of 2, tensor shard ``rank % 2`` of 2 (float64): star (anchor broadcast per head shard) and
    the zigzag ring over the context-parallel group of its shard."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    from model_zoo import random_tokens, tiny_model
    from star_lightning.engine.request import generate
    from star_lightning.engine.settings import GenerationSettings, StarSettings
    from star_lightning.models import use_star_attention
    from star_lightning.parallel.layout import AXES, make_layout
    from star_lightning.parallel.tensor_parallel import apply_tensor_parallel
    from star_lightning.parallel.torch_group import DistributedContextGroup

    layout = make_layout(world_size, 2, 2)
    mesh = init_device_mesh("cpu", layout.shape, mesh_dim_names=AXES)
    ranks = layout.context_parallel_ranks(0, layout.tensor_parallel_rank(rank))
    group = DistributedContextGroup(mesh["context_parallel"].get_group(), ranks, torch.device("cpu"))
    context, query = random_tokens(70, seed=1), random_tokens(5, seed=2)
    out: dict = {}
    for family in FAMILIES:
        model = tiny_model(family)
        apply_tensor_parallel(model, mesh["tensor_parallel"])
        use_star_attention(model)
        out[f"{family}/local_kv_rows"] = model.model.layers[0].self_attn.k_proj.weight.to_local().shape[0]
        with torch.no_grad():
            for name, star in (("star", StarSettings(block_size=16, anchor_block_size=12)),
                               ("ring", StarSettings(attention="ring"))):  # fmt: skip
                out[f"{family}/{name}"] = generate(model, context, query, group, star, GenerationSettings(6)).token_ids
    return out


def test_hosts_of_tensor_shards_compute_what_whole_hosts_do(tmp_path: Path) -> None:
    """2 hosts x 2 tensor shards (4 gloo processes, float64): the tokens of one whole host, for star and ring; for
    Llama (heads split) and OLMo-2 (its plan gathers q and k: every shard computes all heads)."""
    import torch

    from distributed_utils import run_on_ranks
    from model_zoo import random_tokens, tiny_model
    from star_lightning.engine.request import generate
    from star_lightning.engine.settings import GenerationSettings, StarSettings
    from star_lightning.models import use_star_attention
    from star_lightning.parallel.group import SingleHostGroup

    whole, rows = {}, {}
    for family in FAMILIES:
        model = tiny_model(family)
        use_star_attention(model)
        rows[family] = model.model.layers[0].self_attn.k_proj.weight.shape[0]
        with torch.no_grad():
            for name, star in (("star", StarSettings(block_size=16, anchor_block_size=12)),
                               ("ring", StarSettings(attention="ring"))):  # fmt: skip
                context, query = random_tokens(70, seed=1), random_tokens(5, seed=2)
                result = generate(model, context, query, SingleHostGroup(), star, GenerationSettings(6))
                whole[f"{family}/{name}"] = result.token_ids
    shards = run_on_ranks(_sharded_request, 4, tmp_path)
    for shard in shards:
        for family in FAMILIES:
            assert shard[f"{family}/local_kv_rows"] == rows[family] // 2  # the key projection's weights are split
            assert shard[f"{family}/star"] == whole[f"{family}/star"]
            assert shard[f"{family}/ring"] == whole[f"{family}/ring"]
