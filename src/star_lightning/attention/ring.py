"""Exact ring attention over the context, the distributed baseline Star Attention is compared with.

Each host holds the chunks :class:`~star_lightning.partition.RingPlan` gives it. The K/V of every host travel
around the ring, one hop per step; the next hop's transfer is started before the current step's attention and
waited for after it, so communication overlaps with compute (ring-flash-attention's ``RingComm`` pattern). Partials
are merged exactly with the same merge as Phase 2.

Zigzag layout (host ``h`` holds chunks ``h`` and ``2H-1-h``, queries ``[qa | qb]``): against its own K/V ``qa``
attends causally to ``ka`` and ``qb`` causally to ``[ka | kb]``; against the K/V of a host ``s < h`` every query
sees that host's first chunk and nothing of its second; against ``s > h`` only ``qb`` sees, and it sees both of its
chunks. Every step costs every host the same. Contiguous layout: host ``s < h`` is seen whole, ``s > h`` not at all.

A sliding-window layer (``window``) masks every one of these calls by the true positions of the queries (this host's
chunk spans) and of the keys (the source host's chunk spans, both from the plan).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from star_lightning.attention.kernels import KernelChoice, SlidingWindow, attention_with_lse
from star_lightning.attention.merge import merge_pair
from star_lightning.parallel.group import ContextGroup
from star_lightning.partition import RingPlan


def ring_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    group: ContextGroup,
    plan: RingPlan,
    *,
    scale: float,
    softcap: float | None = None,
    kernels: KernelChoice | None = None,
    window: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Causal attention of this host's chunks (``query`` ``[B, Hq, L, D]``, ``key``/``value`` ``[B, Hkv, L, D]``, the
    chunks concatenated in context order) over every earlier position of the context (within ``window`` of each
    query, for a sliding-window layer)."""
    rank, size = group.rank, group.size

    def spans_positions(host: int) -> Tensor:
        return torch.cat([torch.arange(a, b, device=query.device) for a, b in plan.spans_of(host)])  # [L_host]

    local_positions = spans_positions(rank) if window is not None else None

    def attend(
        q: Tensor, k: Tensor, v: Tensor, causal: bool, rows: slice, source: int, keys: slice
    ) -> tuple[Tensor, Tensor]:
        """Attention of this host's query ``rows`` over the ``keys`` of host ``source``'s K/V."""
        masked = None
        if window is not None and local_positions is not None:
            source_positions = local_positions if source == rank else spans_positions(source)
            masked = SlidingWindow(window, local_positions, source_positions).part(rows, keys)
        return attention_with_lse(q, k, v, scale=scale, causal=causal, softcap=softcap, kernels=kernels, window=masked)

    every = slice(None)
    first = plan.chunk_lengths_of(rank)[0]  # rows of this host's first chunk
    zigzag = plan.layout == "zigzag"
    if zigzag:
        head = slice(None, first)
        out_a, lse_a = attend(query[:, :, head], key[:, :, head], value[:, :, head], True, head, rank, head)
        tail = slice(first, None)
        out_b, lse_b = attend(query[:, :, tail], key, value, True, tail, rank, every)  # bottom-right: sees all of ka
        out, lse = torch.cat([out_a, out_b], dim=2), torch.cat([lse_a, lse_b], dim=2)
    else:
        out, lse = attend(query, key, value, True, every, rank, every)
    head_dim = key.shape[-1]
    current = torch.cat([key, value], dim=-1)  # [B, Hkv, L, D + Dv]: one message per hop
    for hop in range(1, size):
        # Pass on what this host holds (host rank-hop+1's K/V) while attending to it; host rank-hop's arrives.
        shape = (*current.shape[:2], plan.local_context_length((rank - hop) % size), current.shape[-1])
        transfer = group.start_ring_shift(current, shape)
        if hop > 1:
            out, lse = _attend_to(out, lse, query, current, (rank - hop + 1) % size, rank, plan, head_dim, attend)
        current = transfer.wait()
    if size > 1:
        out, lse = _attend_to(out, lse, query, current, (rank + 1) % size, rank, plan, head_dim, attend)
    return out, lse


def _attend_to(
    out: Tensor,
    lse: Tensor,
    query: Tensor,
    travelling: Tensor,
    source: int,
    rank: int,
    plan: RingPlan,
    head_dim: int,
    attend: Callable[[Tensor, Tensor, Tensor, bool, slice, int, slice], tuple[Tensor, Tensor]],
) -> tuple[Tensor, Tensor]:
    """Merge in what this host's queries see of host ``source``'s K/V (``travelling`` ``[B, Hkv, L_s, D + Dv]``)."""
    keys, values = travelling[..., :head_dim], travelling[..., head_dim:]
    every = slice(None)
    if plan.layout == "contiguous":
        if source > rank:
            return out, lse
        part_out, part_lse = attend(query, keys, values, False, every, source, every)
        return merge_pair(out, lse, part_out, part_lse)
    source_first = plan.chunk_lengths_of(source)[0]
    if source < rank:  # every query sees the source's first chunk, none its second
        head = slice(None, source_first)
        part_out, part_lse = attend(query, keys[:, :, head], values[:, :, head], False, every, source, head)
        return merge_pair(out, lse, part_out, part_lse)
    first = plan.chunk_lengths_of(rank)[0]  # source > rank: only the second chunk's queries see, and see it all
    part_out, part_lse = attend(query[:, :, first:], keys, values, False, slice(first, None), source, every)
    out_b, lse_b = merge_pair(out[:, :, first:], lse[:, :, first:], part_out, part_lse)
    return torch.cat([out[:, :, :first], out_b], dim=2), torch.cat([lse[:, :, :first], lse_b], dim=2)
