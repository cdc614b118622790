"""``--model.lookback_tokens``: each non-first block encoded after the anchor and the context tokens just before it.

Checked against independent references in float64: a block's K/V equal transformers' own forward of (anchor, the
W tokens before the block, the block) at true positions, for every family and anchor source, windows included; a
lookback reaching the start equals dense (K/V and greedy tokens, against transformers' generate); the hosts do not
matter (one host, played hosts, 2 real gloo processes); 0 is star to the bit; bad values are refused by name.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface, DynamicCache

from distributed_utils import run_on_ranks
from model_zoo import FAMILIES, random_tokens, tiny_model
from star_lightning.cache import KVStore
from star_lightning.engine.encode import encode_context
from star_lightning.engine.forward import num_layers
from star_lightning.engine.prefill import prefill_dense, prefill_star
from star_lightning.engine.request import generate
from star_lightning.engine.settings import GenerationSettings, StarSettings
from star_lightning.errors import ConfigurationError
from star_lightning.models import use_star_attention
from star_lightning.parallel.group import SingleHostGroup
from star_lightning.parallel.torch_group import DistributedContextGroup
from star_lightning.partition import plan_blocks

CONTEXT, QUERY, NEW, BLOCK = 70, 5, 6, 16


def _reference(model) -> str:
    return "eager" if model.config.model_type == "gemma2" else "sdpa"  # Gemma-2's soft-cap: its eager path


def _tol(model) -> dict[str, float]:
    return {"rtol": 1e-6, "atol": 1e-6} if model.config.model_type == "gemma2" else {"rtol": 1e-9, "atol": 1e-9}


_TRUE_POSITIONS: list[torch.Tensor] = []


def _plain_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
                     sliding_window=None, **kwargs):  # fmt: skip
    """Causal attention in float64 over the sequence's order, a sliding window by the tokens' TRUE positions
    (transformers' own masks count a window in sequence indices, which a prefix with a gap in its positions is not).
    """
    positions = _TRUE_POSITIONS[-1]  # [S]
    groups = query.shape[1] // key.shape[1]
    keys, values = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = query @ keys.transpose(-1, -2) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    size = positions.shape[0]
    visible = torch.ones(size, size, dtype=torch.bool).tril()
    if sliding_window is not None:
        visible &= positions[:, None] - positions[None, :] < sliding_window
    scores = scores.masked_fill(~visible, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ values).transpose(1, 2).contiguous(), None


AttentionInterface.register("plain_true_positions", _plain_attention)


def _fresh_block_kv(model, context: torch.Tensor, anchor: int, first: int, start: int, stop: int) -> list:
    """The block ``[start, stop)``'s K/V the plain way: the model's forward of (anchor, ``[first, start)``, block)
    at their true positions through :func:`_plain_attention`, the block's rows taken from its own cache."""
    model.set_attn_implementation("plain_true_positions")
    ids = torch.cat([context[:, :anchor], context[:, first:stop]], dim=1)  # [1, a + w + l]
    positions = torch.cat([torch.arange(anchor), torch.arange(first, stop)]).unsqueeze(0)  # [1, a + w + l]
    cache = DynamicCache()  # full layers: a config's sliding layers would keep only the window's last keys
    _TRUE_POSITIONS.append(positions[0])
    try:
        with torch.no_grad():
            model(ids, position_ids=positions, past_key_values=cache, use_cache=True)
    finally:
        _TRUE_POSITIONS.pop()
    skip = anchor + start - first
    return [torch.cat([layer.keys[:, :, skip:], layer.values[:, :, skip:]], dim=-1) for layer in cache.layers]


def _star_kv(model, context, group, anchor: int | None, lookback: int, source: str = "broadcast") -> list:
    """This host's Phase 1 K/V (keys and values joined on the last dimension), one tensor a layer."""
    use_star_attention(model)
    plan = plan_blocks(CONTEXT, BLOCK, group.size, anchor)
    store = KVStore(num_layers(model), plan.local_context_length(group.rank))
    with torch.no_grad():
        prefill_star(model, context, plan, group, store, anchor_source=source, lookback=lookback)
    return [torch.cat(store.view(layer), dim=-1).clone() for layer in range(store.num_layers)]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_block_is_a_fresh_forward_of_anchor_lookback_and_block(family: str) -> None:
    """Every block's K/V == transformers' forward of (anchor, the 5 or 20 tokens before it past the anchor, block),
    for every anchor source; 20 > block: the lookback reaches into the block before the previous one, and for the
    second block it stops at the anchor's end."""
    model = tiny_model(family, **({"sliding_window": 12} if family in ("gemma2", "gemma3", "mistral") else {}))
    context = random_tokens(CONTEXT, seed=3)
    plan = plan_blocks(CONTEXT, BLOCK, 1, 8)
    for lookback in (5, 20):
        references = {}
        for block in plan.blocks:
            first = block.start if block.index == 0 else max(plan.anchor_length, block.start - lookback)
            anchor = 0 if block.index == 0 else plan.anchor_length
            references[block.index] = _fresh_block_kv(model, context, anchor, first, block.start, block.end)
        for source in ("broadcast", "host", "block"):
            kv = _star_kv(model, context, SingleHostGroup(), 8, lookback, source)
            for block in plan.blocks:
                for layer, (got, want) in enumerate(zip(kv, references[block.index], strict=True)):
                    where = f"{family}, lookback {lookback}, {source}, block {block.index}, layer {layer}"
                    torch.testing.assert_close(got[:, :, block.start : block.end], want, **_tol(model), msg=where)


def test_the_lookback_changes_the_blocks_it_should_and_zero_is_star_to_the_bit() -> None:
    model = tiny_model("llama")
    context = random_tokens(CONTEXT, seed=4)
    star = _star_kv(model, context, SingleHostGroup(), None, 0)
    default = [torch.cat(s, dim=-1) for s in _default_store(model, context)]
    assert all(torch.equal(a, b) for a, b in zip(star, default, strict=True))
    wider = _star_kv(model, context, SingleHostGroup(), None, 5)
    # Anchor = block: the first two blocks are unchanged (the second's lookback is the anchor, already in its
    # prefix); the later ones change.
    assert torch.equal(wider[1][:, :, :32], star[1][:, :, :32])
    assert not torch.allclose(wider[1][:, :, 32:48], star[1][:, :, 32:48])


def _default_store(model, context) -> list:
    """Phase 1 through prefill_star's defaults (no lookback argument): today's star."""
    use_star_attention(model)
    plan = plan_blocks(CONTEXT, BLOCK, 1, None)
    store = KVStore(num_layers(model), CONTEXT)
    with torch.no_grad():
        prefill_star(model, context, plan, SingleHostGroup(), store)
    return [store.view(layer) for layer in range(store.num_layers)]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_lookback_reaching_the_start_is_dense(family: str) -> None:
    """Anchor = block and a lookback of the whole context: every block sees all before it -> dense's K/V (the
    engine's dense, checked against transformers elsewhere) and transformers' own greedy tokens."""
    model = tiny_model(family, **({"sliding_window": 12} if family == "gemma3" else {}))
    context, query = random_tokens(CONTEXT, seed=1), random_tokens(QUERY, seed=2)
    use_star_attention(model)
    dense = KVStore(num_layers(model), CONTEXT)
    with torch.no_grad():
        prefill_dense(model, context, dense)
    want = [torch.cat(dense.view(layer), dim=-1) for layer in range(dense.num_layers)]
    for source in ("broadcast", "host", "block"):
        got = _star_kv(model, context, SingleHostGroup(), None, CONTEXT, source)
        for layer, (a, b) in enumerate(zip(got, want, strict=True)):
            torch.testing.assert_close(a, b, **_tol(model), msg=f"{family}, {source}, layer {layer}")
    prompt = torch.cat([context, query], dim=1)
    model.set_attn_implementation(_reference(model))
    with torch.no_grad():
        reference = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW,
                                   min_new_tokens=NEW, do_sample=False, pad_token_id=0)  # fmt: skip
    use_star_attention(model)
    for hosts in (1, 3):  # this process as the one host, and 3 hosts played in it
        settings = StarSettings(block_size=BLOCK, lookback_tokens=CONTEXT, simulated_hosts=hosts, decode="eager")
        with torch.no_grad():
            result = generate(model, context, query, SingleHostGroup(), settings, GenerationSettings(NEW))
        assert result.token_ids == reference[0, CONTEXT + QUERY :].tolist(), f"{family}, {hosts} played hosts"


def _hosts_kv(rank: int, world_size: int) -> dict:
    group = DistributedContextGroup(None, list(range(world_size)), torch.device("cpu"))
    model = tiny_model("gemma2", sliding_window=12)
    context = random_tokens(CONTEXT, seed=6)
    return {source: _star_kv(model, context, group, 8, 20, source) for source in ("broadcast", "host", "block")}


def test_two_processes_store_what_one_host_stores(tmp_path) -> None:
    """Blocks need no other host's K/V for their lookback (the tokens are every host's): 2 gloo processes, each its
    share, == the one host's K/V of the same blocks; and the whole context played on 3 hosts == one host."""
    model = tiny_model("gemma2", sliding_window=12)
    context = random_tokens(CONTEXT, seed=6)
    one = _star_kv(model, context, SingleHostGroup(), 8, 20)
    results = run_on_ranks(_hosts_kv, 2, tmp_path)
    plan = plan_blocks(CONTEXT, BLOCK, 2, 8)
    for rank, result in enumerate(results):
        rows = torch.cat([torch.arange(b.start, b.end) for b in plan.blocks_of(rank)])
        for source, kv in result.items():
            for layer, (got, want) in enumerate(zip(kv, one, strict=True)):
                torch.testing.assert_close(got, want[:, :, rows], rtol=1e-6, atol=1e-6,
                                           msg=f"rank {rank}, {source}, layer {layer}")  # fmt: skip
    use_star_attention(model)
    query = random_tokens(QUERY, seed=2)
    contexts = {}
    for hosts in (1, 3):
        settings = StarSettings(block_size=BLOCK, anchor_block_size=8, lookback_tokens=20, simulated_hosts=hosts)
        with torch.no_grad():
            encoded = encode_context(model, context, SingleHostGroup(), settings, extra_capacity=0, query_ids=query)
        assert encoded.store is not None
        contexts[hosts] = [torch.cat(encoded.store.view(layer), dim=-1) for layer in range(num_layers(model))]
    for a, b in zip(contexts[1], contexts[3], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lookback_tokens": -1}, "--model.lookback_tokens -1"),
        ({"lookback_tokens": True}, "--model.lookback_tokens true"),
        ({"lookback_tokens": 64, "attention": "dense"}, "applies to star attention only"),
        ({"lookback_tokens": 64, "attention": "ring"}, "applies to star attention only"),
        ({"lookback_tokens": 64, "passing_tokens": 4}, "are not combined"),
    ],
)
def test_bad_lookbacks_are_refused_by_name(options: dict, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        StarSettings(**options)


def test_the_lookback_shapes_a_kept_context() -> None:
    """A context encoded with another lookback is another context: not reused."""
    assert StarSettings(lookback_tokens=64).shapes_kv() != StarSettings().shapes_kv()
