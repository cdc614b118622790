"""Sliding-window and soft-capped calls on every kernel that takes them, against attention written out in float64.

The calls are the shapes the engine makes: a forward attending to itself, a block over the anchor (partly and not
at all in reach), Phase 2 over a store with unfilled slots, a ring hop over another host's two chunks, a query
whose window holds no key. CPU: ``math`` (the reference), the tiled CPU path ``auto`` takes (``banded``) and
FlexAttention eagerly (``flex``), all through :func:`attention_with_lse`; the block-sparse tiles FlexAttention skips
are checked against the dense mask. GPU (marked): compiled FlexAttention in bf16 and float32 against float64.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from star_lightning.attention import flex, kernels, selector
from star_lightning.attention.backends import sdpa_masked
from star_lightning.attention.kernels import KernelChoice, SlidingWindow, attention_with_lse

WINDOW = 24


def _explicit(q, k, v, scale, query_positions, key_positions, window, softcap=None, valid=None):
    """Float64, repeated K/V heads, the positional window rule, keys past ``valid`` unseen."""
    if valid is not None:
        k, v, key_positions = k[:, :, :valid], v[:, :, :valid], key_positions[:valid]
    groups = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(groups, dim=1)  # [B, Hq, Lk, D]
    v = v.double().repeat_interleave(groups, dim=1)
    scores = q.double() @ k.transpose(-1, -2) * scale  # [B, Hq, Lq, Lk]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    qp, kp = query_positions[:, None], key_positions[None, :]
    hidden = kp > qp
    if window is not None:
        hidden = hidden | (kp <= qp - window)
    scores = scores.masked_fill(hidden, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.where(torch.isneginf(lse)[..., None], 0.0, torch.exp(scores - lse[..., None]))
    return weights @ v, lse


def _qkv(q_len: int, k_len: int, dtype: torch.dtype = torch.float64, seed: int = 0, device: str = "cpu"):
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(1, 4, q_len, 16, dtype=dtype, device=device, generator=gen)
    k = torch.randn(1, 2, k_len, 16, dtype=dtype, device=device, generator=gen)
    v = torch.randn(1, 2, k_len, 16, dtype=dtype, device=device, generator=gen)
    return q, k, v


def _span(start: int, stop: int) -> torch.Tensor:
    return torch.arange(start, stop)


# (name, query positions, key positions, causal, valid length or None)
CALLS = [
    ("own forward", _span(300, 600), _span(300, 600), True, None),
    ("anchor partly in reach", _span(40, 300), _span(0, 48), False, None),
    ("anchor out of reach", _span(300, 500), _span(0, 48), False, None),
    ("query over a store", _span(700, 705), torch.cat([_span(200, 700), _span(700, 705), _span(0, 11)]), True, 505),
    ("decode token", _span(704, 705), torch.cat([_span(200, 705), _span(0, 11)]), True, 505),
    ("ring hop over two chunks", _span(600, 700), torch.cat([_span(100, 200), _span(640, 690)]), False, None),
]


@pytest.mark.parametrize("backend", ["math", "auto", "flex"])
@pytest.mark.parametrize(("name", "query_positions", "key_positions", "causal", "valid"), CALLS)
def test_windowed_call_against_float64(backend, name, query_positions, key_positions, causal, valid) -> None:
    q, k, v = _qkv(query_positions.shape[0], key_positions.shape[0], seed=len(name))
    if valid is not None:  # unfilled slots: NaN for the kernels that slice or zero them; FlexAttention gives them
        # zero weight, so they must be finite (the KV store zeroes its buffers when it allocates them)
        garbage = 1e6 if backend == "flex" else float("nan")
        k[:, :, valid:] = garbage
        v[:, :, valid:] = garbage
    window = SlidingWindow(WINDOW, query_positions, key_positions)
    valid_length = None if valid is None else torch.tensor([valid], dtype=torch.int32)
    out, lse = attention_with_lse(
        q, k, v, scale=0.3, causal=causal, kernels=KernelChoice(backend), valid_length=valid_length, window=window
    )
    ref_out, ref_lse = _explicit(q, k, v, 0.3, query_positions, key_positions, WINDOW, valid=valid)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64


def test_auto_on_cpu_runs_windows_in_tiles_and_the_rest_as_before() -> None:
    q, _, _ = _qkv(4, 4)
    window = SlidingWindow(WINDOW, _span(0, 4), _span(0, 4))
    choice = KernelChoice()
    assert kernels.resolve_masked_backend(choice, q, window) == "banded"
    assert kernels.resolve_masked_backend(KernelChoice("math"), q, window) == "math"
    assert kernels.resolve_masked_backend(KernelChoice("flex"), q, window) == "flex"
    assert kernels.resolve_masked_backend(choice, q, None) == "math"  # soft-capping alone, on CPU


def test_the_tiles_reach_only_what_the_window_can() -> None:
    """A 2K forward with a window of 512: every tile of 256 rows reaches at most 256 + 512 keys."""
    positions = _span(0, 2048)
    tiles = SlidingWindow(512, positions, positions).band_tiles(2048)
    assert tiles is not None and len(tiles) == 8
    assert all(cols.stop - cols.start <= 256 + 511 for _, cols in tiles)
    assert tiles[-1] == (slice(1792, 2048), slice(1792 - 511, 2048))


def test_keys_out_of_order_fall_back_to_math() -> None:
    keys = torch.cat([_span(50, 60), _span(0, 10)])
    q, k, v = _qkv(5, keys.shape[0])
    window = SlidingWindow(WINDOW, _span(55, 60), keys)
    assert window.band_tiles(keys.shape[0]) is None
    out, lse = attention_with_lse(q, k, v, scale=0.3, causal=False, window=window)
    ref_out, ref_lse = _explicit(q, k, v, 0.3, _span(55, 60), keys, WINDOW)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal", [True, False])
def test_flex_soft_capping_without_a_window(causal: bool) -> None:
    """Gemma-2's global layers: soft-capped, index-causal (bottom-right), some keys unfilled."""
    q, k, v = _qkv(6, 40)
    valid = torch.tensor([33], dtype=torch.int32)
    out, lse = attention_with_lse(
        q, k, v, scale=0.3, causal=causal, softcap=5.0, kernels=KernelChoice("flex"), valid_length=valid
    )
    query_positions = torch.arange(27, 33) if causal else torch.full((6,), 10**6)
    ref_out, ref_lse = _explicit(q, k, v, 0.3, query_positions, torch.arange(40), None, softcap=5.0, valid=33)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("name", "query_positions", "key_positions", "causal", "valid"), CALLS)
def test_flex_tiles_hold_every_visible_pair_and_full_tiles_only_visible_ones(
    name, query_positions, key_positions, causal, valid
) -> None:
    """The block-sparse mask: a skipped tile has no visible pair, a tile run without the mask has only visible
    ones (the eager reference evaluates the mask everywhere, so this is checked on its own)."""
    valid_length = None if valid is None else torch.tensor([valid], dtype=torch.int32)
    mask = flex.positional_mask(query_positions, key_positions, WINDOW, valid_length)
    visible, full = mask.tiles()
    qp, kp = query_positions[:, None], key_positions[None, :]
    dense = (kp <= qp) & (kp > qp - WINDOW)
    if valid is not None:
        dense &= torch.arange(key_positions.shape[0])[None, :] < valid
    q_len, k_len = dense.shape
    padded = torch.zeros(visible.shape[0] * flex.BLOCK, visible.shape[1] * flex.BLOCK, dtype=torch.bool)
    padded[:q_len, :k_len] = dense
    inside = torch.zeros_like(padded)
    inside[:q_len, :k_len] = True
    tiles = padded.view(visible.shape[0], flex.BLOCK, visible.shape[1], flex.BLOCK)
    inside_tiles = inside.view_as(tiles)
    assert torch.equal(tiles.any(dim=(1, 3)) & ~visible, torch.zeros_like(visible))  # nothing visible is skipped
    all_visible = (tiles | ~inside_tiles).all(dim=(1, 3)) & inside_tiles.any(dim=(1, 3))
    assert not (full & ~all_visible).any()  # a tile without the mask holds only visible pairs
    # and the mask prunes: for a window far below the length most tiles are skipped
    long = flex.positional_mask(_span(0, 4096), _span(0, 4096), 512, None)
    assert long.tiles()[0].sum() <= 32 * 6


def test_flex_api_of_this_torch_is_recognised() -> None:
    assert flex.available()
    assert ("return_aux" in flex._LSE_REQUEST) or ("return_lse" in flex._LSE_REQUEST)


def test_a_failing_flex_call_falls_back_to_math_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where ``auto`` takes FlexAttention (CUDA), a compile or kernel failure gives way to math for good, with one
    warning; simulated on CPU with a FlexAttention that raises and a choice that takes it."""

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for you")

    choice = KernelChoice()
    monkeypatch.setattr(choice.flex, "function", lambda device: broken)
    original = selector.resolve_masked_backend
    monkeypatch.setattr(
        selector, "resolve_masked_backend", lambda c, *a: "flex" if c.flex.failure is None else original(c, *a)
    )
    q, k, v = _qkv(8, 8)
    window = SlidingWindow(WINDOW, _span(0, 8), _span(0, 8))
    ref_out, ref_lse = _explicit(q, k, v, 0.3, _span(0, 8), _span(0, 8), WINDOW)
    with pytest.warns(UserWarning, match="FlexAttention failed"):
        out, lse = attention_with_lse(q, k, v, scale=0.3, causal=True, kernels=choice, window=window)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)
    assert choice.flex.failure is not None and "no kernel for you" in choice.flex.failure
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only: the next call does not try again
        out, _ = attention_with_lse(q, k, v, scale=0.3, causal=True, kernels=choice, window=window)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    with pytest.raises(RuntimeError, match="no kernel"):  # asked for by name: the failure is not hidden
        forced = KernelChoice("flex")
        monkeypatch.setattr(forced.flex, "function", lambda device: broken)
        attention_with_lse(q, k, v, scale=0.3, causal=True, kernels=forced, window=window)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def cuda_choice() -> KernelChoice:
    """One engine for every CUDA call of this file: FlexAttention compiles once (then dynamic shapes), as in a run."""
    return KernelChoice()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("name", "query_positions", "key_positions", "causal", "valid"), CALLS)
def test_compiled_flex_on_cuda_against_float64(
    dtype, name, query_positions, key_positions, causal, valid, cuda_choice
) -> None:
    """``auto`` on CUDA takes compiled FlexAttention for windows; bf16 within bf16 rounding of float64, lse exact-ish
    and natural-log."""
    q, k, v = _qkv(query_positions.shape[0], key_positions.shape[0], dtype=dtype, seed=len(name), device="cuda")
    window = SlidingWindow(WINDOW, query_positions.cuda(), key_positions.cuda())
    valid_length = None if valid is None else torch.tensor([valid], dtype=torch.int32, device="cuda")
    choice = cuda_choice
    assert kernels.resolve_masked_backend(choice, q, window, valid_length) in ("flex", "flash_attn")
    out, lse = attention_with_lse(
        q, k, v, scale=0.3, causal=causal, kernels=choice, valid_length=valid_length, window=window
    )
    assert choice.flex.failure is None, choice.flex.failure
    ref_out, ref_lse = _explicit(q.cpu(), k.cpu(), v.cpu(), 0.3, query_positions, key_positions, WINDOW, valid=valid)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-5
    torch.testing.assert_close(out.cpu().double(), ref_out, rtol=tol, atol=tol)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    torch.testing.assert_close(
        lse.cpu().double()[finite], ref_lse[finite], rtol=1e-4 if dtype == torch.bfloat16 else 1e-5, atol=1e-3
    )


@pytest.mark.gpu
@needs_cuda
def test_compiled_flex_soft_capping_on_cuda_against_float64(cuda_choice) -> None:
    q, k, v = _qkv(200, 300, dtype=torch.bfloat16, device="cuda")
    choice = cuda_choice
    out, lse = attention_with_lse(q, k, v, scale=0.3, causal=True, softcap=5.0, kernels=choice)
    assert choice.flex.failure is None, choice.flex.failure
    ref_out, ref_lse = _explicit(q.cpu(), k.cpu(), v.cpu(), 0.3, torch.arange(100, 300), torch.arange(300), None, 5.0)
    torch.testing.assert_close(out.cpu().double(), ref_out, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(("name", "query_positions", "key_positions", "causal", "valid"), CALLS)
def test_the_bias_of_the_masked_sdpa_kernel_hides_exactly_what_the_window_rule_hides(
    name, query_positions, key_positions, causal, valid
) -> None:
    """``sdpa_masked`` builds its bias from ``math``'s rules; every pair it hides is one the positional rule (and the
    valid length) hides, and no other, in any chunk of rows."""
    q_len, k_len = query_positions.shape[0], key_positions.shape[0]
    window = SlidingWindow(WINDOW, query_positions, key_positions)
    valid_length = None if valid is None else torch.tensor([valid], dtype=torch.int32)
    qp, kp = query_positions[:, None], key_positions[None, :]
    expected = (kp > qp) | (kp <= qp - WINDOW)
    if valid is not None:
        expected |= torch.arange(k_len)[None, :] >= valid
    whole = sdpa_masked.hidden_pairs(slice(None), q_len, k_len, causal, valid_length, window, torch.device("cpu"))
    assert torch.equal(whole, expected)
    cut = q_len // 2
    halves = [
        sdpa_masked.hidden_pairs(rows, q_len, k_len, causal, valid_length, window, torch.device("cpu"))
        for rows in (slice(0, cut), slice(cut, q_len))
    ]
    assert torch.equal(torch.cat(halves), expected)


@pytest.mark.parametrize(("start", "length", "window", "max_bias"), [
    (300, 300, WINDOW, None), (0, 1000, 512, None), (4096, 2048, 512, None), (10, 777, 100, 20000), (5, 10, 24, None),
])  # fmt: skip
def test_an_aligned_window_gives_each_chunk_only_the_keys_its_rows_reach(
    start: int, length: int, window: int, max_bias: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forward attending to itself (aligned): the chunks cover every row once, each chunk's keys hold every key a
    row of it sees (nothing visible is cut off) and at most rows + window - 1 of them; the sub-masks are the whole
    mask's. Any other call keeps all keys in every chunk."""
    if max_bias is not None:
        monkeypatch.setattr(sdpa_masked, "MAX_BIAS_ELEMENTS", max_bias)
    positions = _span(start, start + length)
    aligned = SlidingWindow(window, positions, positions, aligned=True)
    whole = sdpa_masked.hidden_pairs(slice(None), length, length, True, None, aligned, torch.device("cpu"))
    plan = sdpa_masked.calls(length, length, True, None, aligned)
    covered = torch.cat([torch.arange(length)[rows] for rows, _ in plan])
    assert torch.equal(covered, torch.arange(length))
    for rows, keys in plan:
        seen = ~whole[rows]  # [l, Lk]
        outside = torch.ones(length, dtype=torch.bool)
        outside[keys] = False
        assert not seen[:, outside].any()
        assert keys.stop - keys.start <= (rows.stop - rows.start) + window - 1
        assert rows.stop - rows.start == length or (rows.stop - rows.start) * (rows.stop - rows.start + window) <= (
            sdpa_masked.MAX_BIAS_ELEMENTS
        )
        assert torch.equal(aligned.part(rows, keys).hidden(slice(None)), whole[rows][:, keys])
    plain = SlidingWindow(window, positions, positions)  # not known to be aligned: every key, in every chunk
    assert all(keys == slice(0, length) for _, keys in sdpa_masked.calls(length, length, True, None, plain))


def test_a_failing_masked_sdpa_kernel_gives_way_to_math_once() -> None:
    """A kernel refusal (here: the kernel has no CPU build) warns once, records why on the engine, answers this call
    exactly on ``math`` and keeps the selector from choosing the kernel again."""
    query_positions, key_positions = _span(300, 340), torch.cat([_span(0, 48), _span(300, 340)])
    q, k, v = _qkv(40, 88, dtype=torch.float32, seed=3)
    window = SlidingWindow(WINDOW, query_positions, key_positions)
    choice = KernelChoice()
    choice.chosen["stale"] = sdpa_masked.attention
    with pytest.warns(UserWarning, match="memory-efficient SDPA kernel failed"):
        out, lse = sdpa_masked.attention(q, k, v, scale=0.3, causal=False, window=window, kernels=choice)
    assert choice.masked_sdpa_failure is not None and not choice.chosen
    ref_out, ref_lse = _explicit(q, k, v, 0.3, query_positions, key_positions, WINDOW)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError):  # without an engine to record it on, the failure is raised
        sdpa_masked.attention(q, k, v, scale=0.3, causal=False, window=window)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("max_bias", [None, 4096])
@pytest.mark.parametrize(("name", "query_positions", "key_positions", "causal", "valid"), CALLS)
def test_masked_sdpa_kernel_on_cuda_against_float64(
    name, query_positions, key_positions, causal, valid, max_bias, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The memory-efficient kernel with the mask as a bias, bf16, against float64: rows that see no key give out 0
    and lse -inf; rows in chunks (a small bias budget) give the same."""
    if max_bias is not None:
        monkeypatch.setattr(sdpa_masked, "MAX_BIAS_ELEMENTS", max_bias)
    q_len, k_len = query_positions.shape[0], key_positions.shape[0]
    q, k, v = _qkv(q_len, k_len, dtype=torch.bfloat16, seed=len(name), device="cuda")
    if valid is not None:  # unfilled slots hold finite garbage (the store zeroes its buffers; a bias weighs 0)
        k[:, :, valid:] = 1e3
        v[:, :, valid:] = 1e3
    aligned = name.startswith("own forward")  # a block attending to itself: each chunk only the keys it reaches
    window = SlidingWindow(WINDOW, query_positions.cuda(), key_positions.cuda(), aligned=aligned)
    valid_length = None if valid is None else torch.tensor([valid], dtype=torch.int32, device="cuda")
    out, lse = sdpa_masked.attention(q, k, v, scale=0.3, causal=causal, valid_length=valid_length, window=window)
    ref_out, ref_lse = _explicit(q.cpu(), k.cpu(), v.cpu(), 0.3, query_positions, key_positions, WINDOW, valid=valid)
    torch.testing.assert_close(out.cpu().double(), ref_out, rtol=2e-2, atol=2e-2)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    torch.testing.assert_close(lse.cpu().double()[finite], ref_lse[finite], rtol=1e-4, atol=1e-3)


SHORT_CALLS = [call for call in CALLS if call[1].shape[0] <= 16] + [
    ("question in three tiles", _span(660, 700), torch.cat([_span(100, 700), _span(0, 20)]), True, 600),
    ("no key in reach", _span(1000, 1002), _span(0, 300), False, None),
]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(("name", "query_positions", "key_positions", "causal", "valid"), SHORT_CALLS)
def test_windowed_short_queries_take_the_split_kv_kernel_against_float64(
    name, query_positions, key_positions, causal, valid
) -> None:
    """A windowed decode token or short question on CUDA takes the split-KV kernel (the window read by positions on
    the device), bf16 against float64; a row that sees no key gets out 0 and lse -inf."""
    q_len, k_len = query_positions.shape[0], key_positions.shape[0]
    q, k, v = _qkv(q_len, k_len, dtype=torch.bfloat16, seed=len(name), device="cuda")
    if valid is not None:
        k[:, :, valid:] = float("nan")  # unwritten slots: the kernel never reads past the valid length
        v[:, :, valid:] = float("nan")
    window = SlidingWindow(WINDOW, query_positions.cuda(), key_positions.cuda())
    valid_length = None if valid is None else torch.tensor([valid], dtype=torch.int32, device="cuda")
    choice = KernelChoice()
    assert kernels.resolve_masked_backend(choice, q, window, valid_length, None, k, v) == "triton"
    out, lse = attention_with_lse(
        q, k, v, scale=0.3, causal=causal, kernels=choice, valid_length=valid_length, window=window
    )
    ref_out, ref_lse = _explicit(q.cpu(), k.cpu(), v.cpu(), 0.3, query_positions, key_positions, WINDOW, valid=valid)
    torch.testing.assert_close(out.cpu().double(), ref_out, rtol=2e-2, atol=2e-2)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    torch.testing.assert_close(lse.cpu().double()[finite], ref_lse[finite], rtol=1e-4, atol=1e-3)


@pytest.mark.gpu
@needs_cuda
def test_a_captured_windowed_forward_takes_the_masked_sdpa_kernel_and_replays_new_positions() -> None:
    """Inside a CUDA graph capture ``auto`` takes ``sdpa_masked`` for a long windowed query (FlexAttention cannot be
    captured); the graph replayed with other positions and inputs equals ``math`` on them."""
    q_len, k_len = 300, 348
    q, k, v = (t.contiguous() for t in _qkv(q_len, k_len, dtype=torch.bfloat16, seed=1, device="cuda"))
    query_positions = _span(300, 600).cuda()
    key_positions = torch.cat([_span(0, 48), _span(300, 600)]).cuda()
    choice = KernelChoice()
    with torch.no_grad():
        window = SlidingWindow(WINDOW, query_positions, key_positions)
        attention_with_lse(q, k, v, scale=0.3, causal=False, kernels=choice, window=window)  # warm-up, uncaptured
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            assert kernels.resolve_masked_backend(choice, q, window) == "sdpa_masked"
            out, lse = attention_with_lse(q, k, v, scale=0.3, causal=False, kernels=choice, window=window)
        new_q, new_k, new_v = _qkv(q_len, k_len, dtype=torch.bfloat16, seed=2, device="cuda")
        q.copy_(new_q), k.copy_(new_k), v.copy_(new_v)
        query_positions.copy_(_span(40, 340).cuda())  # now partly in reach of the first 48 keys
        key_positions.copy_(torch.cat([_span(0, 48), _span(40, 340)]).cuda())
        graph.replay()
        ref_out, ref_lse = attention_with_lse(
            q, k, v, scale=0.3, causal=False, kernels=KernelChoice("math"),
            window=SlidingWindow(WINDOW, query_positions.clone(), key_positions.clone()),
        )  # fmt: skip
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-3, atol=1e-3)


def test_a_block_whose_windows_reach_no_anchor_key_skips_the_anchor_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mistral, window 8, blocks of 16 after an anchor of 16: block 1 sees the anchor's last keys, blocks 2-4 none.
    The skipped calls are exactly the ones that would have been empty: the same K/V to the last bit."""
    from model_zoo import random_tokens, tiny_model
    from star_lightning.attention.step import ForwardStep
    from star_lightning.cache import KVStore
    from star_lightning.engine.forward import num_layers
    from star_lightning.engine.prefill import prefill_star
    from star_lightning.models import use_star_attention
    from star_lightning.parallel.group import SingleHostGroup
    from star_lightning.partition import plan_blocks

    model = tiny_model("mistral", sliding_window=8)
    use_star_attention(model)
    context = random_tokens(70, seed=3)
    plan = plan_blocks(70, 16, 1, 16)
    calls: list[int] = []
    original = kernels.attention_with_lse

    def counted(query, key, value, **kwargs):
        calls.append(key.shape[2])
        return original(query, key, value, **kwargs)

    monkeypatch.setattr("star_lightning.attention.star.attention_with_lse", counted)
    stores = {}
    for skipping in (True, False):
        if not skipping:
            monkeypatch.setattr(ForwardStep, "sees_anchor", lambda self, size: True)
        calls.clear()
        store = KVStore(num_layers(model), 70)
        with torch.no_grad():
            prefill_star(model, context, plan, SingleHostGroup(), store, anchor_source="host")
        stores[skipping] = (torch.stack([torch.cat(store.view(layer), dim=-1) for layer in range(2)]), list(calls))
    layers, blocks_after_anchor, far_blocks = 2, 4, 3
    assert len(stores[False][1]) - len(stores[True][1]) == layers * far_blocks  # one anchor call per layer skipped
    assert len(stores[True][1]) == layers * (1 + blocks_after_anchor + 1)  # block 0, four blocks' own, block 1's anchor
    assert torch.equal(stores[True][0], stores[False][0])
