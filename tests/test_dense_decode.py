"""The dense baseline decodes like star: every ``--model.decode`` mode, the same tokens as its eager decode.

Dense is one block on one host through the engine, so its static step (and, on a GPU, the captured graph and the
compiled step) is star's; checked for a global-attention model and Gemma-3's hybrid stack with a window that cuts,
greedy and with seeded sampling (the query host's draw from the same logits), on CPU for ``static`` and on a GPU
(marked) for ``graph`` and ``compile``.
"""

from __future__ import annotations

import pytest
import torch

from model_zoo import random_tokens, tiny_model
from star_lightning.attention.kernels import KernelChoice
from star_lightning.engine.forward import uses_star_attention
from star_lightning.engine.request import generate
from star_lightning.engine.settings import GenerationSettings, StarSettings
from star_lightning.models import set_attention
from star_lightning.parallel.group import SingleHostGroup
from star_lightning.sampling import SamplingConfig

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
MODELS = {"llama": {}, "gemma3": {"sliding_window": 24}}  # Gemma-3's window cuts the 60-token prompt
SAMPLING = {"greedy": SamplingConfig(), "sampled": SamplingConfig(temperature=0.8, top_p=0.9, seed=5)}


def _decode(
    model, modes: tuple[str, ...], sampling: SamplingConfig, device: str = "cpu", kernels: KernelChoice | None = None
) -> dict[str, object]:
    context, query = random_tokens(52, seed=1).to(device), random_tokens(5, seed=2).to(device)
    settings = GenerationSettings(max_new_tokens=8, sampling=sampling)
    results = {}
    for decode in modes:
        with torch.no_grad():
            star = StarSettings(attention="dense", decode=decode)
            results[decode] = generate(model, context, query, SingleHostGroup(), star, settings, kernels=kernels)
    return results


@pytest.mark.parametrize("sampling", list(SAMPLING))
@pytest.mark.parametrize("family", list(MODELS))
def test_dense_static_decode_equals_its_eager_decode(family: str, sampling: str) -> None:
    model = tiny_model(family, **MODELS[family])
    set_attention(model, "dense")
    assert uses_star_attention(model)  # servable: dense runs through the engine
    results = _decode(model, ("eager", "static"), SAMPLING[sampling])
    assert results["static"].token_ids == results["eager"].token_ids
    assert results["static"].stats.decode_mode == "static" and len(results["static"].token_ids) == 8
    assert results["static"].context.store is not None and results["static"].context.cache is None


def test_a_model_star_cannot_serve_keeps_its_own_attention_for_dense() -> None:
    """dense's fallback: the model's own attention and cache (eager loop), where Star Attention cannot take over."""
    model = tiny_model("llama")
    model.config.layer_types = ["mamba", "full_attention"]  # a non-attention token mixer: not servable
    set_attention(model, "dense")
    assert not uses_star_attention(model)
    model.config.layer_types = None
    results = _decode(model, ("eager",), SAMPLING["greedy"])
    assert results["eager"].context.cache is not None and results["eager"].context.store is None


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("family", list(MODELS))
def test_dense_graph_and_compiled_decode_equal_its_static_decode(family: str) -> None:
    """float32 (fusion does not move choices); Gemma-3's window layers run FlexAttention inside the graph. One engine
    (kernel choice) for all: the model's step compiles once."""
    model = tiny_model(family, dtype=torch.float32, **MODELS[family]).cuda()
    set_attention(model, "dense")
    choice = KernelChoice()
    for sampling in SAMPLING.values():
        results = _decode(model, ("static", "graph", "compile"), sampling, device="cuda", kernels=choice)
        assert results["graph"].token_ids == results["static"].token_ids
        assert results["compile"].token_ids == results["static"].token_ids
        assert results["compile"].stats.decode_mode == "compile" and results["graph"].stats.decode_mode == "graph"
    assert choice.flex.failure is None and choice.graph_failure is None, (choice.flex.failure, choice.graph_failure)
