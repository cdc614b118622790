"""Star Attention against independent references (transformers' own eager attention, float64), one process.

Each property of ../shared/STAR_ATTENTION.md that needs no second process is checked here for every supported
model family; the multi-host properties are in test_star_distributed.py.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from model_zoo import FAMILIES, random_tokens, tiny_model
from star_lightning.cache import KVStore
from star_lightning.engine.decode import encode_query
from star_lightning.engine.forward import num_layers
from star_lightning.engine.prefill import prefill_star
from star_lightning.engine.request import generate
from star_lightning.engine.settings import GenerationSettings, StarSettings
from star_lightning.errors import ConfigurationError
from star_lightning.models import check_attention_servable, use_star_attention
from star_lightning.parallel.group import SingleHostGroup
from star_lightning.partition import plan_blocks

CONTEXT, QUERY, NEW = 70, 5, 6


def _reference_attention(model) -> str:
    """transformers' SDPA path is exact in float64; Gemma-2's soft-capping needs its eager path, whose softmax
    runs in float32 (so its tolerance is float32's)."""
    return "eager" if model.config.model_type == "gemma2" else "sdpa"


def _tol(model) -> dict[str, float]:
    return {"rtol": 1e-6, "atol": 1e-6} if model.config.model_type == "gemma2" else {"rtol": 1e-9, "atol": 1e-9}


def _dense_logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.set_attn_implementation(_reference_attention(model))
    with torch.no_grad():
        return model(ids).logits[0, -1]  # [V]


def _hf_greedy(model, ids: torch.Tensor, new_tokens: int) -> list[int]:
    """transformers' own generate with its own attention: the reference decoding."""
    model.set_attn_implementation(_reference_attention(model))
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, ids.shape[1] :].tolist()


def _reference_block_kv(model, context: torch.Tensor, start: int, stop: int, anchor: int) -> list[torch.Tensor]:
    """KV of block ``[start, stop)`` computed the naive way: a fresh forward of ``(anchor, block)``."""
    model.set_attn_implementation(_reference_attention(model))
    ids = torch.cat([context[:, :anchor], context[:, start:stop]], dim=1)  # [1, a + l]
    positions = torch.cat([torch.arange(anchor), torch.arange(start, stop)]).unsqueeze(0)  # [1, a + l]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, position_ids=positions, past_key_values=cache, use_cache=True)
    return [torch.cat([layer.keys[:, :, anchor:], layer.values[:, :, anchor:]], dim=-1) for layer in cache.layers]


def _star_cache(model, context: torch.Tensor, block: int, anchor: int | None, **kwargs):
    """Phase 1 on one host; the store's layers as ``(keys, values)`` views and the store itself."""
    use_star_attention(model)
    plan = plan_blocks(context.shape[1], block, 1, anchor, kwargs.pop("use_anchor", True))
    store = KVStore(num_layers(model), plan.local_context_length(0) + QUERY + NEW)
    with torch.no_grad():
        prefill_star(model, context, plan, SingleHostGroup(), store, **kwargs)
    return plan, store


def _layers(store: KVStore) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [store.view(layer) for layer in range(store.num_layers)]


@pytest.mark.parametrize("family", FAMILIES)
def test_one_block_star_equals_dense(family: str) -> None:
    """block_size >= context: no anchor, one block -> exactly dense attention (logits and greedy tokens)."""
    model = tiny_model(family)
    context, query = random_tokens(CONTEXT, seed=1), random_tokens(QUERY, seed=2)
    prompt = torch.cat([context, query], dim=1)
    dense = _dense_logits(model, prompt)
    dense_tokens = _hf_greedy(model, prompt, NEW)
    _, cache = _star_cache(model, context, block=128, anchor=None)
    with torch.no_grad():
        star = encode_query(model, cache, query, CONTEXT, SingleHostGroup())
        result = generate(
            model, context, query, SingleHostGroup(), StarSettings(block_size=128), GenerationSettings(NEW)
        )
    torch.testing.assert_close(star, dense, **_tol(model))
    assert result.token_ids == dense_tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_phase1_kv_equals_blockwise_reference(family: str) -> None:
    """Every block's KV == a fresh forward of (anchor, block) at true positions; the ragged last block too."""
    model = tiny_model(family)
    context = random_tokens(CONTEXT, seed=3)
    plan, cache = _star_cache(model, context, block=16, anchor=8)
    assert [b.length for b in plan.blocks] == [16, 16, 16, 16, 6]
    for block in plan.blocks:
        anchor = 0 if block.index == 0 else plan.anchor_length
        reference = _reference_block_kv(model, context, block.start, block.end, anchor)
        for (keys, values), expected in zip(_layers(cache), reference, strict=True):
            got = torch.cat([keys[:, :, block.start : block.end], values[:, :, block.start : block.end]], dim=-1)
            torch.testing.assert_close(got, expected, **_tol(model))


def test_without_anchor_blocks_see_only_themselves() -> None:
    model = tiny_model("llama")
    context = random_tokens(CONTEXT, seed=4)
    plan, cache = _star_cache(model, context, block=16, anchor=None, use_anchor=False)
    assert plan.anchor_length == 0
    block = plan.blocks[2]
    reference = _reference_block_kv(model, context, block.start, block.end, anchor=0)
    keys, values = cache.view(1)
    got = torch.cat([keys[:, :, block.start : block.end], values[:, :, block.start : block.end]], dim=-1)
    torch.testing.assert_close(got, reference[1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_anchor_prefix_reuse_equals_recompute(family: str) -> None:
    """The anchor's KV computed once and reused (``host``; ``broadcast`` on one host takes it from the first block)
    == recomputing (anchor, block) per block (``block``, the reference's way), float64."""
    model = tiny_model(family)
    context = random_tokens(CONTEXT, seed=5)
    stores = {source: _star_cache(model, context, block=16, anchor=12, anchor_source=source)[1]
              for source in ("broadcast", "host", "block")}  # fmt: skip
    for source in ("broadcast", "host"):
        for (k_a, v_a), (k_b, v_b) in zip(_layers(stores[source]), _layers(stores["block"]), strict=True):
            torch.testing.assert_close(k_a, k_b, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(v_a, v_b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
def test_phase2_equals_attention_over_the_cached_kv(family: str) -> None:
    """Phase 2 is exact: the query over the blockwise cache == transformers' attention over the same KV."""
    model = tiny_model(family)
    context, query = random_tokens(CONTEXT, seed=6), random_tokens(QUERY, seed=7)
    _, cache = _star_cache(model, context, block=16, anchor=16)
    reference_cache = DynamicCache(config=model.config)
    for index, (keys, values) in enumerate(_layers(cache)):
        reference_cache.update(keys.clone(), values.clone(), index)
    with torch.no_grad():
        star = encode_query(model, cache, query, CONTEXT, SingleHostGroup())
        model.set_attn_implementation(_reference_attention(model))
        positions = torch.arange(CONTEXT, CONTEXT + QUERY).unsqueeze(0)
        reference = model(query, position_ids=positions, past_key_values=reference_cache, use_cache=True).logits[0, -1]
    torch.testing.assert_close(star, reference, **_tol(model))


def test_unfilled_cache_slots_are_never_attended() -> None:
    """The preallocated cache has room for tokens not generated yet: poisoning it with NaN changes nothing."""
    model = tiny_model("llama")
    context, query = random_tokens(CONTEXT, seed=8), random_tokens(QUERY, seed=9)
    _, clean = _star_cache(model, context, block=16, anchor=16)
    _, poisoned = _star_cache(model, context, block=16, anchor=16)
    for layer in range(poisoned.num_layers):
        keys, values, _ = poisoned.buffers(layer)
        keys[:, :, poisoned.length :] = float("nan")
        values[:, :, poisoned.length :] = float("nan")
    with torch.no_grad():
        expected = encode_query(model, clean, query, CONTEXT, SingleHostGroup())
        got = encode_query(model, poisoned, query, CONTEXT, SingleHostGroup())
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_multi_block_star_differs_from_dense_but_one_block_does_not() -> None:
    """Guards the tests above against a model too weak to notice a wrong mask: blocks must change the output."""
    model = tiny_model("llama")
    context, query = random_tokens(CONTEXT, seed=10), random_tokens(QUERY, seed=11)
    dense = _dense_logits(model, torch.cat([context, query], dim=1))
    _, cache = _star_cache(model, context, block=16, anchor=1)
    with torch.no_grad():
        star = encode_query(model, cache, query, CONTEXT, SingleHostGroup())
    assert (star - dense).abs().max() > 1e-3


def test_model_without_attention_interface_is_refused_by_name() -> None:
    from transformers import MambaConfig

    with pytest.raises(ConfigurationError, match="mamba"):
        check_attention_servable(MambaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1))
