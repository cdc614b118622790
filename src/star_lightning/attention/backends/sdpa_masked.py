"""``sdpa_masked``: a windowed (or valid-length) CUDA call on PyTorch's memory-efficient SDPA kernel, the mask
given as an additive bias built on the device from the call's positions.

Why: FlexAttention, the fused kernel that visits only the tiles a window reaches, cannot be captured in a CUDA graph
as torch 2.11 builds it, so a captured Phase 1 block ran its sliding-window layers on ``math`` (float32 matmuls over
a materialised score tile: 40 of the 128 ms of Gemma-3-270M's captured 8K Phase 1 on an H100). This kernel takes
any mask, returns the log-sum-exp, and makes no host sync: the bias is a few elementwise kernels over the positions,
which the graph replays with the block's positions. The kernel visits every pair it is given, so the rows go in
chunks whose bias stays under ``MAX_BIAS_ELEMENTS``; a forward attending to itself through its window (``aligned``:
the queries are the keys, one run of positions, as a star block's own call) gives each chunk of ``W`` rows only the
``2W - 1`` keys its window reaches (``Lq x 2W``, not ``Lq x Lk``: a 2K block with Gemma-3's 512 window 2x fewer
pairs, an 8K block 8x). The selector takes it for long queries of a captured forward only.

A masked pair gets the dtype's lowest finite value, not ``-inf``, so a row that sees no key stays finite inside the
kernel; such rows are then set to ``out = 0``, ``lse = -inf`` (the contract every backend keeps, and what the merge
ignores). K/V heads are repeated to the query's (the kernel takes no grouped heads).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from star_lightning.attention.backends import math as math_backend
from star_lightning.attention.window import SlidingWindow

# Bias elements per kernel call (query rows x keys, padded): 32M, 64 MiB in bf16.
MAX_BIAS_ELEMENTS = 32 * 1024 * 1024
_ALIGN = 16  # the kernel reads the bias rows at a stride that is a multiple of 16 elements


def supports(query: Tensor, softcap: float | None) -> bool:
    """CUDA fp16/bf16 without soft-capping (the kernel has none)."""
    return query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and softcap is None


def hidden_pairs(
    rows: slice, q_len: int, k_len: int, causal: bool, valid_length: Tensor | None, window: SlidingWindow | None,
    device: torch.device,
) -> Tensor:  # fmt: skip
    """``[l, Lk]`` bool, True where query row (of ``rows``) must not see the key: ``math``'s rules (bottom-right
    causality by index against the valid keys, keys past ``valid_length``, the window by positions)."""
    start, stop, _ = rows.indices(q_len)
    keys = torch.arange(k_len, device=device)  # [Lk]
    hidden = torch.zeros(stop - start, k_len, dtype=torch.bool, device=device)  # [l, Lk]
    if causal or valid_length is not None:
        limit = k_len if valid_length is None else valid_length  # number of real keys (int or device [1])
        if causal:
            last = torch.arange(start, stop, device=device) + (limit - q_len)  # last visible key per row
        else:
            last = torch.zeros(stop - start, dtype=torch.long, device=device) + (limit - 1)
        hidden |= keys[None, :] > last[:, None]
    if window is not None:
        hidden |= window.hidden(slice(start, stop))
    return hidden


def calls(
    q_len: int, k_len: int, causal: bool, valid_length: Tensor | None, window: SlidingWindow | None
) -> list[tuple[slice, slice]]:
    """The kernel calls of one attention call: ``(rows, keys)`` each, decided on the host. An aligned window (the
    queries are the keys, one contiguous run; causal, all keys valid) gives each chunk of rows the keys from the
    first its first row reaches to its last row; otherwise every chunk gets all keys, as many rows as the bias
    budget allows."""
    if window is not None and window.aligned and causal and valid_length is None and q_len == k_len:
        rows = window.size
        while rows > 16 and rows * (rows + window.size) > MAX_BIAS_ELEMENTS:
            rows //= 2
        return [
            (slice(start, min(q_len, start + rows)), slice(max(0, start - window.size + 1), min(q_len, start + rows)))
            for start in range(0, q_len, rows)
        ]
    chunk = max(1, MAX_BIAS_ELEMENTS // (-(-k_len // _ALIGN) * _ALIGN))
    return [(slice(start, min(q_len, start + chunk)), slice(0, k_len)) for start in range(0, q_len, chunk)]


def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    scale: float,
    causal: bool,
    softcap: float | None = None,
    valid_length: Tensor | None = None,
    window: SlidingWindow | None = None,
    kernels: Any = None,
) -> tuple[Tensor, Tensor]:
    """The kernel; a failure (this torch's kernel refuses the shape) warns once and sends this engine's masked calls
    to ``math`` from now on (the selector chooses again); asked for while a graph is captured, it is raised (the
    capture fails and the engine runs the block uncaptured)."""
    try:
        return _attention(query, key, value, scale=scale, causal=causal, valid_length=valid_length, window=window)
    except RuntimeError as error:
        if kernels is None or (query.is_cuda and torch.cuda.is_current_stream_capturing()):
            raise
        kernels.masked_sdpa_failure = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        warnings.warn(
            f"the memory-efficient SDPA kernel failed on a masked call ({kernels.masked_sdpa_failure}); windowed "
            "calls use the math kernel from now on (exact, slower)",
            stacklevel=3,
        )
        kernels.forget()
    return math_backend.attention(
        query, key, value, scale=scale, causal=causal, softcap=softcap, valid_length=valid_length, window=window
    )


def _attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    scale: float,
    causal: bool,
    valid_length: Tensor | None,
    window: SlidingWindow | None,
) -> tuple[Tensor, Tensor]:
    batch, q_heads, q_len, _ = query.shape
    k_len = key.shape[2]
    groups = q_heads // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)  # [B, Hq, Lk, D]
        value = value.repeat_interleave(groups, dim=1)  # [B, Hq, Lk, Dv]
    lowest = torch.finfo(query.dtype).min
    outs, lses = [], []
    for rows, keys in calls(q_len, k_len, causal, valid_length, window):
        start, stop, first, last = rows.start, rows.stop, keys.start, keys.stop
        if window is None or last - first == k_len:
            hidden = hidden_pairs(rows, q_len, k_len, causal, valid_length, window, query.device)
        else:  # an aligned window's chunk: its rows' reach by positions (which imply causality)
            hidden = window.part(rows, keys).hidden(slice(None))  # [l, k]
        width = last - first
        bias = query.new_zeros(stop - start, -(-width // _ALIGN) * _ALIGN)[:, :width]  # [l, k], rows 16-aligned
        bias.masked_fill_(hidden, lowest)
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            query[:, :, rows], key[:, :, keys], value[:, :, keys], bias.expand(batch, q_heads, stop - start, width),
            True, 0.0, False, scale=scale,
        )[:2]  # out [B, Hq, l, Dv]; lse [B, Hq, l rounded up to 32] (natural log, float32)  # fmt: skip
        lse = lse[..., : stop - start]
        blind = hidden.all(dim=-1)  # [l]: rows that see no key
        outs.append(torch.where(blind[:, None], torch.zeros((), dtype=out.dtype, device=out.device), out))
        lses.append(torch.where(blind, torch.full((), float("-inf"), device=lse.device), lse.float()))
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)
