"""Exact ring attention over the context, the distributed baseline Star Attention is compared with.

Host ``r`` holds context chunk ``r`` (contiguous, in order). Its queries attend causally to their own chunk and
fully to every earlier chunk; the K/V chunks travel around the ring, one hop per step, and the partials are merged
exactly with the same merge as Phase 2.
"""

from __future__ import annotations

import torch
from torch import Tensor

from star_lightning.attention.kernels import attention_with_lse
from star_lightning.attention.merge import merge_pair
from star_lightning.parallel.group import ContextGroup


def ring_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    group: ContextGroup,
    chunk_lengths: tuple[int, ...],
    *,
    scale: float,
    softcap: float | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Causal attention of this host's chunk over all chunks up to and including its own.

    ``chunk_lengths[i]`` is host ``i``'s chunk length (every host knows them, so receive buffers are sized exactly).
    """
    rank, size = group.rank, group.size
    out, lse = attention_with_lse(query, key, value, scale=scale, causal=True, softcap=softcap, backend=backend)
    head_dim = key.shape[-1]
    travelling = torch.cat([key, value], dim=-1)  # [B, Hkv, L, D + Dv], one message per hop
    for hop in range(1, size):
        source = (rank - hop) % size
        shape = (*travelling.shape[:2], chunk_lengths[source], travelling.shape[-1])
        travelling = group.ring_shift(travelling, shape)
        if source < rank:
            k, v = travelling[..., :head_dim], travelling[..., head_dim:]
            part_out, part_lse = attention_with_lse(
                query, k, v, scale=scale, causal=False, softcap=softcap, backend=backend
            )
            out, lse = merge_pair(out, lse, part_out, part_lse)
    return out, lse
