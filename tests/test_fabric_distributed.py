"""The Fabric strategy with real processes: groups, query host and sampler split, then a real request."""

from __future__ import annotations

import torch
from lightning.fabric import Fabric

from model_zoo import random_tokens, tiny_model
from star_lightning.engine.request import generate
from star_lightning.engine.settings import GenerationSettings, StarSettings
from star_lightning.models import use_star_attention
from star_lightning.parallel.fabric import StarFabricStrategy
from star_lightning.parallel.group import SingleHostGroup

SETTINGS = StarSettings(block_size=16, anchor_block_size=8)


def _request(group) -> list[int]:
    model = tiny_model("llama")
    use_star_attention(model)
    context, query = random_tokens(60, seed=1), random_tokens(4, seed=2)
    with torch.no_grad():
        return generate(model, context, query, group, SETTINGS, GenerationSettings(5)).token_ids


def _run(fabric: Fabric) -> dict:
    strategy = fabric.strategy
    assert isinstance(strategy, StarFabricStrategy)
    group = strategy.context_group
    tokens = _request(group)
    everyone = fabric.all_gather(torch.tensor(tokens))  # [world, new]
    result = {
        "tokens": tokens,
        "all_equal": bool((everyone == everyone[0]).all()),
        "cp": (group.rank, group.size, group.query_host),
        "sampler": strategy.distributed_sampler_kwargs,
    }
    strategy.teardown()
    # gloo aborts a process that exits while a peer still talks to it: leave the world group in step.
    fabric.barrier()
    torch.distributed.destroy_process_group()
    return result


def test_fabric_runs_one_request_over_two_hosts() -> None:
    fabric = Fabric(
        accelerator="cpu", devices=2, strategy=StarFabricStrategy(context_parallel_size=2, start_method="spawn")
    )
    result = fabric.launch(_run)
    assert result["all_equal"]
    assert result["tokens"] == _request(SingleHostGroup())
    assert result["cp"] == (0, 2, 1)
    assert result["sampler"] == {"num_replicas": 1, "rank": 0}  # both hosts see the same requests


def test_fabric_data_parallel_groups_split_requests() -> None:
    fabric = Fabric(
        accelerator="cpu", devices=2, strategy=StarFabricStrategy(context_parallel_size=1, start_method="spawn")
    )
    result = fabric.launch(_run)
    assert result["cp"] == (0, 1, 0)
    assert result["sampler"] == {"num_replicas": 2, "rank": 0}
