"""What the attention math needs from "the other hosts", as an interface with a trivial one-host version.

Model math depends on this protocol only; :mod:`star_lightning.parallel.torch_group` implements it with
``torch.distributed`` for a real context-parallel group and :mod:`star_lightning.parallel.simulated_group` plays one
host of a larger group on one device (the benchmark). Keeping them apart lets the math run and be tested in one
process, and keeps ``torch.distributed`` out of the attention code.

Transfers that can overlap with compute have a start/wait split (as ring-flash-attention's ``send_recv_kv``): the
``start_*`` call returns at once with a :class:`Transfer`; ``wait()`` gives the received tensor when it is needed.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class Transfer(Protocol):
    def wait(self) -> Tensor:
        """Block (the host, or on CUDA the current stream) until the transfer is done; the received tensor."""
        ...


class Done:
    """A transfer that completed when it started."""

    def __init__(self, tensor: Tensor) -> None:
        self._tensor = tensor

    def wait(self) -> Tensor:
        return self._tensor


class ContextGroup(Protocol):
    """The hosts that cooperate on one request. ``rank`` is the host index (0 owns the first block)."""

    @property
    def rank(self) -> int: ...

    @property
    def size(self) -> int: ...

    @property
    def query_host(self) -> int: ...

    @property
    def bytes_moved(self) -> int:
        """Bytes this host has sent so far (payload), for the profiler."""
        ...

    def gather_partials(self, out: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
        """Every host's ``(out, lse)`` stacked in host order: ``[N, ...]``."""
        ...

    def broadcast_from_query_host(self, tensor: Tensor) -> Tensor: ...

    def start_broadcast_from_first(self, tensor: Tensor) -> Transfer:
        """Host 0 sends ``tensor`` to every other host; elsewhere ``tensor`` is the receive buffer (same shape and
        dtype). Transfers started in the same order on every host are matched in that order."""
        ...

    def start_ring_shift(self, tensor: Tensor, recv_shape: tuple[int, ...]) -> Transfer:
        """Send ``tensor`` to host ``rank + 1``; the transfer yields what host ``rank - 1`` sent (of ``recv_shape``)."""
        ...

    def start_all_gather(self, tensor: Tensor) -> Transfer:
        """Every host's ``tensor`` (the same shape and dtype everywhere), stacked in host order: ``[N, ...]``.
        Phase 1's passing tokens: a host reads only the rows of the hosts before it."""
        ...


class SingleHostGroup:
    """The one-host group: a context-parallel size of 1 needs no communication."""

    rank = 0
    size = 1
    query_host = 0
    bytes_moved = 0

    def gather_partials(self, out: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
        return out.unsqueeze(0), lse.unsqueeze(0)

    def broadcast_from_query_host(self, tensor: Tensor) -> Tensor:
        return tensor

    def start_broadcast_from_first(self, tensor: Tensor) -> Transfer:
        return Done(tensor)

    def start_ring_shift(self, tensor: Tensor, recv_shape: tuple[int, ...]) -> Transfer:
        return Done(tensor)

    def start_all_gather(self, tensor: Tensor) -> Transfer:
        return Done(tensor.unsqueeze(0))


def capture_key(group: ContextGroup) -> object:
    """What a step captured over ``group`` (a CUDA graph kept with a store's buffers) depends on of the group: a
    one-host group calls no collective, so every :class:`SingleHostGroup` captures alike and a caller that makes one
    per request replays the kept steps; any other group is itself (its communicators are in the capture)."""
    return SingleHostGroup if type(group) is SingleHostGroup else id(group)


def is_query_host(group: ContextGroup) -> bool:
    return group.rank == group.query_host


def pack_partials(out: Tensor, lse: Tensor) -> Tensor:
    """One buffer per collective: ``[..., L, D + 1]`` with the lse as the last channel (float32 or float64)."""
    dtype = torch.promote_types(lse.dtype, torch.float32)
    return torch.cat([out.to(dtype), lse.to(dtype).unsqueeze(-1)], dim=-1)


def unpack_partials(packed: Tensor, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return packed[..., :-1].to(out_dtype), packed[..., -1]
