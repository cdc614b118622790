"""Star and ring keep a model's own attention semantics: sliding windows that cut, and rope scaling whose regime
follows the sequence length (float64, against transformers' own attention, one process).

The windowed references are transformers' forwards with masks built from the true positions (a query at ``p``
sees a key at ``k`` iff ``p - window < k <= p``, transformers' ``sliding_window_overlay``), so they check the engine
against the model's definition, not against the engine's own mask code. The multi-host cases (ring hops, star over
several hosts) are in test_model_semantics_distributed.py.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from model_zoo import random_tokens, tiny_model
from star_lightning.cache import KVStore
from star_lightning.engine.decode import encode_query
from star_lightning.engine.encode import encode_context
from star_lightning.engine.forward import num_layers
from star_lightning.engine.prefill import prefill_star
from star_lightning.engine.request import generate
from star_lightning.engine.settings import GenerationSettings, StarSettings
from star_lightning.models import use_star_attention
from star_lightning.parallel.group import SingleHostGroup
from star_lightning.partition import plan_blocks
from star_lightning.rope import rope_length_key

CONTEXT, QUERY, NEW, WINDOW = 70, 5, 8, 24
PROMPT = CONTEXT + QUERY
WINDOWED = {  # every layer / alternate layers (soft-capped) / Gemma-3's hybrid: a sliding layer, then a global one
    "mistral": {"sliding_window": WINDOW},
    "gemma2": {"sliding_window": WINDOW},
    "gemma3": {"sliding_window": WINDOW},
}
# Phi-3's longrope switches to the long factors past original_max_position_embeddings (72): the context alone (70)
# is below it, the prompt (75) above, so a context encoded for its own length would be in the wrong regime.
ROPES = {
    "longrope": ("phi3", {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
                          "long_factor": [1.0 + i for i in range(8)], "original_max_position_embeddings": 72}),
    "dynamic": ("llama", {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}),
    "yarn": ("llama", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                       "original_max_position_embeddings": 32}),
    "llama3": ("llama", {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
}  # fmt: skip
LENGTH_DEPENDENT = ("longrope", "dynamic")


def windowed_model(family: str):
    return tiny_model(family, **WINDOWED[family])


def rope_model(kind: str):
    """A fresh model each time: transformers' dynamic rope keeps state between forwards."""
    family, rope = ROPES[kind]
    # The dynamic rope scales past max_position_embeddings, longrope past original_max_position_embeddings (Phi-3's
    # config keeps its own copy): 72 puts the prompt beyond it and the context below.
    extra = {"max_position_embeddings": 72} if kind == "dynamic" else {}
    if kind == "longrope":
        extra = {"original_max_position_embeddings": 72}
    return tiny_model(family, rope_parameters=dict(rope), **extra)


def _reference(model) -> str:
    """transformers' SDPA is exact in float64; Gemma-2's soft-capping needs eager, whose softmax is float32."""
    return "eager" if model.config.model_type == "gemma2" else "sdpa"


def _tol(model) -> dict[str, float]:
    return {"rtol": 1e-6, "atol": 1e-6} if model.config.model_type == "gemma2" else {"rtol": 1e-9, "atol": 1e-9}


def _position_masks(model, query_positions: torch.Tensor, key_positions: torch.Tensor):
    """The model's masks written out from true positions: causal, and windowed on its sliding-window layers."""

    def mask(window: int | None) -> torch.Tensor:
        visible = key_positions[None, :] <= query_positions[:, None]  # [Lq, Lk]
        if window is not None:
            visible &= key_positions[None, :] > query_positions[:, None] - window
        return torch.where(visible, 0.0, float("-inf")).to(torch.float64)[None, None]  # [1, 1, Lq, Lk]

    window = model.config.sliding_window
    if getattr(model.config, "layer_types", None):
        return {"full_attention": mask(None), "sliding_attention": mask(window)}
    return mask(window)


def _hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.set_attn_implementation(_reference(model))
    with torch.no_grad():
        return model(ids).logits[0, -1]  # [V]


def _hf_greedy(model, ids: torch.Tensor) -> list[int]:
    model.set_attn_implementation(_reference(model))
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
            pad_token_id=0,
        )  # fmt: skip
    return out[0, ids.shape[1] :].tolist()


def _engine_logits(
    model, context, query, star: StarSettings, prompt_length: int | None = PROMPT, own: bool = False
) -> torch.Tensor:
    """First-token logits of the engine: Phase 1 as ``star`` says, then the query over it (``own``: dense with the
    model's own attention and cache, what dense runs for a model star cannot serve)."""
    if own:
        model.set_attn_implementation(_reference(model))
    else:
        use_star_attention(model)
    with torch.no_grad():
        encoded = encode_context(
            model, context, SingleHostGroup(), star, extra_capacity=QUERY, prompt_length=prompt_length
        )
        if encoded.store is not None:
            return encode_query(model, encoded.store, query, CONTEXT, SingleHostGroup())
        positions = torch.arange(CONTEXT, PROMPT).unsqueeze(0)
        return model(query, position_ids=positions, past_key_values=encoded.cache, use_cache=True).logits[0, -1]


def _engine_tokens(model, context, query, star: StarSettings, own: bool = False) -> list[int]:
    if own:
        model.set_attn_implementation(_reference(model))
    else:
        use_star_attention(model)
    with torch.no_grad():
        return generate(model, context, query, SingleHostGroup(), star, GenerationSettings(NEW)).token_ids


ONE_BLOCK = [
    StarSettings(attention="star", block_size=128),
    StarSettings(attention="ring"),
    StarSettings(attention="dense"),
]


@pytest.mark.parametrize("family", list(WINDOWED))
def test_windowed_star_and_ring_equal_dense(family: str) -> None:
    """A window that cuts (context 70, window 24): one block, ring and the dense engine == transformers' own forward
    and greedy decoding; static-shape decoding too."""
    model = windowed_model(family)
    context, query = random_tokens(CONTEXT, seed=1), random_tokens(QUERY, seed=2)
    prompt = torch.cat([context, query], dim=1)
    dense, dense_tokens = _hf_logits(model, prompt), _hf_greedy(model, prompt)
    # The window must cut: without it the same weights give other logits.
    unwindowed = tiny_model(family, sliding_window=4096)
    assert (_hf_logits(unwindowed, prompt) - dense).abs().max() > 1e-3
    for star in ONE_BLOCK:
        torch.testing.assert_close(_engine_logits(model, context, query, star), dense, **_tol(model))
        assert _engine_tokens(model, context, query, star) == dense_tokens, star.attention
    own = StarSettings(attention="dense")  # the model's own attention and cache (models star cannot serve)
    torch.testing.assert_close(_engine_logits(model, context, query, own, own=True), dense, **_tol(model))
    assert _engine_tokens(model, context, query, own, own=True) == dense_tokens
    for attention in ("star", "dense"):
        static = StarSettings(attention=attention, block_size=128, decode="static")
        assert _engine_tokens(model, context, query, static) == dense_tokens, attention


@pytest.mark.parametrize("family", list(WINDOWED))
@pytest.mark.parametrize("source", ["host", "block"])
def test_windowed_blocks_see_the_anchor_only_within_the_window(family: str, source: str) -> None:
    """Every block's K/V == transformers' forward of (anchor, block) at true positions with the model's masks from
    those positions: block 1 sees part of the anchor on sliding layers, blocks 3-4 none of it (all of it on
    Gemma-2's global layers); the anchor kept as a prefix or recomputed with each block alike."""
    model = windowed_model(family)
    context = random_tokens(CONTEXT, seed=3)
    use_star_attention(model)
    plan = plan_blocks(CONTEXT, 16, 1, 8)
    store = KVStore(num_layers(model), CONTEXT)
    with torch.no_grad():
        prefill_star(model, context, plan, SingleHostGroup(), store, anchor_source=source)
    model.set_attn_implementation(_reference(model))
    for block in plan.blocks:
        anchor = 0 if block.index == 0 else plan.anchor_length
        positions = torch.cat([torch.arange(anchor), torch.arange(block.start, block.end)])  # [a + l]
        ids = context[:, positions]  # [1, a + l]
        cache = DynamicCache()
        with torch.no_grad():
            model(
                ids, position_ids=positions[None], attention_mask=_position_masks(model, positions, positions),
                past_key_values=cache, use_cache=True,
            )  # fmt: skip
        for layer, reference in enumerate(cache.layers):
            keys, values = store.view(layer)
            span = slice(block.start, block.end)
            torch.testing.assert_close(keys[:, :, span], reference.keys[:, :, anchor:], **_tol(model))
            torch.testing.assert_close(values[:, :, span], reference.values[:, :, anchor:], **_tol(model))
        assert torch.equal(store.positions(0)[block.start : block.end], torch.arange(block.start, block.end))


@pytest.mark.parametrize("family", list(WINDOWED))
def test_windowed_phase2_equals_attention_over_the_cache(family: str) -> None:
    """Phase 2 over a blockwise cache == transformers' attention over the same K/V with the model's masks."""
    model = windowed_model(family)
    context, query = random_tokens(CONTEXT, seed=4), random_tokens(QUERY, seed=5)
    use_star_attention(model)
    plan = plan_blocks(CONTEXT, 16, 1, 16)
    store = KVStore(num_layers(model), PROMPT)
    with torch.no_grad():
        prefill_star(model, context, plan, SingleHostGroup(), store)
        reference_cache = DynamicCache()
        for layer in range(store.num_layers):
            keys, values = store.view(layer)
            reference_cache.update(keys.clone(), values.clone(), layer)
        star = encode_query(model, store, query, CONTEXT, SingleHostGroup())
        model.set_attn_implementation(_reference(model))
        queries, keys = torch.arange(CONTEXT, PROMPT), torch.arange(PROMPT)
        reference = model(
            query, position_ids=queries[None], attention_mask=_position_masks(model, queries, keys),
            past_key_values=reference_cache, use_cache=True,
        ).logits[0, -1]  # fmt: skip
    torch.testing.assert_close(star, reference, **_tol(model))


@pytest.mark.parametrize("kind", list(ROPES))
def test_rope_regime_follows_the_prompt_length(kind: str) -> None:
    """One block, ring and the dense engine == transformers' one forward over the prompt (logits) and its greedy
    decoding (tokens), for length-dependent (longrope past the original length, dynamic NTK) and static rope."""
    context, query = random_tokens(CONTEXT, seed=6), random_tokens(QUERY, seed=7)
    prompt = torch.cat([context, query], dim=1)
    dense, dense_tokens = _hf_logits(rope_model(kind), prompt), _hf_greedy(rope_model(kind), prompt)
    for star in ONE_BLOCK:
        model = rope_model(kind)
        torch.testing.assert_close(_engine_logits(model, context, query, star), dense, rtol=1e-9, atol=1e-9)
        assert _engine_tokens(rope_model(kind), context, query, star) == dense_tokens, star.attention
    if kind in LENGTH_DEPENDENT:
        # The regime matters here: the context encoded for its own length gives other logits.
        assert rope_length_key(rope_model(kind), PROMPT) == PROMPT
        unpinned = _engine_logits(rope_model(kind), context, query, ONE_BLOCK[0], prompt_length=None)
        assert (unpinned - dense).abs().max() > 1e-4
    else:
        assert rope_length_key(rope_model(kind), PROMPT) is None


def test_rope_does_not_depend_on_the_requests_before() -> None:
    """transformers' dynamic rope keeps grown frequencies between forwards; pinned, a request gives the same logits
    after a longer request as on a fresh model."""
    context, query = random_tokens(CONTEXT, seed=8), random_tokens(QUERY, seed=9)
    star = StarSettings(attention="star", block_size=128)
    fresh = _engine_logits(rope_model("dynamic"), context, query, star)
    model = rope_model("dynamic")
    longer = random_tokens(CONTEXT + 40, seed=10)
    use_star_attention(model)
    with torch.no_grad():
        generate(model, longer, query, SingleHostGroup(), star, GenerationSettings(4))
    torch.testing.assert_close(_engine_logits(model, context, query, star), fresh, rtol=0, atol=0)


def test_longrope_phase2_equals_attention_over_the_cache() -> None:
    """Phase 2 over a blockwise cache of a longrope model == transformers' attention over the same K/V."""
    model = rope_model("longrope")
    context, query = random_tokens(CONTEXT, seed=11), random_tokens(QUERY, seed=12)
    use_star_attention(model)
    plan = plan_blocks(CONTEXT, 16, 1, 16)
    store = KVStore(num_layers(model), PROMPT)
    with torch.no_grad():
        encoded = encode_context(model, context, SingleHostGroup(), StarSettings(block_size=16), extra_capacity=QUERY,
                                 prompt_length=PROMPT)  # fmt: skip
        assert encoded.store is not None and plan.num_blocks == 5
        store = encoded.store
        reference_cache = DynamicCache()
        for layer in range(store.num_layers):
            keys, values = store.view(layer)
            reference_cache.update(keys.clone(), values.clone(), layer)
        star = encode_query(model, store, query, CONTEXT, SingleHostGroup())
        model.set_attn_implementation("sdpa")
        positions = torch.arange(CONTEXT, PROMPT).unsqueeze(0)
        reference = model(query, position_ids=positions, past_key_values=reference_cache, use_cache=True).logits[0, -1]
    torch.testing.assert_close(star, reference, rtol=1e-9, atol=1e-9)


def test_a_window_that_cuts_nothing_keeps_the_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """A request shorter than the window: no windowed call, the CPU's fused kernel as without a window; a window that
    reaches the request's last position cuts."""
    from star_lightning.attention.backends import math as math_backend
    from star_lightning.attention.step import ForwardStep

    assert ForwardStep(phase="query", last_position=WINDOW - 1).window(WINDOW) is None
    assert ForwardStep(phase="query", last_position=WINDOW).window(WINDOW) == WINDOW
    calls = {"math": 0, "windowed": 0}
    math = math_backend.attention

    def counting(*args, **kwargs):
        calls["math"] += 1
        calls["windowed"] += kwargs.get("window") is not None
        return math(*args, **kwargs)

    monkeypatch.setattr(math_backend, "attention", counting)
    context, query = random_tokens(CONTEXT, seed=13), random_tokens(QUERY, seed=14)
    for window, expected in ((PROMPT + NEW, 0), (WINDOW, 1)):
        calls.update(math=0, windowed=0)
        model = tiny_model("mistral", sliding_window=window)
        _engine_tokens(model, context, query, StarSettings(attention="star", block_size=16))
        assert (calls["math"] > 0) == bool(expected) and (calls["windowed"] > 0) == bool(expected)
