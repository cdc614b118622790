"""Local attention that also returns the log-sum-exp, which the exact merges need.

One entry point, :func:`attention_with_lse`, with interchangeable backends:

- ``math``: explicit matmuls in float32 (float64 for float64 inputs), query-chunked so no full attention matrix
  is ever materialised; grouped-query heads are handled by grouping, not by copying K/V. Runs everywhere, supports
  logit soft-capping (Gemma-2), and is the bandwidth-bound choice for decoding a few tokens over a long cache.
- ``sdpa``: PyTorch's fused flash kernel on CUDA (fp16/bf16), for long Phase 1 blocks.
- ``flash_attn``: the flash-attn package, when installed (the ``flash`` extra).

Causality is always *bottom-right aligned*: query ``i`` of ``Lq`` sees keys ``0 .. Lk - Lq + i``. That is what a
block preceded by an anchor prefix, and a query following a cached context, both need.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch
from torch import Tensor

from star_lightning.attention.merge import merge_pair

Backend = Literal["auto", "math", "sdpa", "flash_attn"]
BACKENDS: tuple[str, ...] = ("auto", "math", "sdpa", "flash_attn")

# Bound on the float32 score tile of the math backend (elements), ~256 MiB.
_MAX_SCORE_ELEMENTS = 64 * 1024 * 1024


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


def resolve_backend(backend: str, query: Tensor, key: Tensor, softcap: float | None) -> str:
    """Pick the kernel for one call: fused kernels for long CUDA queries, math otherwise."""
    if backend != "auto":
        return backend
    fused_ok = query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and query.shape[-1] <= 256
    if not fused_ok or query.shape[2] <= 16:
        return "math"
    if flash_attn_available():
        return "flash_attn"
    return "math" if softcap is not None else "sdpa"


def attention_with_lse(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    scale: float,
    causal: bool,
    softcap: float | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Attention of ``query`` ``[B, Hq, Lq, D]`` over ``key``/``value`` ``[B, Hkv, Lk, D]``.

    Returns ``out`` ``[B, Hq, Lq, Dv]`` in the query's dtype and ``lse`` ``[B, Hq, Lq]`` (natural log, float32 or
    float64). With ``causal`` the mask is bottom-right aligned (needs ``Lk >= Lq``). A query with no visible key
    (``Lk == 0``) gets ``out = 0`` and ``lse = -inf``, which the merge ignores.
    """
    if query.shape[1] % key.shape[1] != 0:
        raise ValueError(f"query heads ({query.shape[1]}) must be a multiple of key/value heads ({key.shape[1]})")
    if causal and key.shape[2] < query.shape[2]:
        raise ValueError(f"causal attention needs at least as many keys ({key.shape[2]}) as queries ({query.shape[2]})")
    if key.shape[2] == 0:
        out = query.new_zeros(*query.shape[:-1], value.shape[-1])
        lse = torch.full(query.shape[:-1], float("-inf"), device=query.device, dtype=_lse_dtype(query))
        return out, lse
    chosen = resolve_backend(backend, query, key, softcap)
    if chosen == "math":
        return _math_attention(query, key, value, scale=scale, causal=causal, softcap=softcap)
    if chosen == "flash_attn":
        return _flash_attn_attention(query, key, value, scale=scale, causal=causal, softcap=softcap)
    if softcap is not None:
        raise ValueError("the 'sdpa' backend has no logit soft-capping; use --model.backend math or flash_attn")
    return _sdpa_attention(query, key, value, scale=scale, causal=causal)


def _lse_dtype(query: Tensor) -> torch.dtype:
    return torch.float64 if query.dtype == torch.float64 else torch.float32


def _math_attention(
    query: Tensor, key: Tensor, value: Tensor, *, scale: float, causal: bool, softcap: float | None
) -> tuple[Tensor, Tensor]:
    batch, q_heads, q_len, _ = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    groups = q_heads // kv_heads
    compute = _lse_dtype(query)
    k = key.to(compute)  # [B, Hkv, Lk, D]
    v = value.to(compute)  # [B, Hkv, Lk, Dv]
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
        if causal:
            rows = torch.arange(start, stop, device=query.device) + (k_len - q_len)  # last visible key per row
            hidden = torch.arange(k_len, device=query.device)[None, :] > rows[:, None]  # [l, Lk]
            scores = scores.masked_fill(hidden, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)  # [B, Hkv, G, l]
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


def _sdpa_attention(query: Tensor, key: Tensor, value: Tensor, *, scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    """Fused flash kernel; bottom-right causality is a visible prefix merged with a square causal part."""
    q_len, k_len = query.shape[2], key.shape[2]
    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)  # [B, Hq, Lk, D]
    if not causal or q_len == k_len:
        return _sdpa_call(query, key, value, scale=scale, causal=causal)
    prefix = k_len - q_len
    out_p, lse_p = _sdpa_call(query, key[:, :, :prefix], value[:, :, :prefix], scale=scale, causal=False)
    out_c, lse_c = _sdpa_call(query, key[:, :, prefix:], value[:, :, prefix:], scale=scale, causal=True)
    return merge_pair(out_p, lse_p, out_c, lse_c)


def _sdpa_call(query: Tensor, key: Tensor, value: Tensor, *, scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    result = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, causal, False, scale=scale)
    out, lse = result[0], result[1]  # out [B, Hq, Lq, D]; lse [B, Hq, Lq] (natural log)
    return out, lse[..., : query.shape[2]].float()


def _flash_attn_attention(
    query: Tensor, key: Tensor, value: Tensor, *, scale: float, causal: bool, softcap: float | None
) -> tuple[Tensor, Tensor]:
    from flash_attn import flash_attn_func  # optional dependency, checked by validate_backend

    out, lse, _ = flash_attn_func(
        query.transpose(1, 2),  # [B, Lq, Hq, D]
        key.transpose(1, 2),  # [B, Lk, Hkv, D]
        value.transpose(1, 2),
        softmax_scale=scale,
        causal=causal,  # flash-attn aligns causal masks bottom-right
        softcap=0.0 if softcap is None else softcap,
        return_attn_probs=True,
    )
    return out.transpose(1, 2), lse[..., : query.shape[2]].float()  # [B, Hq, Lq, D], [B, Hq, Lq]
