"""The local attention kernels against a float64 reference, and the static-shape decode path against the eager one.

CPU tests cover the ``math`` backend (the reference itself, with a valid length over an unfilled buffer), the CPU
flash kernel (``sdpa`` on CPU, what ``auto`` uses there) and the static decode step of the engine; the CUDA kernels
(``sdpa``, ``cudnn``, ``triton``) are checked on a GPU only.
"""

from __future__ import annotations

import pytest
import torch

from model_zoo import random_tokens, tiny_model
from star_lightning.attention import kernels, triton_decode
from star_lightning.attention.merge import merge_partials
from star_lightning.engine.request import generate
from star_lightning.engine.settings import GenerationSettings, StarSettings
from star_lightning.engine.static_decoder import StaticDecoder
from star_lightning.models import use_star_attention
from star_lightning.parallel.group import SingleHostGroup

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _qkv(q_heads: int, kv_heads: int, q_len: int, k_len: int, dim: int, dtype: torch.dtype, device: str, seed: int):
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(1, q_heads, q_len, dim, dtype=dtype, device=device, generator=gen)
    k = torch.randn(1, kv_heads, k_len, dim, dtype=dtype, device=device, generator=gen)
    v = torch.randn(1, kv_heads, k_len, dim, dtype=dtype, device=device, generator=gen)
    return q, k, v


def _explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool):
    """Attention written out in float64 with repeated K/V heads: the independent reference."""
    groups = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(groups, dim=1)  # [B, Hq, Lk, D]
    v = v.double().repeat_interleave(groups, dim=1)
    scores = q.double() @ k.transpose(-1, -2) * scale  # [B, Hq, Lq, Lk]
    if causal:
        q_len, k_len = q.shape[2], k.shape[2]
        hidden = torch.arange(k_len)[None, :] > (torch.arange(q_len)[:, None] + k_len - q_len)
        scores = scores.masked_fill(hidden.to(scores.device), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return torch.softmax(scores, dim=-1) @ v, lse


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("q_len", [1, 5])
def test_math_with_valid_length_ignores_the_unfilled_tail(causal: bool, q_len: int) -> None:
    """A buffer with a valid length: keys past it (NaN here, as unwritten memory may be) are never seen."""
    q, k, v = _qkv(4, 2, q_len, 40, 8, torch.float64, "cpu", seed=q_len)
    valid = 29
    k_buf, v_buf = k.clone(), v.clone()
    k_buf[:, :, valid:] = float("nan")
    v_buf[:, :, valid:] = float("nan")
    valid_length = torch.tensor([valid], dtype=torch.int32)
    out, lse = kernels.attention_with_lse(q, k_buf, v_buf, scale=0.3, causal=causal, valid_length=valid_length)
    ref_out, ref_lse = _explicit(q, k[:, :, :valid], v[:, :, :valid], 0.3, causal)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)


def test_auto_kernel_choices_are_validated() -> None:
    with pytest.raises(ValueError, match="prefill kernel"):
        kernels.KernelChoice(prefill="nope")
    with pytest.raises(ValueError, match="decode kernel"):
        kernels.KernelChoice(decode="nope")
    with pytest.raises(ValueError, match="attention backend"):
        kernels.KernelChoice(backend="nope")


def test_triton_backend_refuses_cpu_with_a_clear_message() -> None:
    q, k, v = _qkv(4, 2, 1, 10, 8, torch.float32, "cpu", seed=0)
    with pytest.raises(ValueError, match="triton"):
        kernels.attention_with_lse(q, k, v, scale=0.3, causal=True, kernels=kernels.KernelChoice("triton"))


@pytest.mark.parametrize("mode", ["static"])
@pytest.mark.parametrize("attention", ["star", "ring"])
def test_static_decode_equals_eager_decode(mode: str, attention: str) -> None:
    """The static-shape decode step (preallocated cache + device-side valid length) gives the eager tokens."""
    model = tiny_model("llama")
    use_star_attention(model)
    context, query = random_tokens(48, seed=1), random_tokens(4, seed=2)
    settings = GenerationSettings(max_new_tokens=7)
    results = {}
    for decode in ("eager", mode):
        star = StarSettings(attention=attention, block_size=16, decode=decode)
        with torch.no_grad():
            results[decode] = generate(model, context, query, SingleHostGroup(), star, settings)
    assert results[mode].token_ids == results["eager"].token_ids
    assert results[mode].stats.decode_mode == mode
    assert len(results[mode].token_ids) == 7


def test_graph_decode_needs_cuda() -> None:
    from star_lightning.engine.decode import resolve_decode_mode

    assert resolve_decode_mode("auto", [torch.device("cpu")]) == "eager"
    with pytest.raises(ValueError, match="CUDA"):
        resolve_decode_mode("graph", [torch.device("cpu")])
    two_gpus = [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert resolve_decode_mode("auto", two_gpus) == "eager"  # a model spread over a host's GPUs
    with pytest.raises(ValueError, match="spread over 2 GPUs"):
        resolve_decode_mode("static", two_gpus)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("q_len", "k_len", "causal"), [(64, 64, True), (48, 160, True), (1, 160, False), (1, 1, True)])
def test_cpu_kernels_against_float64(backend: str, dtype: torch.dtype, q_len: int, k_len: int, causal: bool) -> None:
    q, k, v = _qkv(8, 2, q_len, k_len, 32, dtype, "cpu", seed=q_len + k_len)
    out, lse = kernels.attention_with_lse(q, k, v, scale=32**-0.5, causal=causal, kernels=kernels.KernelChoice(backend))
    ref_out, ref_lse = _explicit(q, k, v, 32**-0.5, causal)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out.double(), ref_out, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=tolerance, atol=tolerance)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


def test_auto_on_cpu_uses_the_flash_kernel_except_with_soft_capping() -> None:
    q, k, _ = _qkv(4, 2, 8, 8, 16, torch.float32, "cpu", seed=0)
    assert kernels.resolve_backend(kernels.KernelChoice(), q, k, softcap=None) == "sdpa"
    assert kernels.resolve_backend(kernels.KernelChoice(), q, k, softcap=30.0) == "math"


def test_cuda_only_backend_on_cpu_is_refused_by_name() -> None:
    q, k, v = _qkv(4, 2, 8, 8, 16, torch.float32, "cpu", seed=0)
    with pytest.raises(ValueError, match="'cudnn' attention backend needs CUDA"):
        kernels.attention_with_lse(q, k, v, scale=0.25, causal=True, kernels=kernels.KernelChoice("cudnn"))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["sdpa", "cudnn"])
@pytest.mark.parametrize(("q_len", "k_len", "causal"), [(256, 256, True), (256, 768, True), (128, 384, False)])
def test_fused_prefill_kernels_against_float64(backend: str, q_len: int, k_len: int, causal: bool) -> None:
    q, k, v = _qkv(8, 2, q_len, k_len, 128, torch.bfloat16, "cuda", seed=q_len + k_len)
    out, lse = kernels.attention_with_lse(
        q, k, v, scale=128**-0.5, causal=causal, kernels=kernels.KernelChoice(backend)
    )
    ref_out, ref_lse = _explicit(q, k, v, 128**-0.5, causal)
    assert float((out.double() - ref_out).norm() / ref_out.norm()) < 1e-2
    assert float((lse.double() - ref_lse).abs().max()) < 5e-2


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(not triton_decode.available(), reason="needs Triton")
@pytest.mark.parametrize(("q_len", "causal"), [(1, True), (1, False), (4, True)])
def test_triton_split_kv_against_float64(q_len: int, causal: bool) -> None:
    q, k, v = _qkv(32, 8, q_len, 5000, 128, torch.bfloat16, "cuda", seed=q_len)
    valid = 3333
    k_buf, v_buf = k.clone(), v.clone()
    k_buf[:, :, valid:] = float("nan")
    v_buf[:, :, valid:] = float("nan")
    valid_length = torch.tensor([valid], dtype=torch.int32, device="cuda")
    out, lse = kernels.attention_with_lse(
        q,
        k_buf,
        v_buf,
        scale=128**-0.5,
        causal=causal,
        kernels=kernels.KernelChoice("triton"),
        valid_length=valid_length,
    )
    ref_out, ref_lse = _explicit(q, k[:, :, :valid], v[:, :, :valid], 128**-0.5, causal)
    assert float((out.double() - ref_out).norm() / ref_out.norm()) < 1e-2
    assert float((lse.double() - ref_lse).abs().max()) < 5e-2


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(not triton_decode.available(), reason="needs Triton")
@pytest.mark.parametrize(("q_len", "causal"), [(16, True), (17, True), (33, True), (64, True), (40, False)])
def test_triton_takes_a_short_query_in_tiles_against_float64(q_len: int, causal: bool) -> None:
    """A Phase 2 question of up to 64 tokens (4 query heads per KV head): ``auto`` runs it on the split-KV kernel, tile
    by tile, each chunk of positions seeing its own causal prefix; longer ones go to the fused prefill kernel."""
    q, k, v = _qkv(32, 8, q_len, 5000, 128, torch.bfloat16, "cuda", seed=q_len)
    choice = kernels.KernelChoice()
    assert kernels.resolve_backend(choice, q, k, None, v) == "triton"
    longer = torch.randn(1, 32, 65, 128, dtype=torch.bfloat16, device="cuda")  # 4 query heads per KV head: 260 rows
    assert kernels.resolve_backend(choice, longer, k, None, v) == choice.prefill
    valid = 3333
    k_buf, v_buf = k.clone(), v.clone()
    k_buf[:, :, valid:] = float("nan")
    v_buf[:, :, valid:] = float("nan")
    valid_length = torch.tensor([valid], dtype=torch.int32, device="cuda")
    ref_out, ref_lse = _explicit(q, k[:, :, :valid], v[:, :, :valid], 128**-0.5, causal)
    for buffers, length in (((k_buf, v_buf), valid_length), ((k[:, :, :valid], v[:, :, :valid]), None)):
        out, lse = kernels.attention_with_lse(
            q, *buffers, scale=128**-0.5, causal=causal, kernels=choice, valid_length=length
        )
        assert float((out.double() - ref_out).norm() / ref_out.norm()) < 1e-2
        assert float((lse.double() - ref_lse).abs().max()) < 5e-2


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(not triton_decode.available(), reason="needs Triton")
@pytest.mark.parametrize("layout", ["stacked", "gathered", "broadcast"])
def test_triton_merge_of_host_partials_against_float64(layout: str) -> None:
    """Phase 2's N-way merge in one kernel == the float64 torch merge, for the tensors the groups hand it: stacked
    partials, a gathered buffer's views (lse strided by D + 1) and a simulated group's broadcast (stride 0); empty
    hosts and rows with no keys anywhere included."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    hosts, shape = 5, (1, 32, 3)  # [N, B, H, L, D=128]
    packed = torch.randn(hosts, *shape, 129, device="cuda", generator=gen) * 4  # lse as the last channel
    packed[1, ..., -1] = float("-inf")  # a host with no keys
    packed[:, 0, 7, 2, -1] = float("-inf")  # a row no host has keys for
    if layout == "gathered":
        outs, lses = packed[..., :-1], packed[..., -1]
    elif layout == "stacked":
        outs, lses = packed[..., :-1].to(torch.bfloat16).contiguous(), packed[..., -1].contiguous()
    else:
        outs = packed[0, ..., :-1].to(torch.bfloat16).unsqueeze(0).expand(hosts, *shape, 128)
        lses = packed[0, ..., -1].contiguous().unsqueeze(0).expand(hosts, *shape)
    assert triton_decode.merge_supports(outs, lses)
    out, lse = merge_partials(outs, lses)
    ref_out, ref_lse = merge_partials(outs.double().cpu(), lses.double().cpu())
    assert out.dtype == outs.dtype and out.shape == ref_out.shape
    seen = torch.isfinite(ref_lse)
    assert not seen.all() and torch.isneginf(lse.cpu()[~seen]).all() and (out.cpu()[~seen] == 0).all()
    tol = 1e-5 if outs.dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double().cpu()[seen], ref_out[seen], rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double().cpu()[seen], ref_lse[seen], rtol=1e-6, atol=1e-5)


def test_the_merge_kernel_reads_only_evenly_strided_rows() -> None:
    """Which stacked partials one kernel can walk by a single row stride (the rest merge in torch)."""
    packed = torch.zeros(2, 3, 4, 129)
    assert triton_decode._row_stride(packed[0, ..., :-1], 1) == 129
    assert triton_decode._row_stride(packed[0, ..., -1], 0) == 129
    assert triton_decode._row_stride(torch.zeros(3, 4, 128), 1) == 128
    assert triton_decode._row_stride(torch.zeros(1, 1, 128), 1) == 0
    assert triton_decode._row_stride(torch.zeros(4, 3, 128).transpose(0, 1), 1) is None
    assert triton_decode._row_stride(torch.zeros(3, 8, 128)[:, :4], 1) is None


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_decode_replays_the_static_step(dtype: torch.dtype) -> None:
    """The captured CUDA graph runs the same kernels as the static step: the same tokens, token by token."""
    model = tiny_model("llama", dtype=dtype).cuda()
    use_star_attention(model)
    context, query = random_tokens(300, seed=3).cuda(), random_tokens(4, seed=4).cuda()
    settings = GenerationSettings(max_new_tokens=9)
    results = {}
    for decode in ("static", "graph"):
        star = StarSettings(attention="star", block_size=100, decode=decode)
        with torch.no_grad():
            results[decode] = generate(model, context, query, SingleHostGroup(), star, settings)
    assert results["graph"].token_ids == results["static"].token_ids
    assert results["graph"].stats.decode_mode == "graph"


@pytest.mark.gpu
@needs_cuda
def test_compiled_decode_gives_the_static_steps_tokens_and_reuses_its_compilation() -> None:
    """The torch.compile'd step (float32: fusion does not move greedy choices) decodes what the static step does;
    a second request (another context length) reuses the compiled forward."""
    model = tiny_model("llama", dtype=torch.float32).cuda()
    use_star_attention(model)
    settings = GenerationSettings(max_new_tokens=9)
    choice = kernels.KernelChoice()
    for length in (300, 420):
        context, query = random_tokens(length, seed=3).cuda(), random_tokens(4, seed=4).cuda()
        results = {}
        for decode in ("static", "compile"):
            star = StarSettings(attention="star", block_size=100, decode=decode)
            with torch.no_grad():
                results[decode] = generate(model, context, query, SingleHostGroup(), star, settings, kernels=choice)
        assert results["compile"].token_ids == results["static"].token_ids
        assert results["compile"].stats.decode_mode == "compile"
    assert list(choice.compiled.keys()) == [model]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("decode", ["graph", "compile"])
def test_a_kept_context_replays_its_captured_step_for_the_next_query(decode: str) -> None:
    """The next query over a kept context replays the step captured for the first (same store, same buffers) and
    decodes what a freshly encoded context decodes."""
    model = tiny_model("llama", dtype=torch.float32).cuda()
    use_star_attention(model)
    context = random_tokens(300, seed=3).cuda()
    # Queries of one length fit the room the first left (a longer one would grow the store: a new capture).
    first, second = random_tokens(6, seed=4).cuda(), random_tokens(6, seed=5).cuda()
    star, settings = StarSettings(block_size=100, decode=decode), GenerationSettings(max_new_tokens=9)
    group = SingleHostGroup()  # the strategy's one group, as predict passes it for every request
    with torch.no_grad():
        fresh = generate(model, context, second, group, star, settings)
        kept = generate(model, context, first, group, star, settings)
        graphs = kept.context.store.allocation.graphs
        before = dict(graphs)
        reused = generate(model, context, second, group, star, settings, kept=kept.context)
    assert reused.stats.context_reused and reused.context is kept.context
    # The one decode step (and the query's forward, blocks' graphs) kept with the store's buffers: nothing new.
    assert sum(isinstance(graph, StaticDecoder) for graph in graphs.values()) == 1
    assert graphs == before
    assert reused.stats.decode_setup_s == 0.0  # replayed, not captured again
    assert reused.token_ids == fresh.token_ids


@pytest.mark.gpu
@needs_cuda
def test_a_decode_step_that_cannot_be_compiled_decodes_uncaptured_with_the_models_forward(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """torch.compile failing on the step (its errors are RuntimeErrors): one warning, then the model's own forward,
    uncaptured, decodes what the static step decodes."""
    model = tiny_model("llama", dtype=torch.float32).cuda()
    use_star_attention(model)

    def refuses(*args: object, **kwargs: object) -> object:
        raise RuntimeError("BackendCompilerFailed: backend='inductor' raised an error")

    context, query = random_tokens(300, seed=3).cuda(), random_tokens(4, seed=4).cuda()
    settings = GenerationSettings(max_new_tokens=9)
    with torch.no_grad():
        static = generate(model, context, query, SingleHostGroup(), StarSettings(block_size=100, decode="static"),
                          settings)  # fmt: skip
        choice = kernels.KernelChoice()
        monkeypatch.setattr(choice, "compiled_forward", lambda model: refuses)
        with pytest.warns(UserWarning, match="capturing the decode step as a CUDA graph failed"):
            compiled = generate(model, context, query, SingleHostGroup(),
                                StarSettings(block_size=100, decode="compile"), settings, kernels=choice)  # fmt: skip
    assert compiled.token_ids == static.token_ids and compiled.stats.decode_mode == "static"
