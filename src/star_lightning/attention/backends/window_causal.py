"""``window_causal``: an aligned sliding window (a forward attending to itself, one contiguous run of positions) as two
batched causal calls of PyTorch's flash kernel, no mask built.

Cut the rows into chunks of the window's ``W`` (the last padded). A row ``i`` of a chunk sees the keys of its own
chunk up to itself (causal: one call over every chunk at once, the chunks as a batch) and the keys ``m >= i`` of the
previous chunk's last ``W - 1`` keys (``q - W < k``). Reversing both the rows and those keys turns ``m >= i`` into
``m' < i'``: rows ``1..W-1`` of the reversed chunk against the reversed keys are a square causal call (the second
call, batched the same way; the chunk's last row has no such key). The two partials merge by their log-sum-exp.

Why: a captured Phase 1 block cannot take FlexAttention, and ``sdpa_masked`` builds a bias and runs the
memory-efficient kernel on chunks of ``W`` rows x ``2W`` keys, half of them masked (Gemma-3-270M, window 512, head
dim 256, an 8K request on an H100: 285 such calls of 69 us, most of them in Phase 1, which took 62 ms). Here the same
pairs go through a causal kernel of the kind that serves every other Phase 1 call (flash: it takes any number of
rows, where cuDNN's limits on odd lengths are untested here), two calls a layer whatever the block's length. Exact:
each row's keys are the window's, each in exactly one of the two calls.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from star_lightning.attention.backends import sdpa
from star_lightning.attention.merge import merge_pair
from star_lightning.attention.window import SlidingWindow


def supports(query: Tensor, softcap: float | None) -> bool:
    """What the fused causal kernels take: CUDA fp16/bf16 up to head dim 256, no soft-capping (CPU: any float, for
    the tests)."""
    if softcap is not None:
        return False
    if query.device.type == "cpu":
        return True
    return query.dtype in (torch.float16, torch.bfloat16) and query.shape[-1] <= 256


def _chunks(x: Tensor, size: int, count: int) -> Tensor:
    """``[B, H, L, D]`` padded to ``count * size`` rows -> ``[B * count, H, size, D]`` (the chunks as a batch)."""
    b, h, length, d = x.shape
    pad = count * size - length
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.view(b, h, count, size, d).transpose(1, 2).reshape(b * count, h, size, d)


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
    """``window`` aligned (the selector hands this backend only such calls: queries are the keys, all valid)."""
    assert window is not None and window.aligned and valid_length is None
    kernel = "sdpa"  # the flash kernel: any number of rows (the reversed call has W - 1), on CPU too
    length, size = query.shape[2], window.size
    batch, heads, count = query.shape[0], query.shape[1], -(-length // size)
    groups = heads // key.shape[1]
    # K/V heads repeated to the query's: the flash op takes no grouped heads on CUDA, and finding that out by a
    # failed call (as the other fused calls do, once per engine) inside a graph capture would end the capture.
    key, value = sdpa.repeat_kv(key, groups), sdpa.repeat_kv(value, groups)  # [B, Hq, L, D]
    if size >= length:  # the window cuts nothing: causal attention
        return sdpa.fused_attention(kernels, kernel, query, key, value, scale=scale, causal=True)
    q, k, v = (_chunks(x, size, count) for x in (query, key, value))  # [B*n, H, W, D]
    out, lse = sdpa.fused_attention(kernels, kernel, q, k, v, scale=scale, causal=True)  # [B*n, Hq, W, Dv], [.., W]
    out = out.view(batch, count, heads, size, -1)
    lse = lse.view(batch, count, heads, size)
    if count > 1 and size > 1:
        # Chunks 1..n-1, rows 0..W-2 (reversed: rows 1..W-1) against the previous chunk's keys 1..W-1 (reversed).
        rows = q.view(batch, count, heads, size, -1)[:, 1:, :, : size - 1].flip(3)  # [B, n-1, Hq, W-1, D]
        keys = k.view(batch, count, heads, size, -1)[:, :-1, :, 1:].flip(3)  # [B, n-1, Hq, W-1, D]
        values = v.view(batch, count, heads, size, -1)[:, :-1, :, 1:].flip(3)  # [B, n-1, Hq, W-1, Dv]
        earlier = batch * (count - 1)
        out_prev, lse_prev = sdpa.fused_attention(
            kernels, kernel, rows.reshape(earlier, heads, size - 1, -1), keys.reshape(earlier, heads, size - 1, -1),
            values.reshape(earlier, heads, size - 1, -1), scale=scale, causal=True,
        )  # fmt: skip
        out_prev = out_prev.view(batch, count - 1, heads, size - 1, -1).flip(3)  # rows 0..W-2 again
        lse_prev = lse_prev.view(batch, count - 1, heads, size - 1).flip(3)
        merged, merged_lse = merge_pair(out[:, 1:, :, : size - 1], lse[:, 1:, :, : size - 1], out_prev, lse_prev)
        out = torch.cat([out[:, :1], torch.cat([merged, out[:, 1:, :, size - 1 :]], dim=3)], dim=1)
        lse = torch.cat([lse[:, :1], torch.cat([merged_lse, lse[:, 1:, :, size - 1 :]], dim=3)], dim=1)
    out = out.transpose(1, 2).reshape(batch, heads, count * size, -1)[:, :, :length]
    lse = lse.transpose(1, 2).reshape(batch, heads, count * size)[:, :, :length]
    return out, lse
