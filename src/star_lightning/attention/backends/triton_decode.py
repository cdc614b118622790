"""``triton``: the split-KV kernel for a few query rows over a long cache (Phase 2 decoding and short questions,
CUDA fp16/bf16; :mod:`star_lightning.attention.triton_decode`): the cache is cut into splits so one decode token
fills the GPU, and the valid length (and a sliding window's positions) is read on the device, so a captured decode
step replays it."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from star_lightning.attention import triton_decode
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
    return triton_decode.split_kv_attention(
        query, key, value, scale=scale, causal=causal, valid_length=valid_length, window=window
    )
