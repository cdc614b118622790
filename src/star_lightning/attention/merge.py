"""The one place the online-softmax arithmetic lives: merging partial attention results exactly.

A partial result is ``(out, lse)``: the softmax-weighted values over some subset of the keys and the natural-log
sum of the exponentiated scores over that subset. Merging partials over disjoint key sets gives exactly the
attention over their union. :func:`merge_pair` merges two (ring attention, the anchor prefix, the kernels that split
a causal mask into a visible prefix and a square causal part); :func:`merge_partials` merges every host's at once
(Phase 2; on CUDA one Triton kernel with this arithmetic:
:func:`star_lightning.attention.triton_decode.merge_partials`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from star_lightning.attention import triton_decode


def merge_pair(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Merge two partials with the overflow-free sigmoid form, in float32 (or float64 for float64 inputs).

    ``out_*``: ``[..., L, D]``; ``lse_*``: ``[..., L]``. A partial over no keys has ``lse = -inf`` and is ignored.
    """
    dtype = torch.promote_types(lse_a.dtype, torch.float32)
    lse_a, lse_b = lse_a.to(dtype), lse_b.to(dtype)
    a_empty, b_empty = torch.isneginf(lse_a), torch.isneginf(lse_b)
    # Finite stand-ins keep the arithmetic NaN-free; the true -inf cases are restored by the masks below.
    safe_a = torch.where(a_empty, torch.zeros_like(lse_a), lse_a)
    safe_b = torch.where(b_empty, torch.zeros_like(lse_b), lse_b)
    lse = safe_a - torch.nn.functional.logsigmoid(safe_a - safe_b)  # = log(exp(a) + exp(b))
    weight_b = torch.sigmoid(safe_b - safe_a)  # = exp(b) / (exp(a) + exp(b)), [..., L]
    weight_b = torch.where(b_empty, torch.zeros_like(weight_b), weight_b)
    weight_b = torch.where(a_empty & ~b_empty, torch.ones_like(weight_b), weight_b)
    lse = torch.where(a_empty, lse_b, torch.where(b_empty, lse_a, lse))
    out_a32, out_b32 = out_a.to(dtype), out_b.to(dtype)
    out = out_a32 - weight_b.unsqueeze(-1) * (out_a32 - out_b32)  # [..., L, D]
    return out.to(out_a.dtype), lse


def merge_partials(outs: Tensor, lses: Tensor) -> tuple[Tensor, Tensor]:
    """Merge ``N`` stacked partials at once: ``outs`` ``[N, ..., L, D]``, ``lses`` ``[N, ..., L]``.

    Overflow-free by subtracting the largest lse (``lse = m + log(sum exp(lse_i - m))``, weights
    ``exp(lse_i - lse)``), in float32 (float64 for float64 inputs). A few whole-tensor kernels whatever ``N`` is:
    Phase 2 runs this once per layer and token, where a pairwise fold cost ``N - 1`` rounds of small kernels. Every
    host merges the same gathered tensor with the same kernels, so all hosts get the same bits. Partials over no keys
    (``lse = -inf``) get weight 0; where every partial is empty, the result is ``out = 0``, ``lse = -inf``.
    """
    if outs.shape[0] == 1:
        return outs[0], lses[0]
    if triton_decode.merge_supports(outs, lses):  # one kernel (a CUDA graph's decode step: 1 node, not 12)
        return triton_decode.merge_partials(outs, lses)
    dtype = torch.promote_types(lses.dtype, torch.float32)
    lses = lses.to(dtype)
    top = lses.amax(dim=0)  # [..., L]
    finite_top = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
    weights = torch.exp(lses - finite_top)  # [N, ..., L]; exp(-inf) = 0
    total = weights.sum(dim=0)  # [..., L], >= 1 where any partial is non-empty
    safe_total = torch.where(total > 0, total, torch.ones_like(total))
    out = (weights.unsqueeze(-1) * outs.to(dtype)).sum(dim=0) / safe_total.unsqueeze(-1)  # [..., L, D]
    lse = torch.where(total > 0, finite_top + torch.log(safe_total), top)
    return out.to(outs.dtype), lse
