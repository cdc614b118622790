"""Multi-host properties with real gloo processes: host-count invariance, exact Phase 2 merge, the anchor's three
sources agree, zigzag ring == contiguous ring == dense, a kept context answers like a fresh one."""

from __future__ import annotations

import pytest
import torch

from distributed_utils import run_on_ranks
from model_zoo import random_tokens, tiny_model
from star_lightning.cache import KVStore
from star_lightning.engine.decode import encode_query
from star_lightning.engine.encode import encode_context
from star_lightning.engine.forward import num_layers
from star_lightning.engine.prefill import prefill_ring, prefill_star
from star_lightning.engine.request import answer, generate
from star_lightning.engine.settings import GenerationSettings, StarSettings
from star_lightning.models import use_star_attention
from star_lightning.parallel.group import SingleHostGroup
from star_lightning.parallel.torch_group import DistributedContextGroup
from star_lightning.partition import plan_blocks, plan_ring
from star_lightning.sampling import SamplingConfig

CONTEXT, QUERY, NEW, BLOCK, ANCHOR = 70, 5, 6, 16, 12
SAMPLED = GenerationSettings(8, SamplingConfig(temperature=1.0, top_p=0.9, seed=3))
ANCHORS = {"anchor 12 < block 16": (BLOCK, ANCHOR, True), "anchor = block": (BLOCK, None, True),
           "anchor off": (BLOCK, None, False)}  # fmt: skip


def _group(world_size: int):
    if world_size == 1:
        return SingleHostGroup()
    return DistributedContextGroup(None, list(range(world_size)), torch.device("cpu"))


def _star(model, context, query, group, block, anchor, use_anchor, source):
    """Phase 1 KV of this host and the first-token logits for one anchor source."""
    plan = plan_blocks(CONTEXT, block, group.size, anchor, use_anchor)
    store = KVStore(num_layers(model), plan.local_context_length(group.rank) + QUERY + NEW)
    sent = prefill_star(model, context, plan, group, store, anchor_source=source)
    kv = [torch.cat(store.view(layer), dim=-1).clone() for layer in range(store.num_layers)]
    logits = encode_query(model, store, query, CONTEXT, group)
    return kv, logits, sent, store.length - plan.local_context_length(group.rank)


def _run_request(rank: int, world_size: int, family: str) -> dict:
    """What one host computes: Phase 1 KV and first-token logits per anchor source and ring layout, tokens."""
    model = tiny_model(family)
    use_star_attention(model)
    group = _group(world_size)
    context, query = random_tokens(CONTEXT, seed=1), random_tokens(QUERY, seed=2)
    out: dict = {}
    with torch.no_grad():
        for name, (block, anchor, use_anchor) in ANCHORS.items():
            for source in ("broadcast", "host", "block"):
                kv, logits, sent, stored_new = _star(model, context, query, group, block, anchor, use_anchor, source)
                out[f"{name}/{source}"] = {"kv": kv, "logits": logits, "sent": sent, "stored_new": stored_new}
        for layout in ("zigzag", "contiguous"):
            plan = plan_ring(CONTEXT, group.size, layout)
            store = KVStore(num_layers(model), plan.local_context_length(group.rank) + QUERY + NEW)
            sent = prefill_ring(model, context, plan, group, store)
            out[f"ring/{layout}"] = {"logits": encode_query(model, store, query, CONTEXT, group), "sent": sent}
        star = StarSettings(block_size=BLOCK, anchor_block_size=ANCHOR)
        first = generate(model, context, query, group, star, GenerationSettings(NEW))
        out["star_tokens"] = first.token_ids
        out["local_context"] = first.stats.local_context_tokens
        out["phase2_bytes"] = first.stats.phase2_bytes
        out["ring_tokens"] = {
            layout: generate(model, context, query, group, StarSettings(attention="ring", ring_layout=layout),
                             GenerationSettings(NEW)).token_ids
            for layout in ("zigzag", "contiguous")
        }  # fmt: skip
        out["sampled_tokens"] = generate(model, context, query, group, star, SAMPLED).token_ids
        # A kept context answers a second query exactly as a freshly encoded one (greedy and seeded sampling; the
        # logits of the second query over the rolled-back store == over a fresh store), for star, ring and dense.
        other = random_tokens(QUERY + 2, seed=9)
        methods = {"star": star, "ring": StarSettings(attention="ring")}
        if world_size == 1:
            methods["dense"] = StarSettings(attention="dense")
        for method, settings_of_method in methods.items():
            if method == "dense":
                model.set_attn_implementation("sdpa")
            for name, settings in (("greedy", GenerationSettings(NEW)), ("sampled", SAMPLED)):
                fresh = generate(model, context, other, group, settings_of_method, settings)
                kept = generate(model, context, query, group, settings_of_method, settings)
                reused = generate(model, context, other, group, settings_of_method, settings, kept=kept.context)
                out[f"reuse/{method}/{name}"] = (reused.token_ids, fresh.token_ids, reused.stats.context_reused,
                                                 reused.stats.phase1_s)  # fmt: skip
            if method != "dense":
                extra = QUERY + 2 + NEW
                encoded = encode_context(model, context, group, settings_of_method, extra_capacity=extra)
                answer(model, encoded, query, group, settings_of_method, GenerationSettings(NEW))
                encoded.rollback()
                assert encoded.store is not None
                again = encode_query(model, encoded.store, other, CONTEXT, group)
                new = encode_context(model, context, group, settings_of_method, extra_capacity=extra)
                assert new.store is not None
                out[f"reuse/{method}/logits"] = (again, encode_query(model, new.store, other, CONTEXT, group))
    return out


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


def _assert_star_agrees(result: dict, single: dict, rank: int, world_size: int) -> None:
    exact = {"rtol": 1e-9, "atol": 1e-9}
    for name, (block, anchor, use_anchor) in ANCHORS.items():
        plan = plan_blocks(CONTEXT, block, world_size, anchor, use_anchor)
        start = sum(plan.local_context_length(h) for h in range(rank))
        reference = single[f"{name}/block"]
        for source in ("broadcast", "host", "block"):
            got = result[f"{name}/{source}"]
            # Same blocks, other placement and other anchor source: this host's slice of the single-host KV ...
            for layer_kv, whole in zip(got["kv"], reference["kv"], strict=True):
                torch.testing.assert_close(layer_kv, whole[:, :, start : start + layer_kv.shape[2]], **exact)
            # ... and the merged Phase 2 logits on every host.
            torch.testing.assert_close(got["logits"], reference["logits"], **exact)
            # Only the query host (the last) stores the query tokens' KV.
            assert got["stored_new"] == (QUERY if rank == world_size - 1 else 0)
        broadcast = result[f"{name}/broadcast"]
        sends_anchor = rank == 0 and world_size > 1 and plan.anchor_length > 0
        assert (broadcast["sent"] > 0) == sends_anchor  # only host 0 sends in Phase 1, and only with an anchor
        assert result[f"{name}/host"]["sent"] == result[f"{name}/block"]["sent"] == 0


def _assert_reuse_exact(result: dict, single: dict, methods: tuple[str, ...]) -> None:
    for method in methods:
        for name in ("greedy", "sampled"):
            reused_tokens, fresh_tokens, reused, phase1_s = result[f"reuse/{method}/{name}"]
            assert reused and phase1_s == 0.0
            assert reused_tokens == fresh_tokens == single[f"reuse/{method}/{name}"][1]
        if method != "dense":
            again, fresh = result[f"reuse/{method}/logits"]
            torch.testing.assert_close(again, fresh, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_star_is_invariant_to_host_count_and_ring_equals_dense(family: str, tmp_path) -> None:
    single = _run_request(0, 1, family)
    _assert_reuse_exact(single, single, ("star", "ring", "dense"))
    dense_logits, dense_tokens = _dense_reference(family)
    _assert_star_agrees(single, single, 0, 1)
    # Ring attention is exact in either layout: one host or several, it equals dense attention.
    for layout in ("zigzag", "contiguous"):
        torch.testing.assert_close(single[f"ring/{layout}"]["logits"], dense_logits, rtol=1e-9, atol=1e-9)
        assert single["ring_tokens"][layout] == dense_tokens
    # 3 hosts split the blocks unevenly, 4 evenly (2 hosts: the CLI and Fabric tests).
    for world_size in (3, 4) if family == "llama" else (3,):
        results = run_on_ranks(_run_request, world_size, tmp_path, family=family)
        for rank, result in enumerate(results):
            _assert_star_agrees(result, single, rank, world_size)
            for layout in ("zigzag", "contiguous"):
                torch.testing.assert_close(result[f"ring/{layout}"]["logits"], dense_logits, rtol=1e-9, atol=1e-9)
                assert result[f"ring/{layout}"]["sent"] > 0
                assert result["ring_tokens"][layout] == dense_tokens
            assert result["star_tokens"] == single["star_tokens"]
            assert result["sampled_tokens"] == single["sampled_tokens"]
            plan = plan_blocks(CONTEXT, BLOCK, world_size, ANCHOR)
            assert result["local_context"] == plan.local_context_length(rank)
            assert result["phase2_bytes"] > 0
            _assert_reuse_exact(result, single, ("star", "ring"))
