"""Fused q/k/v and gate/up projections (star_lightning.projections) against the model's own: the same logits in float64,
the same generated tokens and stored K/V through the engine, no weight duplicated, no activation kept."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model_zoo import FAMILIES, random_tokens, tiny_model
from star_lightning.engine.request import generate
from star_lightning.engine.settings import GenerationSettings, StarSettings
from star_lightning.models import use_star_attention
from star_lightning.parallel.group import SingleHostGroup
from star_lightning.projections import FusedLinear, FusedView, fuse_projections

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _pair(family: str, dtype: torch.dtype = torch.float64) -> tuple[nn.Module, nn.Module, int]:
    plain, fused = tiny_model(family, dtype=dtype), tiny_model(family, dtype=dtype)
    return plain, fused, fuse_projections(fused)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_fused_model_computes_the_models_logits(family: str) -> None:
    plain, fused, groups = _pair(family)
    layers = plain.config.num_hidden_layers
    own = sum(1 for module in plain.modules() if hasattr(module, "qkv_proj") or hasattr(module, "gate_up_proj"))
    assert groups == 2 * layers - own  # every layer's q/k/v and gate/up, where the family keeps them apart
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in plain.parameters())
    ids = random_tokens(40, seed=1)
    with torch.no_grad():
        expected, got = plain(ids).logits, fused(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert all(module._input is None for module in fused.modules() if isinstance(module, FusedLinear))


@pytest.mark.parametrize(
    ("family", "overrides"), [("llama", {}), ("qwen2", {}), ("gemma3", {}), ("mistral", {"sliding_window": 8})]
)
def test_star_through_the_engine_answers_and_stores_the_same_with_fused_projections(
    family: str, overrides: dict
) -> None:
    plain, fused = tiny_model(family, **overrides), tiny_model(family, **overrides)
    fuse_projections(fused)
    context, query = random_tokens(150, seed=3), random_tokens(7, seed=4)
    star, settings = StarSettings(block_size=40), GenerationSettings(max_new_tokens=6)
    results = []
    for model in (plain, fused):
        use_star_attention(model)
        with torch.no_grad():
            results.append(generate(model, context, query, SingleHostGroup(), star, settings))
    assert results[1].token_ids == results[0].token_ids
    stores = [result.context.store for result in results]
    assert stores[0] is not None and stores[1] is not None and stores[0].length == stores[1].length
    for layer in range(plain.config.num_hidden_layers):
        for got, expected in zip(stores[1].view(layer), stores[0].view(layer), strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_projections_that_differ_or_are_not_plain_linears_are_left_alone() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(6, 4), nn.Linear(8, 4)
            self.gate_proj, self.up_proj = nn.Linear(8, 8), nn.Identity()

    odd = Odd()
    assert fuse_projections(odd) == 0 and isinstance(odd.q_proj, nn.Linear)
    mixed = nn.Module()
    mixed.q_proj, mixed.k_proj, mixed.v_proj = nn.Linear(8, 8, bias=True), nn.Linear(8, 4, bias=False), nn.Linear(8, 4)
    assert fuse_projections(mixed) == 1 and isinstance(mixed.k_proj, FusedView)
    x = torch.randn(3, 8)
    fused = mixed.q_proj_k_proj_v_proj_fused
    assert isinstance(fused, FusedLinear) and fused.bias is not None
    k = mixed.k_proj(x)  # any order: the first view computes the product
    q, v = mixed.q_proj(x), mixed.v_proj(x)
    assert q.shape == (3, 8) and k.shape == (3, 4) and v.shape == (3, 4)
    torch.testing.assert_close(torch.cat([q, k, v], dim=-1), x @ fused.weight.T + fused.bias)
    assert fused._input is None  # every view served: nothing kept


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("decode", ["graph", "compile"])
def test_fused_projections_in_the_captured_and_compiled_decode_step(decode: str) -> None:
    """On the GPU path (a CUDA graph of the step, or of its torch.compile'd forward) the fused views decode what
    the model's own projections decode (float32)."""
    plain, fused = (tiny_model("qwen2", dtype=torch.float32).cuda() for _ in range(2))
    fuse_projections(fused)
    context, query = random_tokens(300, seed=3).cuda(), random_tokens(6, seed=4).cuda()
    star, settings = StarSettings(block_size=100, decode=decode), GenerationSettings(max_new_tokens=9)
    tokens = []
    for model in (plain, fused):
        use_star_attention(model)
        with torch.no_grad():
            tokens.append(generate(model, context, query, SingleHostGroup(), star, settings).token_ids)
    assert tokens[1] == tokens[0]
