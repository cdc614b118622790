"""The query in the anchor and passing tokens, against the plain float64 reference (``passing_reference.py``): each
host's Phase 1 KV on 2-3 real gloo processes (and 4 hosts played in one process) equals the reference's, for every
anchor source; no query token is ever stored; with one host the options are exactly star with the same prefix."""

from __future__ import annotations

import pytest
import torch

from distributed_utils import run_on_ranks
from model_zoo import random_tokens, tiny_model
from passing_reference import ReferenceSpec, reference_phase1
from star_lightning.attention.passing import PassingSettings
from star_lightning.cache import KVStore
from star_lightning.engine.decode import encode_query
from star_lightning.engine.forward import num_layers
from star_lightning.engine.prefill import prefill_star
from star_lightning.engine.request import generate
from star_lightning.engine.settings import GenerationSettings, StarSettings
from star_lightning.models import use_star_attention
from star_lightning.parallel.group import SingleHostGroup
from star_lightning.parallel.simulated_group import AnchorBoard, SimulatedHostGroup
from star_lightning.parallel.torch_group import DistributedContextGroup
from star_lightning.partition import plan_blocks

CONTEXT, QUERY, BLOCK = 70, 5, 16
# name: (family, overrides, anchor_block_size, anchor_query, query positions, passing settings)
CASES = {
    "llama/aq": ("llama", {}, 12, True, "after_anchor", PassingSettings(0)),
    "llama/aq_phase2": ("llama", {}, 12, True, "phase2", PassingSettings(0)),
    "llama/pass_shared": ("llama", {}, 12, False, "after_anchor", PassingSettings(3, "shared", 3)),
    "llama/aq_pass_per_head": ("llama", {}, None, True, "after_anchor", PassingSettings(3, "per_head", 1)),
    "gemma2_window24/aq_pass_per_head": ("gemma2", {"sliding_window": 24}, 12, True, "after_anchor",
                                         PassingSettings(4, "per_head", 3)),
    "gemma2_window24/aq_phase2_pass": ("gemma2", {"sliding_window": 24}, 8, True, "phase2", PassingSettings(2)),
}  # fmt: skip
SOURCES = ("broadcast", "host", "block")


def _host_kv(model, group, name: str, source: str) -> dict:
    _, _, anchor, anchor_query, positions, passing = CASES[name]
    context, query = random_tokens(CONTEXT, seed=1), random_tokens(QUERY, seed=2)
    plan = plan_blocks(CONTEXT, BLOCK, group.size, anchor)
    store = KVStore(num_layers(model), plan.local_context_length(group.rank) + QUERY)
    sent = prefill_star(
        model, context, plan, group, store, anchor_source=source, query_ids=query if anchor_query else None,
        query_positions=positions, passing=passing,
    )  # fmt: skip
    kv = [torch.stack(store.view(layer)).clone() for layer in range(store.num_layers)]  # [2, 1, Hkv, n, D]
    stored = [store.positions(layer).clone() for layer in range(store.num_layers)]
    return {"kv": kv, "positions": stored, "sent": sent}


def _run_hosts(rank: int, world_size: int) -> dict:
    group = DistributedContextGroup(None, list(range(world_size)), torch.device("cpu"))
    out = {}
    with torch.no_grad():
        for name, (family, overrides, *_) in CASES.items():
            model = tiny_model(family, **overrides)
            use_star_attention(model)
            for source in SOURCES:
                out[f"{name}/{source}"] = _host_kv(model, group, name, source)
    return out


def _played_hosts(hosts: int, name: str, source: str) -> list[dict]:
    family, overrides, *_ = CASES[name]
    model = tiny_model(family, **overrides)
    use_star_attention(model)
    board = AnchorBoard()
    with torch.no_grad():
        return [_host_kv(model, SimulatedHostGroup(h, hosts, board), name, source) for h in range(hosts)]


def _reference(name: str, hosts: int) -> ReferenceSpec:
    family, overrides, anchor, anchor_query, positions, passing = CASES[name]
    model = tiny_model(family, **overrides)
    plan = plan_blocks(CONTEXT, BLOCK, hosts, anchor)
    query_length = QUERY if anchor_query else 0
    start = plan.anchor_length if positions == "after_anchor" else CONTEXT
    per_head = passing.selection == "per_head"
    spec = ReferenceSpec(plan, query_length, start, passing.tokens, per_head, passing.pool_kernel)
    query = random_tokens(QUERY, seed=2) if anchor_query else None
    return reference_phase1(model, random_tokens(CONTEXT, seed=1), query, spec)


def _assert_matches(result: dict, spec: ReferenceSpec, host: int, where: str) -> None:
    spans = [(b.start, b.end) for b in spec.plan.blocks_of(host)]
    rows = torch.cat([torch.arange(start, end) for start, end in spans])
    for layer, (kv, positions) in enumerate(zip(result["kv"], result["positions"], strict=True)):
        # Only the host's own context tokens are stored: no query token, no anchor copy, no passed token.
        assert positions.tolist() == rows.tolist(), f"{where}: layer {layer} stored positions"
        want = torch.stack([spec.keys[layer][:, :, rows], spec.values[layer][:, :, rows]])
        torch.testing.assert_close(kv, want, rtol=1e-10, atol=1e-10, msg=f"{where}: layer {layer}")


def test_reference_is_not_star_without_its_rules() -> None:
    """The reference's masks matter: passing tokens change what later blocks compute, and chosen tokens are real."""
    with_passing, without = _reference("llama/pass_shared", 3), _reference("llama/pass_shared", 1)
    late = slice(40, CONTEXT)
    assert not torch.allclose(with_passing.keys[1][:, :, late], without.keys[1][:, :, late])
    assert with_passing.chosen and all(len(rows[0]) == 3 for rows in with_passing.chosen.values() if rows[0])


@pytest.mark.parametrize("name", list(CASES))
def test_played_hosts_match_the_reference(name: str) -> None:
    for hosts in (1, 4):
        spec = _reference(name, hosts)
        for source in SOURCES:
            for host, result in enumerate(_played_hosts(hosts, name, source)):
                _assert_matches(result, spec, host, f"{name}/{source}, host {host} of {hosts} (played)")


def test_real_hosts_match_the_reference(tmp_path) -> None:
    for world_size in (2, 3):
        results = run_on_ranks(_run_hosts, world_size, tmp_path)
        for name in CASES:
            spec = _reference(name, world_size)
            for source in SOURCES:
                for host, result in enumerate(results):
                    got = result[f"{name}/{source}"]
                    _assert_matches(got, spec, host, f"{name}/{source}, host {host} of {world_size}")
                    passing = CASES[name][-1].tokens > 0
                    # Phase 1 bytes: the broadcast (host 0) and, with passing tokens, every host's all-gathers.
                    assert (got["sent"] > 0) == ((source == "broadcast" and host == 0) or passing), name


def test_one_host_with_passing_is_star() -> None:
    """With one host nothing is passed: the same tokens and logits as star with the same prefix."""
    model = tiny_model("llama")
    use_star_attention(model)
    context, query = random_tokens(CONTEXT, seed=1), random_tokens(QUERY, seed=2)
    with torch.no_grad():
        for anchor_query in (False, True):
            plain = StarSettings(block_size=BLOCK, anchor_block_size=12, anchor_query=anchor_query)
            passing = StarSettings(block_size=BLOCK, anchor_block_size=12, anchor_query=anchor_query, passing_tokens=4)
            a = generate(model, context, query, SingleHostGroup(), plain, GenerationSettings(6))
            b = generate(model, context, query, SingleHostGroup(), passing, GenerationSettings(6))
            assert a.token_ids == b.token_ids and b.stats.phase1_bytes == 0
            assert a.context.store is not None and b.context.store is not None
            a.context.rollback()
            b.context.rollback()
            logits_a = encode_query(model, a.context.store, query, CONTEXT, SingleHostGroup())
            logits_b = encode_query(model, b.context.store, query, CONTEXT, SingleHostGroup())
            torch.testing.assert_close(logits_a, logits_b, rtol=0, atol=0)


def test_simulate_hosts_zero_plays_one_host_per_block() -> None:
    """``simulated_hosts 0``: as many hosts as the request's context makes blocks (70 tokens of blocks of 16: 5)."""
    model = tiny_model("llama")
    use_star_attention(model)
    context, query = random_tokens(CONTEXT, seed=1), random_tokens(QUERY, seed=2)
    results = []
    with torch.no_grad():
        for hosts in (0, 5, 4):
            star = StarSettings(block_size=BLOCK, anchor_block_size=12, anchor_query=True, passing_tokens=3,
                                simulated_hosts=hosts)  # fmt: skip
            results.append(generate(model, context, query, SingleHostGroup(), star, GenerationSettings(6)))
    assert results[0].token_ids == results[1].token_ids
    assert results[0].stats.phase1_bytes == results[1].stats.phase1_bytes != results[2].stats.phase1_bytes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_query_aware_phase1_on_the_gpu_matches_float64() -> None:
    """bf16 on the GPU's kernels (long blocks fused, the prefix and passing tokens on the short-query paths), 4 hosts
    played on one GPU: each host's stored K/V within bf16 tolerance of the float64 CPU computation."""
    name = "llama/aq_pass_per_head"
    reference = _played_hosts(4, name, "broadcast")
    family, overrides, *_ = CASES[name]
    model = tiny_model(family, dtype=torch.bfloat16, **overrides).cuda()
    use_star_attention(model)
    board = AnchorBoard()
    anchor, positions, passing = CASES[name][2], CASES[name][4], CASES[name][5]
    context, query = random_tokens(CONTEXT, seed=1).cuda(), random_tokens(QUERY, seed=2).cuda()
    with torch.no_grad():
        for host in range(4):
            group = SimulatedHostGroup(host, 4, board)
            plan = plan_blocks(CONTEXT, BLOCK, 4, anchor)
            store = KVStore(num_layers(model), plan.local_context_length(host))
            prefill_star(
                model, context, plan, group, store, query_ids=query, query_positions=positions, passing=passing
            )
            for layer in range(store.num_layers):
                got = torch.stack(store.view(layer)).double().cpu()
                torch.testing.assert_close(got, reference[host]["kv"][layer], rtol=0.05, atol=0.05)
