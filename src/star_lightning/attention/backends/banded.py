"""``banded``: a windowed call on CPU as tiles of query rows, each on ``math`` over only the keys its window can
reach.

The keys' positions must ascend (they do in every store and chunk the engine builds; otherwise: plain ``math``).
A tile of ``T`` rows reaches at most ``T + W`` keys, so a call costs ``Lq x (T + W)``, not ``Lq x Lk``: at 8K tokens
and a window of 512, a twelfth. Exact: every key a row can see is in its tile's range, the mask does the rest.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from star_lightning.attention.backends import lse_dtype
from star_lightning.attention.backends import math as math_backend
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
    """``window`` is required (the selector picks this backend only for windowed CPU calls); the window's positions
    carry causality, so ``causal`` adds nothing."""
    assert window is not None
    tiles = window.band_tiles(key.shape[2] if valid_length is None else int(valid_length.reshape(-1)[0]))
    if tiles is None:
        return math_backend.attention(
            query, key, value, scale=scale, causal=False, softcap=softcap, valid_length=valid_length, window=window
        )
    outs, lses = [], []
    for rows, cols in tiles:
        if cols.stop <= cols.start:  # no key in reach: out 0, lse -inf
            q = query[:, :, rows]  # [B, Hq, T, D]
            out = q.new_zeros(*q.shape[:-1], value.shape[-1])
            lse = torch.full(q.shape[:-1], float("-inf"), device=q.device, dtype=lse_dtype(q))
        else:
            out, lse = math_backend.attention(
                query[:, :, rows], key[:, :, cols], value[:, :, cols], scale=scale, causal=False, softcap=softcap,
                window=window.part(rows, cols),
            )  # fmt: skip
        outs.append(out)  # [B, Hq, T, Dv]
        lses.append(lse)  # [B, Hq, T]
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)
