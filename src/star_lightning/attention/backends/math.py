"""``math``: attention as explicit matmuls in float32 (float64 for float64 inputs), query-chunked so no full attention
matrix is ever materialised; grouped-query heads are handled by grouping, not by copying K/V.

Runs everywhere, takes every mask (causal, valid length, sliding window) and logit soft-capping (Gemma-2): the
reference the fused kernels are checked against, and where every other backend falls back to.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from star_lightning.attention.backends import lse_dtype
from star_lightning.attention.window import SlidingWindow

# Bound on the float32 score tile (elements), ~256 MiB.
MAX_SCORE_ELEMENTS = 64 * 1024 * 1024


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
    batch, q_heads, q_len, _ = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    groups = q_heads // kv_heads
    compute = lse_dtype(query)
    k = key.to(compute)  # [B, Hkv, Lk, D]
    v = value.to(compute)  # [B, Hkv, Lk, Dv]
    if valid_length is not None:  # keys past the valid length are unwritten memory: zero weight must not meet NaN
        real = torch.arange(k_len, device=query.device) < valid_length  # [Lk]
        v = torch.where(real[:, None], v, torch.zeros((), dtype=compute, device=query.device))
    chunk = max(1, MAX_SCORE_ELEMENTS // max(1, batch * q_heads * k_len))
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
