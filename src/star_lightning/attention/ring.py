"""Exact ring attention over the context, the distributed baseline Star Attention is compared with.

Each host holds the chunks :class:`~star_lightning.partition.RingPlan` gives it. The K/V of every host travel
around the ring, one hop per step; the next hop's transfer is started before the current step's attention and
waited for after it, so communication overlaps with compute (ring-flash-attention's ``RingComm`` pattern). Partials
are merged exactly with the same merge as Phase 2.

Zigzag layout (host ``h`` holds chunks ``h`` and ``2H-1-h``, queries ``[qa | qb]``): against its own K/V ``qa``
attends causally to ``ka`` and ``qb`` causally to ``[ka | kb]``; against the K/V of a host ``s < h`` every query
sees that host's first chunk and nothing of its second; against ``s > h`` only ``qb`` sees, and it sees both of its
chunks. Every step costs every host the same. Contiguous layout: host ``s < h`` is seen whole, ``s > h`` not at all.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from star_lightning.attention.kernels import KernelChoice, attention_with_lse
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
) -> tuple[Tensor, Tensor]:
    """Causal attention of this host's chunks (``query`` ``[B, Hq, L, D]``, ``key``/``value`` ``[B, Hkv, L, D]``, the
    chunks concatenated in context order) over every earlier position of the context."""
    rank, size = group.rank, group.size

    def attend(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> tuple[Tensor, Tensor]:
        return attention_with_lse(q, k, v, scale=scale, causal=causal, softcap=softcap, kernels=kernels)

    first = plan.chunk_lengths_of(rank)[0]  # rows of this host's first chunk
    zigzag = plan.layout == "zigzag"
    if zigzag:
        out_a, lse_a = attend(query[:, :, :first], key[:, :, :first], value[:, :, :first], causal=True)
        out_b, lse_b = attend(query[:, :, first:], key, value, causal=True)  # bottom-right: sees all of ka
        out, lse = torch.cat([out_a, out_b], dim=2), torch.cat([lse_a, lse_b], dim=2)
    else:
        out, lse = attend(query, key, value, causal=True)
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
    attend: Callable[[Tensor, Tensor, Tensor, bool], tuple[Tensor, Tensor]],
) -> tuple[Tensor, Tensor]:
    """Merge in what this host's queries see of host ``source``'s K/V (``travelling`` ``[B, Hkv, L_s, D + Dv]``)."""
    keys, values = travelling[..., :head_dim], travelling[..., head_dim:]
    if plan.layout == "contiguous":
        if source > rank:
            return out, lse
        part_out, part_lse = attend(query, keys, values, False)
        return merge_pair(out, lse, part_out, part_lse)
    source_first = plan.chunk_lengths_of(source)[0]
    if source < rank:  # every query sees the source's first chunk, none its second
        part_out, part_lse = attend(query, keys[:, :, :source_first], values[:, :, :source_first], False)
        return merge_pair(out, lse, part_out, part_lse)
    first = plan.chunk_lengths_of(rank)[0]  # source > rank: only the second chunk's queries see, and see it all
    part_out, part_lse = attend(query[:, :, first:], keys, values, False)
    out_b, lse_b = merge_pair(out[:, :, first:], lse[:, :, first:], part_out, part_lse)
    return torch.cat([out[:, :, :first], out_b], dim=2), torch.cat([lse[:, :, :first], lse_b], dim=2)
