"""Local attention that also returns the log-sum-exp, which the exact merges need.

One entry point, :func:`attention_with_lse`, with interchangeable backends:

- ``math``: explicit matmuls in float32 (float64 for float64 inputs), query-chunked so no full attention matrix
  is ever materialised; grouped-query heads are handled by grouping, not by copying K/V. Runs everywhere and
  supports logit soft-capping (Gemma-2); the reference the fused kernels are checked against.
- ``triton``: a split-KV kernel for a few query tokens over a long cache (Phase 2 decoding, CUDA): the cache is
  cut into splits so one decode token fills the GPU (:mod:`star_lightning.attention.triton_decode`).
- ``sdpa``: PyTorch's fused flash kernel: on CUDA (fp16/bf16) for long Phase 1 blocks; on CPU (float32/64, bf16)
  for every call (15x faster than ``math`` on a 2K block, measured on one core).
- ``cudnn``: PyTorch's cuDNN attention kernel on CUDA (fp16/bf16), the other candidate for long blocks.
- ``flash_attn``: the flash-attn package, when installed (the ``flash`` extra).
- ``flex``: PyTorch's FlexAttention (:mod:`star_lightning.attention.flex`), compiled on CUDA, for sliding windows
  and soft-capping: a block-sparse fused kernel that visits only the key tiles a window reaches.

``auto`` takes, on CUDA, ``triton`` for what fits its tiles (decode tokens, short queries; else ``math`` up to
16 tokens) and the preferred fused kernel for long queries
(:class:`KernelChoice`; flash-attn when installed); on CPU, ``sdpa``. Windowed and soft-capped calls take, on CUDA,
flash-attn's ``window_size`` where installed and the call allows it, else ``flex``; on CPU the windowed ones run
``math`` over only the keys each tile of queries can reach (:func:`_banded_attention`), soft-capped ones ``math``.
A fused kernel that fails to compile or run gives way to ``math``, with one warning.

Causality is always *bottom-right aligned*: query ``i`` of ``Lq`` sees keys ``0 .. Lk - Lq + i``. That is what a
block preceded by an anchor prefix, and a query following a cached context, both need.

A call may give a *sliding window* (:class:`SlidingWindow`): the true positions of its queries and keys and the
window size; a query at position ``p`` then sees a key at ``k`` only if ``p - size < k <= p`` (transformers'
``sliding_window_overlay`` with causality). Windowed calls run on ``math``; the callers pass a window only where it
cuts something, so requests shorter than the window keep their kernels.

A call may give a *valid length*: a one-element device tensor saying how many of the keys are real. A static-shape
decode step (one captured CUDA graph replayed as the cache grows) passes the whole preallocated cache buffer with
it; only the first ``valid`` keys are attended to.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any
from weakref import WeakKeyDictionary

import torch
import torch.nn.functional as F
from torch import Tensor

from star_lightning.attention import flex, triton_decode
from star_lightning.attention.merge import merge_pair
from star_lightning.engine.settings import BACKENDS

PREFILL_KERNELS: tuple[str, ...] = ("sdpa", "cudnn")
DECODE_KERNELS: tuple[str, ...] = ("triton", "math")

# Bound on the float32 score tile of the math backend (elements), ~256 MiB.
_MAX_SCORE_ELEMENTS = 64 * 1024 * 1024
# Queries up to this length count as "short" (decoding, short queries) for ``auto``.
_SHORT_QUERY = 16
# Query rows per tile of the CPU windowed path: enough rows for efficient matmuls, few enough keys per tile.
_BAND_ROWS = 256


@dataclass
class KernelChoice:
    """Which kernel each attention call uses: the user's ``backend``, and what ``auto`` resolves to on CUDA.

    One object per engine (per loaded model), passed with every call, so the choice is a per-call setting (two
    engines in one process may choose differently). ``auto`` takes ``prefill`` for long CUDA queries (cuDNN ran at
    578-599 TFLOP/s on an H200 against flash's 338-347 on the star-block shapes of the 128K benchmark) and
    ``decode`` for short ones. What the object learns while running is kept on it: a cuDNN refusal switches
    ``auto`` to flash (``sdpa``), whether each fused kernel takes grouped K/V heads without copies, FlexAttention's
    compiled function (or its failure). What does not change while the process runs is looked up once, here:
    whether flash-attn is installed (``find_spec`` is not free: it ran on every call before, 18,000 times a run).
    """

    backend: str = "auto"
    prefill: str = "cudnn"
    decode: str = "triton"
    native_gqa: dict[str, bool | None] = field(default_factory=lambda: {"sdpa": None, "cudnn": None})
    flash_attn: bool = field(default_factory=lambda: flash_attn_available())
    """Whether the flash-attn package is installed (looked up once per engine)."""
    flex: flex.FlexState = field(default_factory=flex.FlexState)
    """FlexAttention's compiled function on this engine, or why it failed."""
    graph_failure: str | None = None
    """Why capturing a decode step as a CUDA graph failed on this engine (its decoders then run uncaptured)."""
    compiled: WeakKeyDictionary[Any, Callable[..., Any]] = field(default_factory=WeakKeyDictionary)
    r"""The ``torch.compile``\ d forward of each model decoded with ``--model.decode compile`` (compiled once)."""

    def compiled_forward(self, model: Any) -> Callable[..., Any]:
        """``model.forward`` under ``torch.compile`` (static shapes: a decode step's are the same every token): the
        norms, rotary embedding, activations and residual adds fused; Star Attention itself stays eager (it is
        excluded from tracing) and the whole step is then captured as one CUDA graph."""
        if model not in self.compiled:
            self.compiled[model] = torch.compile(model.forward, dynamic=False)
        return self.compiled[model]

    def __post_init__(self) -> None:
        validate_backend(self.backend)
        if self.prefill not in PREFILL_KERNELS:
            raise ValueError(f"unknown prefill kernel {self.prefill!r}; choose one of {', '.join(PREFILL_KERNELS)}")
        if self.decode not in DECODE_KERNELS:
            raise ValueError(f"unknown decode kernel {self.decode!r}; choose one of {', '.join(DECODE_KERNELS)}")


@dataclass(frozen=True)
class SlidingWindow:
    """A sliding-window layer's mask for one call, by true positions: query at ``p`` sees key at ``k`` iff
    ``p - size < k <= p``."""

    size: int
    query_positions: Tensor  # [Lq] long
    key_positions: Tensor  # [Lk] long
    aligned: bool = False
    """The queries are the keys, one contiguous run of positions (a forward attending to itself): what flash-attn's
    ``window_size`` takes."""
    derived: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)
    """What the kernels derive from the positions (FlexAttention's mask, the CPU tiles' key ranges), built once for
    every layer that shares this window (the step keeps one window per forward and kind of call)."""

    def part(self, queries: slice = slice(None), keys: slice = slice(None)) -> SlidingWindow:
        """The window of a call on a slice of the queries and a slice of the keys."""
        return SlidingWindow(self.size, self.query_positions[queries], self.key_positions[keys])

    def positional_mask(self, valid_length: Tensor | None) -> flex.PositionalMask:
        """FlexAttention's mask of this window (keys past ``valid_length`` unseen), built once per window."""
        if "flex" not in self.derived:
            self.derived["flex"] = flex.positional_mask(
                self.query_positions, self.key_positions, self.size, valid_length
            )
        mask: flex.PositionalMask = self.derived["flex"]
        return mask

    def band_tiles(self, key_length: int) -> list[tuple[slice, slice]] | None:
        """Tiles of ``_BAND_ROWS`` query rows, each with the range of the first ``key_length`` keys its rows can
        reach; None when the keys' positions do not ascend. Built once per window."""
        if ("band", key_length) not in self.derived:
            keys = self.key_positions[:key_length]  # [Lk]
            tiles = None
            if bool((keys[1:] >= keys[:-1]).all()):
                queries, far = self.query_positions, 1 << 40
                pad = -queries.shape[0] % _BAND_ROWS
                low = F.pad(queries, (0, pad), value=far).view(-1, _BAND_ROWS).amin(-1)  # [T]: each tile's least
                high = F.pad(queries, (0, pad), value=-far).view(-1, _BAND_ROWS).amax(-1)  # [T]: and largest
                first = torch.searchsorted(keys, low - self.size, right=True).tolist()  # first key in reach
                last = torch.searchsorted(keys, high, right=True).tolist()  # one past the last
                length = queries.shape[0]
                tiles = [
                    (slice(start, min(length, start + _BAND_ROWS)), slice(a, max(a, b)))
                    for start, a, b in zip(range(0, length, _BAND_ROWS), first, last, strict=True)
                ]
            self.derived[("band", key_length)] = tiles
        result: list[tuple[slice, slice]] | None = self.derived[("band", key_length)]
        return result

    def hidden(self, rows: slice) -> Tensor:
        """``[l, Lk]``: True where query row (of ``rows``) must not see the key."""
        query = self.query_positions[rows][:, None]  # [l, 1]
        key = self.key_positions[None, :]  # [1, Lk]
        return (key > query) | (key <= query - self.size)


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def validate_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "flash_attn" and not flash_attn_available():
        raise ValueError(
            "attention backend 'flash_attn' was asked for but the flash-attn package is not installed; "
            "install the extra (pip install 'star-lightning[flash]') or use --model.backend auto"
        )
    if backend == "flex" and not flex.available():
        raise ValueError(
            f"attention backend 'flex' needs FlexAttention (torch >= 2.5; this is {torch.__version__}); "
            "use --model.backend auto"
        )


def resolve_backend(
    kernels: KernelChoice, query: Tensor, key: Tensor, softcap: float | None, value: Tensor | None = None
) -> str:
    """Pick the kernel for one call: split-KV for short CUDA queries, fused kernels for long ones, math otherwise."""
    if kernels.backend != "auto":
        return kernels.backend
    if query.device.type == "cpu":
        return "math" if softcap is not None else "sdpa"
    fused_ok = query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and query.shape[-1] <= 256
    if not fused_ok:
        return "math"
    # Triton takes what fits its tiles: a decode token, and a short Phase 2 query (a question of up to 64 tokens
    # with 4 query heads per KV head), which would otherwise pay cuDNN's plan for every new query length and a
    # prefix/causal split with its merge.
    short_ok = kernels.decode == "triton" and softcap is None
    if short_ok and triton_decode.supports(query, key, key if value is None else value):
        return "triton"
    if query.shape[2] <= _SHORT_QUERY:
        return "math"
    if kernels.flash_attn:
        return "flash_attn"
    return "math" if softcap is not None else kernels.prefill


def resolve_masked_backend(
    kernels: KernelChoice, query: Tensor, window: SlidingWindow | None, valid_length: Tensor | None = None
) -> str:
    """The kernel of a windowed or soft-capped call: ``flash_attn`` (its ``window_size``) where installed and the call
    is a forward attending to itself, ``flex`` on CUDA, tiles of ``math`` (``banded``) for CPU windows, else
    ``math``. A forced ``math`` or ``flex`` is kept; a forced fused kernel that cannot mask takes ``auto``'s choice."""
    if kernels.backend in ("math", "flex"):
        return kernels.backend
    cuda_ok = query.is_cuda and query.dtype in (torch.float16, torch.bfloat16, torch.float32)
    if cuda_ok and kernels.backend in ("auto", "flash_attn") and kernels.flash_attn and valid_length is None:
        if query.dtype != torch.float32 and query.shape[-1] <= 256 and (window is None or window.aligned):
            return "flash_attn"
    # A CUDA graph cannot capture FlexAttention's call as torch 2.11 builds it (a host-to-device copy; seen on an
    # H200): a captured decode step's masked calls take ``math`` (one token: one pass over the cache).
    capturing = query.is_cuda and torch.cuda.is_current_stream_capturing()
    if cuda_ok and flex.available() and kernels.flex.failure is None and not capturing:
        return "flex"
    if window is not None and query.device.type == "cpu":
        return "banded"
    return "math"


def attention_with_lse(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    scale: float,
    causal: bool,
    softcap: float | None = None,
    kernels: KernelChoice | None = None,
    valid_length: Tensor | None = None,
    window: SlidingWindow | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention of ``query`` ``[B, Hq, Lq, D]`` over ``key``/``value`` ``[B, Hkv, Lk, D]``.

    Returns ``out`` ``[B, Hq, Lq, Dv]`` in the query's dtype and ``lse`` ``[B, Hq, Lq]`` (natural log, float32 or
    float64). With ``causal`` the mask is bottom-right aligned (needs ``Lk >= Lq``). A query with no visible key
    (``Lk == 0``) gets ``out = 0`` and ``lse = -inf``, which the merge ignores. With ``valid_length`` (a device
    tensor ``[1]``) only the first ``valid_length`` keys are attended to. With ``window`` the sliding-window mask
    applies too (:func:`resolve_masked_backend` picks the kernel); a query that sees no key gets ``out = 0``,
    ``lse = -inf``.
    """
    if query.shape[1] % key.shape[1] != 0:
        raise ValueError(f"query heads ({query.shape[1]}) must be a multiple of key/value heads ({key.shape[1]})")
    if causal and key.shape[2] < query.shape[2]:
        raise ValueError(f"causal attention needs at least as many keys ({key.shape[2]}) as queries ({query.shape[2]})")
    if key.shape[2] == 0:
        out = query.new_zeros(*query.shape[:-1], value.shape[-1])
        lse = torch.full(query.shape[:-1], float("-inf"), device=query.device, dtype=_lse_dtype(query))
        return out, lse
    kernels = KernelChoice() if kernels is None else kernels
    if causal and query.shape[2] == 1:  # one query, bottom-right aligned, sees every (valid) key: no causal split
        causal = False
    if window is not None or (softcap is not None and query.is_cuda and kernels.backend in ("auto", "flex")):
        return _masked_attention(
            kernels, query, key, value, scale=scale, causal=causal, softcap=softcap, valid_length=valid_length,
            window=window,
        )  # fmt: skip
    if kernels.backend == "flex":
        return _masked_attention(
            kernels, query, key, value, scale=scale, causal=causal, softcap=softcap, valid_length=valid_length
        )
    valid = valid_length
    chosen = resolve_backend(kernels, query, key, softcap, value)
    if chosen == "triton":
        if softcap is not None:
            raise ValueError("the 'triton' backend has no logit soft-capping; use --model.backend math or auto")
        if not triton_decode.supports(query, key, value):
            raise ValueError(
                f"the 'triton' backend runs on CUDA fp16/bf16 with at most "
                f"{triton_decode.MAX_CHUNKS * triton_decode.MAX_ROWS} query rows per KV head (query "
                f"{tuple(query.shape)} {query.dtype} on {query.device}); use --model.backend auto"
            )
        return triton_decode.split_kv_attention(query, key, value, scale=scale, causal=causal, valid_length=valid)
    if chosen == "math" or valid is not None:
        return _math_attention(query, key, value, scale=scale, causal=causal, softcap=softcap, valid_length=valid)
    if chosen == "flash_attn":
        return _flash_attn_attention(query, key, value, scale=scale, causal=causal, softcap=softcap)
    if softcap is not None:
        raise ValueError(f"the {chosen!r} backend has no logit soft-capping; use --model.backend math or flash_attn")
    if kernels.backend == "auto" and chosen == "cudnn":
        try:
            return _fused_attention(kernels, "cudnn", query, key, value, scale=scale, causal=causal)
        except RuntimeError as error:
            warnings.warn(
                f"cuDNN attention failed ({error}); 'auto' uses the flash kernel (sdpa) from now on", stacklevel=2
            )
            kernels.prefill = "sdpa"
            chosen = "sdpa"
    return _fused_attention(kernels, chosen, query, key, value, scale=scale, causal=causal)


def _masked_attention(
    kernels: KernelChoice,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    scale: float,
    causal: bool,
    softcap: float | None,
    valid_length: Tensor | None,
    window: SlidingWindow | None = None,
) -> tuple[Tensor, Tensor]:
    """A windowed or soft-capped call on the kernel :func:`resolve_masked_backend` picks; a fused kernel that fails
    gives way to ``math`` (with one warning, and for good on this engine)."""
    chosen = resolve_masked_backend(kernels, query, window, valid_length)
    if chosen == "flash_attn":
        size = None if window is None else window.size
        return _flash_attn_attention(query, key, value, scale=scale, causal=causal, softcap=softcap, window=size)
    if chosen == "flex":
        if window is not None:
            mask = window.positional_mask(valid_length)
        else:
            queries, keys = flex.positions_for(query.shape[2], key.shape[2], causal, valid_length, query.device)
            mask = flex.positional_mask(queries, keys, None, valid_length)
        try:
            return flex.flex_attention_with_lse(kernels.flex, query, key, value, mask, scale=scale, softcap=softcap)
        except Exception as error:  # any failure of the compiler or the kernel: fall back, exactly
            if kernels.backend == "flex":  # asked for by name: say so, do not hide it
                raise
            kernels.flex.fail(error)
    if chosen == "banded" and window is not None:
        return _banded_attention(
            query, key, value, scale=scale, softcap=softcap, valid_length=valid_length, window=window
        )
    return _math_attention(
        query, key, value, scale=scale, causal=causal, softcap=softcap, valid_length=valid_length, window=window
    )


def _banded_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    scale: float,
    softcap: float | None,
    valid_length: Tensor | None,
    window: SlidingWindow,
) -> tuple[Tensor, Tensor]:
    """A windowed call on CPU as tiles of query rows, each on ``math`` over only the keys its window can reach.

    The keys' positions must ascend (they do in every store and chunk the engine builds; otherwise: plain ``math``).
    A tile of ``T`` rows reaches at most ``T + W`` keys, so a call costs ``Lq x (T + W)``, not ``Lq x Lk``: at 8K tokens
    and a window of 512, a twelfth. Exact: every key a row can see is in its tile's range, the mask does the rest.
    """
    tiles = window.band_tiles(key.shape[2] if valid_length is None else int(valid_length.reshape(-1)[0]))
    if tiles is None:
        return _math_attention(
            query, key, value, scale=scale, causal=False, softcap=softcap, valid_length=valid_length, window=window
        )
    outs, lses = [], []
    for rows, cols in tiles:
        if cols.stop <= cols.start:  # no key in reach: out 0, lse -inf
            q = query[:, :, rows]  # [B, Hq, T, D]
            out = q.new_zeros(*q.shape[:-1], value.shape[-1])
            lse = torch.full(q.shape[:-1], float("-inf"), device=q.device, dtype=_lse_dtype(q))
        else:
            out, lse = _math_attention(
                query[:, :, rows], key[:, :, cols], value[:, :, cols], scale=scale, causal=False, softcap=softcap,
                window=window.part(rows, cols),
            )  # fmt: skip
        outs.append(out)  # [B, Hq, T, Dv]
        lses.append(lse)  # [B, Hq, T]
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _lse_dtype(query: Tensor) -> torch.dtype:
    return torch.float64 if query.dtype == torch.float64 else torch.float32


def _math_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    scale: float,
    causal: bool,
    softcap: float | None,
    valid_length: Tensor | None = None,
    window: SlidingWindow | None = None,
) -> tuple[Tensor, Tensor]:
    batch, q_heads, q_len, _ = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    groups = q_heads // kv_heads
    compute = _lse_dtype(query)
    k = key.to(compute)  # [B, Hkv, Lk, D]
    v = value.to(compute)  # [B, Hkv, Lk, Dv]
    if valid_length is not None:  # keys past the valid length are unwritten memory: zero weight must not meet NaN
        real = torch.arange(k_len, device=query.device) < valid_length  # [Lk]
        v = torch.where(real[:, None], v, torch.zeros((), dtype=compute, device=query.device))
    chunk = max(1, _MAX_SCORE_ELEMENTS // max(1, batch * q_heads * k_len))
    outs, lses = [], []
    for start in range(0, q_len, chunk):
        stop = min(q_len, start + chunk)
        q = query[:, :, start:stop].to(compute)  # [B, Hq, l, D]
        q = q.reshape(batch, kv_heads, groups * (stop - start), -1)  # [B, Hkv, G*l, D]
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, Hkv, G*l, Lk]
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        scores = scores.view(batch, kv_heads, groups, stop - start, k_len)  # [B, Hkv, G, l, Lk]
        if causal or valid_length is not None:
            limit = k_len if valid_length is None else valid_length  # number of real keys (int or device [1])
            if causal:
                rows = torch.arange(start, stop, device=query.device) + (limit - q_len)  # last visible key per row
            else:
                rows = torch.zeros(stop - start, dtype=torch.long, device=query.device) + (limit - 1)
            hidden = torch.arange(k_len, device=query.device)[None, :] > rows[:, None]  # [l, Lk]
            scores = scores.masked_fill(hidden, float("-inf"))
        if window is not None:
            scores = scores.masked_fill(window.hidden(slice(start, stop)), float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)  # [B, Hkv, G, l]
        if window is not None:  # a row that sees no key (all of it outside the window): weights 0, lse -inf
            lse_finite = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
            probs = torch.exp(scores - lse_finite.unsqueeze(-1))  # [B, Hkv, G, l, Lk]
        else:
            probs = torch.exp(scores - lse.unsqueeze(-1))  # [B, Hkv, G, l, Lk]
        out = torch.matmul(probs.view(batch, kv_heads, -1, k_len), v)  # [B, Hkv, G*l, Dv]
        outs.append(out.view(batch, q_heads, stop - start, -1))  # [B, Hq, l, Dv]
        lses.append(lse.reshape(batch, q_heads, stop - start))  # [B, Hq, l]
    return torch.cat(outs, dim=2).to(query.dtype), torch.cat(lses, dim=2)


def _repeat_kv(x: Tensor, groups: int) -> Tensor:
    if groups == 1:
        return x
    b, h, length, d = x.shape
    return x[:, :, None].expand(b, h, groups, length, d).reshape(b, h * groups, length, d)  # [B, Hq, L, D]


def _fused_attention(
    kernels: KernelChoice, kernel: str, query: Tensor, key: Tensor, value: Tensor, *, scale: float, causal: bool
) -> tuple[Tensor, Tensor]:
    """A fused kernel (``sdpa``: flash, ``cudnn``); bottom-right causality is a visible prefix merged with a square
    causal part (these kernels align causal masks top-left)."""
    q_len, k_len = query.shape[2], key.shape[2]
    if not causal or q_len == k_len:
        return _fused_call(kernels, kernel, query, key, value, scale=scale, causal=causal)
    prefix = k_len - q_len
    k_p, v_p, k_c, v_c = key[:, :, :prefix], value[:, :, :prefix], key[:, :, prefix:], value[:, :, prefix:]
    out_p, lse_p = _fused_call(kernels, kernel, query, k_p, v_p, scale=scale, causal=False)
    out_c, lse_c = _fused_call(kernels, kernel, query, k_c, v_c, scale=scale, causal=True)
    return merge_pair(out_p, lse_p, out_c, lse_c)


def _fused_call(
    kernels: KernelChoice, kernel: str, query: Tensor, key: Tensor, value: Tensor, *, scale: float, causal: bool
) -> tuple[Tensor, Tensor]:
    """One fused call; K/V are passed with their own (fewer) heads when the kernel takes them, else repeated."""
    groups = query.shape[1] // key.shape[1]
    if query.device.type == "cpu":  # the CPU flash kernel takes grouped K/V heads
        return _fused_op(kernel, query, key, value, scale=scale, causal=causal)
    if groups > 1 and kernels.native_gqa[kernel] is not False:
        try:
            result = _fused_op(kernel, query, key, value, scale=scale, causal=causal)
            kernels.native_gqa[kernel] = True
            return result
        except RuntimeError:
            if kernels.native_gqa[kernel]:
                raise
            kernels.native_gqa[kernel] = False
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)  # [B, Hq, Lk, D]
    return _fused_op(kernel, query, key, value, scale=scale, causal=causal)


def _fused_op(
    kernel: str, query: Tensor, key: Tensor, value: Tensor, *, scale: float, causal: bool
) -> tuple[Tensor, Tensor]:
    q_len = query.shape[2]
    if query.device.type == "cpu":
        if kernel != "sdpa":
            raise ValueError(f"the {kernel!r} attention backend needs CUDA; use --model.backend auto, sdpa or math")
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, causal, scale=scale
        )  # out [B, Hq, Lq, D]; lse [B, Hq, Lq] (natural log)
        return out, lse.to(_lse_dtype(query))
    if kernel == "cudnn":
        result = torch.ops.aten._scaled_dot_product_cudnn_attention(
            query, key, value, None, True, 0.0, causal, False, scale=scale
        )
    else:
        result = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, causal, False, scale=scale)
    out, lse = result[0], result[1]  # out [B, Hq, Lq, D]; lse [B, Hq, Lq] or [B, Hq, Lq, 1] (natural log)
    if lse.dim() == 4:
        lse = lse[..., 0]
    return out, lse[..., :q_len].float()


def _flash_attn_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    scale: float,
    causal: bool,
    softcap: float | None,
    window: int | None = None,
) -> tuple[Tensor, Tensor]:
    """flash-attn; a ``window`` (only for a forward attending to itself: queries are the keys) is its
    ``window_size=(window - 1, 0)``, which with bottom-right causality is exactly ``p - window < k <= p``."""
    from flash_attn import flash_attn_func  # optional dependency, checked by validate_backend

    extra = {} if window is None else {"window_size": (window - 1, 0)}
    out, lse, _ = flash_attn_func(
        query.transpose(1, 2),  # [B, Lq, Hq, D]
        key.transpose(1, 2),  # [B, Lk, Hkv, D]
        value.transpose(1, 2),
        softmax_scale=scale,
        causal=causal,  # flash-attn aligns causal masks bottom-right
        softcap=0.0 if softcap is None else softcap,
        return_attn_probs=True,
        **extra,
    )
    return out.transpose(1, 2), lse[..., : query.shape[2]].float()  # [B, Hq, Lq, D], [B, Hq, Lq]


def sdpa_priority(kernels: KernelChoice, device: torch.device, query_length: int) -> AbstractContextManager[object]:
    """The dense baseline (transformers' own ``sdpa`` attention) with the same Phase 1 kernel as star and ring.

    For long CUDA queries, PyTorch's SDPA is told to try ``kernels.prefill`` first (cuDNN by default); short ones
    (decoding) keep PyTorch's own order, since cuDNN builds a new plan for every new cache length."""
    if device.type != "cuda" or query_length <= _SHORT_QUERY or kernels.backend not in ("auto", "cudnn", "sdpa"):
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = SDPBackend.CUDNN_ATTENTION if (kernels.backend == "cudnn" or kernels.prefill == "cudnn") else None
    if kernels.backend == "sdpa" or first is None:
        return nullcontext()
    order = [first, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # a torch without priorities: PyTorch's own order
        return nullcontext()
