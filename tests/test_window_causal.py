"""``window_causal``: an aligned sliding window as two batched causal calls (no mask), against the float64 rule."""

from __future__ import annotations

import pytest
import torch

from model_zoo import random_tokens, tiny_model
from star_lightning.attention import kernels, selector
from star_lightning.attention.backends import window_causal
from star_lightning.attention.kernels import KernelChoice, SlidingWindow, attention_with_lse
from star_lightning.engine.encode import encode_context
from star_lightning.engine.settings import StarSettings
from star_lightning.models import use_star_attention
from star_lightning.parallel.group import SingleHostGroup

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _reference(q, k, v, scale, positions, window):
    """Float64: a row at position ``p`` sees the keys at ``p - window < k <= p`` (K/V heads repeated)."""
    groups = q.shape[1] // k.shape[1]
    k, v = (x.double().repeat_interleave(groups, dim=1) for x in (k, v))
    scores = q.double() @ k.transpose(-1, -2) * scale  # [B, Hq, L, L]
    qp, kp = positions[:, None], positions[None, :]
    scores = scores.masked_fill((kp > qp) | (kp <= qp - window), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hq, L]
    return torch.softmax(scores, dim=-1) @ v, lse


def _qkv(batch, heads, kv_heads, length, dim, dtype=torch.float64, device="cpu", seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    return (
        torch.randn(batch, h, length, dim, dtype=dtype, device=device, generator=gen)
        for h in (heads, kv_heads, kv_heads)
    )


@pytest.mark.parametrize(
    ("batch", "heads", "kv_heads", "length", "window"),
    [
        (1, 4, 1, 64, 16),  # chunks of the window, one K/V head (Gemma-3's layout)
        (1, 4, 2, 70, 16),  # the last chunk ragged (padded)
        (2, 2, 2, 37, 5),  # odd window, two requests
        (1, 4, 2, 16, 16),  # the window is the whole call: plain causal
        (1, 4, 2, 10, 24),  # the window longer than the call
        (1, 2, 1, 12, 1),  # each row sees itself only
        (1, 2, 1, 12, 2),
    ],
)
def test_an_aligned_window_as_two_causal_calls_equals_the_rule(batch, heads, kv_heads, length, window) -> None:
    """Float64 on CPU (the flash kernel): every row's keys are the window's, each in one call, merged exactly."""
    q, k, v = _qkv(batch, heads, kv_heads, length, 8, seed=length + window)
    positions = torch.arange(500, 500 + length)
    call = SlidingWindow(window, positions, positions, aligned=True)
    out, lse = window_causal.attention(q, k, v, scale=0.37, causal=True, window=call, kernels=KernelChoice())
    ref_out, ref_lse = _reference(q, k, v, 0.37, positions, window)
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)


def test_what_it_takes() -> None:
    cpu = torch.zeros(1, 2, 8, 16)
    assert window_causal.supports(cpu, None) and not window_causal.supports(cpu, 30.0)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(("length", "window", "dim"), [(2048, 512, 256), (1000, 512, 256), (300, 24, 64)])
def test_an_aligned_window_on_cuda_against_float64(length, window, dim) -> None:
    """bf16 on the GPU's flash kernel, Gemma-3's shape among them, against float64: what the selector takes for a
    long aligned window inside a CUDA graph capture, replayed on new inputs."""
    q, k, v = (x.contiguous() for x in _qkv(1, 4, 1, length, dim, dtype=torch.bfloat16, device="cuda", seed=1))
    positions = torch.arange(4096, 4096 + length, device="cuda")
    call = SlidingWindow(window, positions, positions, aligned=True)
    choice = KernelChoice()
    with torch.no_grad():
        attention_with_lse(q, k, v, scale=0.0625, causal=True, kernels=choice, window=call)  # warm-up (FlexAttention)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            assert kernels.resolve_masked_backend(choice, q, call) == "window_causal"  # the selector's choice here
            out, lse = attention_with_lse(q, k, v, scale=0.0625, causal=True, kernels=choice, window=call)
        new = _qkv(1, 4, 1, length, dim, dtype=torch.bfloat16, device="cuda", seed=2)
        for buffer, values in zip((q, k, v), new, strict=True):
            buffer.copy_(values)
        graph.replay()
    ref_out, ref_lse = _reference(q.cpu(), k.cpu(), v.cpu(), 0.0625, positions.cpu(), window)
    torch.testing.assert_close(out.cpu().double(), ref_out, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    ("family", "overrides"), [("mistral", {"sliding_window": 24}), ("gemma3", {"sliding_window": 24})]
)
@pytest.mark.parametrize("lookback", [0, 20])
def test_the_engine_stores_the_same_kv_with_window_causal_for_its_aligned_windows(
    family: str, overrides: dict, lookback: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Float64 on CPU, star blocks of 64 after an anchor of 64 (a lookback of 20 too): with the engine's aligned
    windowed calls sent to ``window_causal`` (on a GPU: inside a captured block) every layer's stored K/V equal
    those of the CPU path, to 1e-10; the backend took the calls."""
    model = tiny_model(family, **overrides)
    use_star_attention(model)
    tokens = random_tokens(300, seed=5)
    star = StarSettings(block_size=64, lookback_tokens=lookback)
    taken = []
    original = selector.resolve_masked_backend

    def aligned_to_window_causal(choice, query, window, valid_length=None, softcap=None, key=None, value=None):
        if window is not None and window.aligned and valid_length is None and query.shape[2] > 16:
            taken.append(query.shape[2])
            return "window_causal"
        return original(choice, query, window, valid_length, softcap, key, value)

    stores = []
    with torch.no_grad():
        for patched in (False, True):
            if patched:
                monkeypatch.setattr(selector, "resolve_masked_backend", aligned_to_window_causal)
            encoded = encode_context(model, tokens, SingleHostGroup(), star, extra_capacity=4, kernels=KernelChoice())
            assert encoded.store is not None
            stores.append([encoded.store.view(layer) for layer in range(model.config.num_hidden_layers)])
    assert taken  # the blocks' own windowed calls went to the backend
    for (keys, values), (ref_keys, ref_values) in zip(stores[1], stores[0], strict=True):
        torch.testing.assert_close(keys, ref_keys, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(values, ref_values, rtol=1e-10, atol=1e-10)
