"""Multi-host properties with real gloo processes: host-count invariance, exact Phase 2 merge, ring == dense."""

from __future__ import annotations

import pytest
import torch

from distributed_utils import run_on_ranks
from model_zoo import random_tokens, tiny_model
from star_lightning.generation import (
    GenerationSettings,
    StarSettings,
    encode_query,
    generate_star,
    prefill_ring,
    prefill_star,
)
from star_lightning.models import use_star_attention
from star_lightning.parallel.group import SingleHostGroup
from star_lightning.parallel.torch_group import DistributedContextGroup
from star_lightning.partition import plan_blocks
from star_lightning.sampling import SamplingConfig

CONTEXT, QUERY, NEW, BLOCK, ANCHOR = 70, 5, 6, 16, 12
STAR = StarSettings(block_size=BLOCK, anchor_block_size=ANCHOR)
SAMPLED = GenerationSettings(8, SamplingConfig(temperature=1.0, top_p=0.9, seed=3))


def _run_request(rank: int, world_size: int, family: str) -> dict:
    """What one host computes: first-token logits and generated tokens for star and ring."""
    model = tiny_model(family)
    use_star_attention(model)
    group = (
        DistributedContextGroup(None, list(range(world_size)), torch.device("cpu"))
        if world_size > 1
        else SingleHostGroup()
    )
    context, query = random_tokens(CONTEXT, seed=1), random_tokens(QUERY, seed=2)
    plan = plan_blocks(CONTEXT, BLOCK, group.size, ANCHOR)
    extra = QUERY + NEW
    with torch.no_grad():
        cache = prefill_star(model, context, plan, group, extra_capacity=extra)
        star_logits = encode_query(model, cache, query, CONTEXT, group)
        ring_cache = prefill_ring(model, context, group, extra_capacity=extra)
        ring_logits = encode_query(model, ring_cache, query, CONTEXT, group)
        star = generate_star(
            model,
            context,
            query,
            group,
            StarSettings(block_size=BLOCK, anchor_block_size=ANCHOR),
            GenerationSettings(NEW),
        )
        ring = generate_star(model, context, query, group, StarSettings(attention="ring"), GenerationSettings(NEW))
        sampled = generate_star(model, context, query, group, STAR, SAMPLED)
    return {
        "star_logits": star_logits,
        "ring_logits": ring_logits,
        "star_tokens": star.token_ids,
        "ring_tokens": ring.token_ids,
        "sampled_tokens": sampled.token_ids,
        "local_context": star.stats.local_context_tokens,
        "stored_after_query": cache.star_layers[0].length,
        "phase2_bytes": star.stats.phase2_bytes,
    }


def _dense_reference(family: str) -> tuple[torch.Tensor, list[int]]:
    model = tiny_model(family)
    model.set_attn_implementation("sdpa")
    prompt = torch.cat([random_tokens(CONTEXT, seed=1), random_tokens(QUERY, seed=2)], dim=1)
    with torch.no_grad():
        logits = model(prompt).logits[0, -1]
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=NEW,
            min_new_tokens=NEW,
            do_sample=False,
            pad_token_id=0,
        )
    return logits, out[0, prompt.shape[1] :].tolist()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_star_is_invariant_to_host_count_and_ring_equals_dense(family: str, tmp_path) -> None:
    single = _run_request(0, 1, family)
    dense_logits, dense_tokens = _dense_reference(family)
    # Ring attention is exact: one host or several, it equals dense attention.
    torch.testing.assert_close(single["ring_logits"], dense_logits, rtol=1e-9, atol=1e-9)
    assert single["ring_tokens"] == dense_tokens
    for world_size in (2, 3, 4) if family == "llama" else (3,):
        results = run_on_ranks(_run_request, world_size, tmp_path, family=family)
        blocks_per_host = [len(b) for b in plan_blocks(CONTEXT, BLOCK, world_size, ANCHOR).host_blocks]
        for rank, result in enumerate(results):
            # Same blocks, other placement: the merged Phase 2 equals the single-host result on every host.
            torch.testing.assert_close(result["star_logits"], single["star_logits"], rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(result["ring_logits"], dense_logits, rtol=1e-9, atol=1e-9)
            assert result["star_tokens"] == single["star_tokens"]
            assert result["ring_tokens"] == dense_tokens
            assert result["sampled_tokens"] == single["sampled_tokens"]
            plan = plan_blocks(CONTEXT, BLOCK, world_size, ANCHOR)
            assert result["local_context"] == plan.local_context_length(rank)
            assert blocks_per_host[rank] >= 1
            # Only the query host (the last) stores the query tokens' KV.
            stored_new = result["stored_after_query"] - result["local_context"]
            assert stored_new == (QUERY if rank == world_size - 1 else 0)
            assert result["phase2_bytes"] > 0
