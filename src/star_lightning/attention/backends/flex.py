"""``flex``: PyTorch's FlexAttention (:mod:`star_lightning.attention.flex`), compiled on CUDA, for sliding windows
and soft-capping: a block-sparse fused kernel that visits only the key tiles a window reaches.

A failure to compile or run gives way to ``math`` for this call, with one warning, and for good on this engine (the
selector chooses again); asked for by name (``--model.backend flex``), the failure is raised.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from star_lightning.attention import flex
from star_lightning.attention.backends import math as math_backend
from star_lightning.attention.window import SlidingWindow

if TYPE_CHECKING:
    from star_lightning.attention.choice import KernelChoice


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
    kernels: KernelChoice,
) -> tuple[Tensor, Tensor]:
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
        kernels.forget()
    return math_backend.attention(
        query, key, value, scale=scale, causal=causal, softcap=softcap, valid_length=valid_length, window=window
    )
