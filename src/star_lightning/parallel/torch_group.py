"""The context-parallel group over ``torch.distributed``: the only collectives Star Attention needs.

Phase 1 broadcasts the anchor's K/V from the first host (asynchronously, layer by layer), Phase 2 gathers one
``(out, lse)`` partial per host per layer, the query host broadcasts each chosen token, and ring attention (the
exact baseline) passes K/V around the ring while it computes. Bytes sent are counted for the profiler.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from star_lightning.parallel.group import Done, Transfer, pack_partials, unpack_partials


class DistributedContextGroup:
    """A context-parallel group backed by a ``torch.distributed`` process group.

    ``ranks`` are the global ranks of the group in host order; the last one is the query host (it owns the last
    context block). ``device`` is where the collectives run (the process's root device); tensors that live on
    another device (a model spread over several GPUs of a host) are copied there and back.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        ranks: list[int],
        device: torch.device,
        exchange_group: dist.ProcessGroup | None = None,
    ) -> None:
        self._group = group
        self._device = device
        self._ranks = list(ranks)
        self._rank = self._ranks.index(dist.get_rank())
        self._bytes = 0
        self._exchange = exchange_group

    @property
    def exchange_group(self) -> dist.ProcessGroup:
        """The process group of Phase 1's passing tokens: the same hosts as the group's, a communicator of their own,
        so their all-gathers never have to keep in step with the anchor's broadcasts (which a receiver posts for
        every layer before its forward). Made by the strategy with the other groups; for a group over the whole world
        it is made here at first use (every rank is then in it, as group creation needs)."""
        if self._exchange is None:
            if self._group is not None and dist.get_world_size() != self.size:
                raise RuntimeError(
                    "passing tokens need the context-parallel group's exchange group, made with the other groups "
                    "(ContextParallelMixin); construct DistributedContextGroup with exchange_group=..."
                )
            self._exchange = dist.new_group(self._ranks)
        return self._exchange

    @property
    def process_group(self) -> dist.ProcessGroup | None:
        """The ``torch.distributed`` group (None: the world)."""
        return self._group

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return len(self._ranks)

    @property
    def query_host(self) -> int:
        return self.size - 1

    @property
    def bytes_moved(self) -> int:
        return self._bytes

    def gather_partials(self, out: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
        if self.size == 1:  # a data-parallel-only layout: nothing to gather
            return out.unsqueeze(0), lse.unsqueeze(0)
        packed = pack_partials(out, lse).to(self._device).contiguous()  # [B, H, L, D + 1]
        gathered = torch.empty((self.size, *packed.shape), dtype=packed.dtype, device=packed.device)
        if dist.get_backend(self._group) == dist.Backend.NCCL:
            dist.all_gather_into_tensor(gathered, packed, group=self._group)
        else:
            dist.all_gather(list(gathered.unbind(0)), packed, group=self._group)
        self._bytes += packed.numel() * packed.element_size() * (self.size - 1)
        return unpack_partials(gathered.to(out.device), out.dtype)  # [N, B, H, L, D], [N, B, H, L]

    def broadcast_from_query_host(self, tensor: Tensor) -> Tensor:
        if self.size == 1:
            return tensor
        local = tensor.to(self._device)
        dist.broadcast(local, src=self._ranks[self.query_host], group=self._group)
        if self.rank == self.query_host:
            self._bytes += tensor.numel() * tensor.element_size() * (self.size - 1)
        return local.to(tensor.device)

    def start_broadcast_from_first(self, tensor: Tensor) -> Transfer:
        if self.size == 1:
            return Done(tensor)
        home = tensor.device
        local = tensor.to(self._device).contiguous()
        work = dist.broadcast(local, src=self._ranks[0], group=self._group, async_op=True)
        if self.rank == 0:
            self._bytes += local.numel() * local.element_size() * (self.size - 1)
        return _Pending([work], local, home)

    def start_ring_shift(self, tensor: Tensor, recv_shape: tuple[int, ...]) -> Transfer:
        home = tensor.device
        outgoing = tensor.to(self._device).contiguous()
        received = outgoing.new_empty(recv_shape)
        send_to = self._ranks[(self.rank + 1) % self.size]
        recv_from = self._ranks[(self.rank - 1) % self.size]
        ops = [
            dist.P2POp(dist.isend, outgoing, send_to, group=self._group),
            dist.P2POp(dist.irecv, received, recv_from, group=self._group),
        ]
        works = dist.batch_isend_irecv(ops)
        self._bytes += outgoing.numel() * outgoing.element_size()
        # ``outgoing`` stays referenced until the transfer is waited on: its memory must outlive the send.
        return _Pending(works, received, home, keep_alive=outgoing)

    def start_all_gather(self, tensor: Tensor) -> Transfer:
        home = tensor.device
        local = tensor.to(self._device).contiguous()
        gathered = local.new_empty((self.size, *local.shape))
        if self.size == 1:
            gathered[0] = local
            return Done(gathered.to(home))
        group = self.exchange_group
        if dist.get_backend(group) == dist.Backend.NCCL:
            work = dist.all_gather_into_tensor(gathered, local, group=group, async_op=True)
        else:
            work = dist.all_gather(list(gathered.unbind(0)), local, group=group, async_op=True)
        self._bytes += local.numel() * local.element_size() * (self.size - 1)
        return _Pending([work], gathered, home, keep_alive=local)


class _Pending:
    """A started ``torch.distributed`` transfer; ``wait`` gives the received tensor on the caller's device."""

    def __init__(self, works: list[Any], result: Tensor, home: torch.device, keep_alive: Tensor | None = None) -> None:
        self._works = works
        self._result = result
        self._home = home
        self._keep_alive = keep_alive

    def wait(self) -> Tensor:
        for work in self._works:
            work.wait()  # NCCL: the current stream waits (the host does not); gloo: the host waits
        self._works = []
        self._keep_alive = None
        return self._result.to(self._home)
