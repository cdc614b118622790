"""The attention backend of a call, chosen once per shape class (vLLM's ``get_attn_backend``; torchtitan's
``Attention.__init__``).

Everything the choice depends on is a field of :class:`ShapeClass`: device type, dtype, head dim, query heads per KV
head, whether the query is short (decoding, short questions) and whether it fits the split-KV kernel's tiles,
whether the call has a sliding window (and whether it is a forward attending to itself), soft-capping, a valid
length, the K/V layout the split-KV kernel needs, and whether a CUDA graph is being captured. Every call needs the
log-sum-exp (the exact merges do), so that is not a field. The engine's own settings (``backend``, ``prefill``,
``decode``, what it learnt) are the :class:`~star_lightning.attention.choice.KernelChoice` the choices are kept on;
when it learns something that changes them it forgets them, and the next call of each class chooses again.

The rules (``auto``): on CPU ``sdpa`` (the CPU flash kernel), ``math`` for soft-capped calls, tiles of ``math``
(``banded``) for windowed ones. On CUDA (fp16/bf16, head dim <= 256): the split-KV kernel for what fits its tiles,
``math`` up to 16 query tokens, else flash-attn where installed, else ``prefill`` (cuDNN, falling back to flash),
except a long query with a valid length (a captured question over static buffers): the memory-efficient SDPA kernel
with the valid length as a bias (``sdpa_masked``);
windowed and soft-capped calls flash-attn's ``window_size`` where installed and the call allows it, else the
split-KV kernel for windowed short queries, else FlexAttention (not while a CUDA graph is captured; there a long
aligned window takes two causal calls of the flash kernel, ``window_causal``), else the memory-efficient SDPA kernel
with the mask as a bias for long queries without soft-capping, else ``math``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from star_lightning.attention import flex, triton_decode
from star_lightning.attention.backends import banded, sdpa, sdpa_masked, window_causal
from star_lightning.attention.backends import flash as flash_backend
from star_lightning.attention.backends import flex as flex_backend
from star_lightning.attention.backends import math as math_backend
from star_lightning.attention.backends import triton_decode as split_kv_backend
from star_lightning.attention.choice import AttentionCall, KernelChoice
from star_lightning.attention.triton_decode import MAX_CHUNKS, MAX_ROWS
from star_lightning.attention.window import SlidingWindow


class ShapeClass(NamedTuple):
    """What one call's backend depends on (besides the engine's settings): calls of one class share a backend.

    Built on every call, so only what the rules read is looked at (a tensor attribute costs 0.1-0.6 us): on CPU
    the rules read no dtype, shape or layout (those fields are None); the split-KV layout only for a query that
    fits the kernel's tiles; whether a graph is being captured only for masked calls."""

    device: str
    masked: bool
    """A sliding window, or soft-capping that a masking kernel takes (CUDA ``auto``, or ``flex`` asked for)."""
    window: str | None
    """``"aligned"``: a forward attending to itself; ``"positions"``: any other window; None: no window."""
    softcap: bool
    valid_length: bool
    dtype: torch.dtype | None = None
    head_dim: int | None = None
    groups: int | None = None
    """Query heads per K/V head."""
    short: bool | None = None
    """At most 16 query tokens (decoding, short questions)."""
    tiles: bool | None = None
    """The query's rows fit the split-KV kernel's tiles (``MAX_CHUNKS`` tiles of ``MAX_ROWS`` rows per KV head)."""
    split_kv_layout: bool | None = None
    """K/V in the query's dtype and head dim, last dimensions contiguous (what the split-KV kernel reads)."""
    capturing: bool | None = None
    """A CUDA graph is being captured (FlexAttention cannot be)."""


_WINDOW_KINDS = {False: "positions", True: "aligned"}
_NOT_READ = (None,) * 7  # the fields the rules do not read off CUDA
# ``ShapeClass(...)`` spends 0.5 us a call on its arguments; every field is given, so the tuple is made directly.
_new = tuple.__new__


def shape_class(
    kernels: KernelChoice,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    softcap: float | None,
    valid_length: Tensor | None,
    window: SlidingWindow | None,
) -> ShapeClass:
    """The class of one call ``query`` ``[B, Hq, Lq, D]`` over ``key``/``value`` ``[B, Hkv, Lk, D]``."""
    kind = None if window is None else _WINDOW_KINDS[window.aligned]
    forced_flex = kernels.backend == "flex"
    if not query.is_cuda:
        device = "cpu" if query.is_cpu else query.device.type
        masked = window is not None or forced_flex
        return _new(ShapeClass, (device, masked, kind, softcap is not None, valid_length is not None, *_NOT_READ))
    masked = window is not None or forced_flex or (softcap is not None and kernels.backend == "auto")
    shape = query.shape  # [B, Hq, Lq, D]
    q_len, head_dim, groups = shape[2], shape[3], shape[1] // key.shape[1]
    tiles = groups <= MAX_ROWS and q_len <= MAX_CHUNKS * (MAX_ROWS // groups)
    layout = None
    if tiles:
        dtype = query.dtype
        layout = (
            key.dtype == dtype == value.dtype
            and key.shape[-1] == value.shape[-1] == head_dim
            and query.stride(-1) == key.stride(-1) == value.stride(-1) == 1
        )
    capturing = masked and torch.cuda.is_current_stream_capturing()
    fields = (
        "cuda", masked, kind, softcap is not None, valid_length is not None, query.dtype, head_dim, groups,
        q_len <= sdpa.SHORT_QUERY, tiles, layout, capturing,
    )  # fmt: skip
    return _new(ShapeClass, fields)


def select(
    kernels: KernelChoice,
    shape: ShapeClass,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    softcap: float | None,
    valid_length: Tensor | None,
    window: SlidingWindow | None,
) -> AttentionCall:
    """The backend of ``shape`` on this engine: chosen on the first call of the class, then kept (and counted)."""
    chosen = kernels.chosen.get(shape)
    if chosen is None:
        chosen = _choose(kernels, shape, query, key, value, softcap, valid_length, window)
        kernels.chosen[shape] = chosen
        kernels.selections += 1
    return chosen


def _choose(
    kernels: KernelChoice,
    shape: ShapeClass,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    softcap: float | None,
    valid_length: Tensor | None,
    window: SlidingWindow | None,
) -> AttentionCall:
    """The rules, applied to the first call of a class; a forced backend that cannot take it is refused by name."""
    if shape.masked:
        masked = resolve_masked_backend(kernels, query, window, valid_length, softcap, key, value)
        masked_backends: dict[str, AttentionCall] = {
            "flash_attn": flash_backend.attention,
            "triton": split_kv_backend.attention,
            "flex": flex_backend.attention,
            "sdpa_masked": sdpa_masked.attention,
            "window_causal": window_causal.attention,
            "banded": banded.attention,
        }
        return masked_backends.get(masked, math_backend.attention)
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
        return split_kv_backend.attention
    if chosen == "math" or valid_length is not None:
        # A long query over static buffers (the captured question, padded to ROWS) passes a valid length, which the
        # fused kernels cannot take: the memory-efficient kernel takes it as a bias (math's float32 matmuls were 8 of
        # the 19 ms of Qwen2.5-0.5B's question at 8K on an H100, whose 7 query heads a KV head overflow the split-KV
        # kernel's tiles).
        if chosen != "math" and kernels.backend == "auto" and kernels.masked_sdpa_failure is None:
            if sdpa_masked.supports(query, softcap):
                return sdpa_masked.attention
        return math_backend.attention
    if chosen == "flash_attn":
        return flash_backend.attention
    if softcap is not None:
        raise ValueError(f"the {chosen!r} backend has no logit soft-capping; use --model.backend math or flash_attn")
    if kernels.backend == "auto" and chosen == "cudnn":
        return sdpa.cudnn_or_flash
    return sdpa.cudnn if chosen == "cudnn" else sdpa.flash


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
    if query.shape[2] <= sdpa.SHORT_QUERY:
        return "math"
    if kernels.flash_attn:
        return "flash_attn"
    return "math" if softcap is not None else kernels.prefill


def resolve_masked_backend(
    kernels: KernelChoice,
    query: Tensor,
    window: SlidingWindow | None,
    valid_length: Tensor | None = None,
    softcap: float | None = None,
    key: Tensor | None = None,
    value: Tensor | None = None,
) -> str:
    """The kernel of a windowed or soft-capped call: ``flash_attn`` (its ``window_size``) where installed and the call
    is a forward attending to itself; the split-KV kernel (``triton``, the window read by positions on the device)
    for a windowed short query it takes (a decode token, a short question; ``key``/``value`` given); ``flex`` on
    CUDA; in a CUDA graph being captured (FlexAttention cannot be), a long aligned window (a forward attending to
    itself) as two causal calls of the flash kernel (``window_causal``); the memory-efficient SDPA kernel with the
    mask as a bias (``sdpa_masked``) for other long queries without soft-capping where FlexAttention cannot run
    (captured, or it failed); tiles of ``math`` (``banded``) for CPU windows; else ``math``. A forced ``math`` or
    ``flex`` is kept; a forced fused kernel that cannot mask takes ``auto``'s choice."""
    if kernels.backend in ("math", "flex"):
        return kernels.backend
    cuda_ok = query.is_cuda and query.dtype in (torch.float16, torch.bfloat16, torch.float32)
    if cuda_ok and kernels.backend in ("auto", "flash_attn") and kernels.flash_attn and valid_length is None:
        if query.dtype != torch.float32 and query.shape[-1] <= 256 and (window is None or window.aligned):
            return "flash_attn"
    short_ok = kernels.backend in ("auto", "triton") and kernels.decode == "triton" and softcap is None
    if short_ok and window is not None and key is not None and value is not None:
        if triton_decode.supports(query, key, value):
            return "triton"
    # A CUDA graph cannot capture FlexAttention's call as torch 2.11 builds it (a host-to-device copy; seen on an
    # H200): a captured forward's long masked calls take ``sdpa_masked``, the rest ``math``.
    capturing = query.is_cuda and torch.cuda.is_current_stream_capturing()
    if cuda_ok and flex.available() and kernels.flex.failure is None and not capturing:
        return "flex"
    long = query.shape[2] > sdpa.SHORT_QUERY
    aligned = window is not None and window.aligned and valid_length is None
    if capturing and long and aligned and kernels.backend == "auto" and window_causal.supports(query, softcap):
        return "window_causal"
    long_ok = long and kernels.masked_sdpa_failure is None
    if long_ok and sdpa_masked.supports(query, softcap):
        return "sdpa_masked"
    if window is not None and query.device.type == "cpu":
        return "banded"
    return "math"
