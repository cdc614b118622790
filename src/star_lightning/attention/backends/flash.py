"""``flash_attn``: the flash-attn package (the ``flash`` extra), on CUDA fp16/bf16, with soft-capping and, for a
forward attending to itself, its sliding window (``window_size``)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from star_lightning.attention.window import SlidingWindow


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
    """A ``window`` (only for a forward attending to itself: queries are the keys) is flash-attn's
    ``window_size=(window - 1, 0)``, which with bottom-right causality is exactly ``p - window < k <= p``."""
    from flash_attn import flash_attn_func  # optional dependency, checked by validate_backend

    extra = {} if window is None else {"window_size": (window.size - 1, 0)}
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
