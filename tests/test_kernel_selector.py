"""The attention backend is chosen once per shape class of call and kept on the engine's KernelChoice (counted by its
``selections``), whatever the number of layers, forwards and requests; a failure the engine learns from makes it
choose again. Exactness of every backend is checked in test_kernels.py and test_windowed_kernels.py."""

from __future__ import annotations

import pytest
import torch

from model_zoo import random_tokens, tiny_model
from star_lightning.attention.backends import banded, sdpa, sdpa_masked
from star_lightning.attention.backends import math as math_backend
from star_lightning.attention.kernels import KernelChoice, SlidingWindow, attention_with_lse
from star_lightning.attention.selector import shape_class
from star_lightning.engine.request import generate
from star_lightning.engine.settings import GenerationSettings, StarSettings
from star_lightning.models import use_star_attention
from star_lightning.parallel.group import SingleHostGroup


def _qkv(q_len: int, k_len: int, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(q_len * 1000 + k_len)
    q = torch.randn(1, 4, q_len, 16, dtype=dtype, generator=gen)
    k = torch.randn(1, 2, k_len, 16, dtype=dtype, generator=gen)
    v = torch.randn(1, 2, k_len, 16, dtype=dtype, generator=gen)
    return q, k, v


def test_calls_of_one_class_share_one_choice() -> None:
    """On CPU the rules read no shape or dtype: every plain call is one class; a window, soft-capping or a valid
    length is another one."""
    choice = KernelChoice()
    for q_len, k_len, dtype in ((64, 64, torch.float32), (40, 200, torch.float32), (1, 300, torch.float64)):
        attention_with_lse(*_qkv(q_len, k_len, dtype), scale=0.25, causal=True, kernels=choice)
    assert choice.selections == 1
    (shape, backend), *_ = choice.chosen.items()
    assert backend is sdpa.flash and shape.device == "cpu" and not shape.masked and shape.dtype is None
    attention_with_lse(*_qkv(64, 64), scale=0.25, causal=True, softcap=5.0, kernels=choice)
    window = SlidingWindow(8, torch.arange(64), torch.arange(64))
    attention_with_lse(*_qkv(64, 64), scale=0.25, causal=True, window=window, kernels=choice)
    attention_with_lse(*_qkv(4, 64), scale=0.25, causal=True, valid_length=torch.tensor([50]), kernels=choice)
    assert choice.selections == 4
    assert sorted(b.__module__ for b in choice.chosen.values()) == sorted(
        [sdpa.__name__, math_backend.__name__, banded.__name__, math_backend.__name__]
    )
    for _ in range(3):  # again: nothing chosen anew
        attention_with_lse(*_qkv(64, 64), scale=0.25, causal=True, window=window, kernels=choice)
        attention_with_lse(*_qkv(50, 90, torch.float64), scale=0.25, causal=False, kernels=choice)
    assert choice.selections == 4


def test_the_class_holds_what_the_choice_depends_on() -> None:
    choice = KernelChoice()
    q, k, v = _qkv(4, 20)
    base = shape_class(choice, q, k, v, None, None, None)
    assert not base.masked and not base.softcap and not base.valid_length and base.window is None
    assert shape_class(choice, q, k, v, 5.0, None, None).softcap
    assert shape_class(choice, q, k, v, None, torch.tensor([9]), None).valid_length
    aligned = SlidingWindow(8, torch.arange(4), torch.arange(4), aligned=True)
    assert shape_class(choice, q, k, v, None, None, aligned)[1:3] == (True, "aligned")
    assert shape_class(KernelChoice("flex"), q, k, v, None, None, None).masked


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_class_holds_dtype_shape_and_layout() -> None:
    choice = KernelChoice()
    q, k, v = (t.cuda().to(torch.bfloat16) for t in _qkv(4, 20))
    base = shape_class(choice, q, k, v, None, None, None)
    assert base[:5] == ("cuda", False, None, False, False)
    assert (base.dtype, base.head_dim, base.groups, base.short, base.tiles, base.split_kv_layout) == (
        torch.bfloat16, 16, 2, True, True, True,
    )  # fmt: skip
    assert not shape_class(choice, *(t.cuda() for t in _qkv(17, 20)), None, None, None).short
    assert not shape_class(choice, q, k.transpose(-1, -2).contiguous().transpose(-1, -2), v, None, None, None)[10]
    assert shape_class(choice, q, k, v, 5.0, None, None).masked  # soft-capping: the masking kernels' on CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("capture", [False, True])
def test_a_long_question_over_static_buffers_takes_the_masked_sdpa_kernel_against_float64(capture: bool) -> None:
    """A captured question (96 padded rows, 7 query heads a KV head as Qwen2.5-0.5B: beyond the split-KV kernel's
    tiles) over a store's buffers with a valid length takes ``sdpa_masked`` (not float32 ``math``), in a CUDA graph
    too; bf16 against float64 (bottom-right causal against the valid keys; the slots past them hold garbage)."""
    gen = torch.Generator().manual_seed(7)
    q_len, capacity, valid = 96, 1200, 1000
    q = torch.randn(1, 14, q_len, 64, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 2, capacity, 64, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 2, capacity, 64, generator=gen, dtype=torch.float64)
    k[:, :, valid:], v[:, :, valid:] = 1e3, 1e3  # unfilled slots: finite garbage the bias weighs 0
    kk, vv = k[:, :, :valid].repeat_interleave(7, dim=1), v[:, :, :valid].repeat_interleave(7, dim=1)
    scores = (q @ kk.transpose(-1, -2)) * 0.125  # [1, 14, 96, valid]
    last = torch.arange(q_len) + (valid - q_len)  # the last key each row sees
    scores = scores.masked_fill(torch.arange(valid)[None, :] > last[:, None], float("-inf"))
    ref_lse = torch.logsumexp(scores, dim=-1)
    ref_out = torch.softmax(scores, dim=-1) @ vv
    qc, kc, vc = (t.to("cuda", torch.bfloat16) for t in (q, k, v))
    length = torch.tensor([valid], dtype=torch.int32, device="cuda")
    choice = KernelChoice()
    attention_with_lse(qc, kc, vc, scale=0.125, causal=True, valid_length=length, kernels=choice)  # chooses
    ((_, backend),) = choice.chosen.items()
    assert backend is sdpa_masked.attention
    if capture:
        out = torch.empty(1, 14, q_len, 64, dtype=torch.bfloat16, device="cuda")
        lse = torch.empty(1, 14, q_len, dtype=torch.float32, device="cuda")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            o, s = attention_with_lse(qc, kc, vc, scale=0.125, causal=True, valid_length=length, kernels=choice)
            out.copy_(o)
            lse.copy_(s)
        graph.replay()
        torch.cuda.synchronize()
    else:
        out, lse = attention_with_lse(qc, kc, vc, scale=0.125, causal=True, valid_length=length, kernels=choice)
    assert choice.selections == 1
    torch.testing.assert_close(out.cpu().double(), ref_out, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("attention", ["star", "ring"])
def test_the_engine_chooses_once_however_many_layers_and_requests(
    attention: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 2-layer and a 4-layer model make the same few choices (per shape class, not per layer); a second request
    on the same engine, of other lengths, makes none, while the attention calls grow with layers and requests."""
    from star_lightning.attention import star

    calls = [0]
    original = star.attention_with_lse

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(star, "attention_with_lse", counted)
    selections = {}
    for layers in (2, 4):
        model = tiny_model("llama", num_hidden_layers=layers)
        use_star_attention(model)
        choice = KernelChoice()
        star_settings = StarSettings(attention=attention, block_size=24)  # long blocks, short queries
        calls[0] = 0
        with torch.no_grad():
            for request, (context, query) in enumerate(((48, 4), (70, 6))):
                generate(
                    model, random_tokens(context, seed=request), random_tokens(query, seed=10 + request),
                    SingleHostGroup(), star_settings, GenerationSettings(max_new_tokens=2), kernels=choice,
                )  # fmt: skip
                if request == 0:
                    first = choice.selections
        assert choice.selections == first == len(choice.chosen) > 0
        selections[layers] = (choice.selections, calls[0])
    assert selections[2][0] == selections[4][0]
    if attention == "star":  # the ring's calls go through ring.attention_with_lse, not star's
        assert selections[4][1] >= 2 * selections[2][1] > 0
        assert selections[4][1] > 10 * selections[4][0]


def test_a_learnt_failure_makes_the_engine_choose_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """FlexAttention failing (simulated on CPU, where ``flex`` runs eagerly) is learnt: the next call of the class is
    chosen again (and takes the tiles of ``math``), the ones after that are not."""
    choice = KernelChoice()

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for you")

    monkeypatch.setattr(choice.flex, "function", lambda device: broken)
    q, k, v = _qkv(8, 8, torch.float64)
    window = SlidingWindow(4, torch.arange(8), torch.arange(8))
    shape = shape_class(choice, q, k, v, None, None, window)
    from star_lightning.attention.backends import flex as flex_backend

    choice.chosen[shape] = flex_backend.attention  # as CUDA's ``auto`` would choose
    with pytest.warns(UserWarning, match="FlexAttention failed"):
        attention_with_lse(q, k, v, scale=0.3, causal=True, kernels=choice, window=window)
    assert choice.chosen == {}
    for _ in range(2):
        attention_with_lse(q, k, v, scale=0.3, causal=True, kernels=choice, window=window)
    assert choice.selections == 1 and choice.chosen[shape] is banded.attention
