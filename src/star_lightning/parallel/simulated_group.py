"""One host of a larger context-parallel group, played on one device with no communication (the benchmark).

Phase 1 has no communication but the anchor's K/V (star) or the ring's K/V (ring), so running each host's share of
an ``H``-host plan in turn on one GPU measures every host's real Phase 1 compute. What the real host would send is
counted in :attr:`SimulatedHostGroup.bytes_moved` (its time is modelled by the caller at a stated link speed).

- The anchor: host 0's simulation records each layer's message on an :class:`AnchorBoard`; the other hosts'
  simulations receive them from it, so their blocks see the exact anchor K/V (star is exact in simulation too).
- The ring: a hop hands back a tensor of the received shape made from the host's own K/V, so the compute is the
  real host's (same shapes) but the values are not (ring results are timing-only in simulation).
- Phase 1's passing tokens (an all-gather per layer): each host's contribution is recorded on the board; a host gets
  those of the hosts simulated before it (the only ones it reads) and zeros in the rows of later hosts, so the
  tokens a host attends to are exactly a real host's. (A benchmark that samples hosts leaves earlier rows unsimulated
  too: their zeros have the real shapes, so the compute is the real host's but its values are not: timing only.)
- Phase 2: every host's partial is this host's own, so the merge runs over ``H`` partials as on the real group.
"""

from __future__ import annotations

import torch
from torch import Tensor

from star_lightning.parallel.group import Done, Transfer


class AnchorBoard:
    """The anchor messages host 0 sends, in order, for the simulated receivers; and every all-gather's contributions
    of the hosts simulated so far (``gathers[i][host]``: the i-th all-gather of each host, in order)."""

    def __init__(self) -> None:
        self.messages: list[Tensor] = []
        self.gathers: list[dict[int, Tensor]] = []

    @property
    def nbytes(self) -> int:
        sent = sum(message.numel() * message.element_size() for message in self.messages)
        gathered = sum(part.numel() * part.element_size() for parts in self.gathers for part in parts.values())
        return sent + gathered

    def clear(self) -> None:
        self.messages.clear()
        self.gathers.clear()


class SimulatedHostGroup:
    """Plays host ``rank`` of a ``size``-host group; ``board`` carries the anchor from host 0 to the others."""

    def __init__(self, rank: int, size: int, board: AnchorBoard | None = None) -> None:
        if not 0 <= rank < size:
            raise ValueError(f"host {rank} is not in a group of {size} hosts")
        self.rank = rank
        self.size = size
        self.query_host = size - 1
        self.bytes_moved = 0
        self.hop_bytes: list[int] = []  # bytes of every ring hop this host sent, in order
        self._board = board if board is not None else AnchorBoard()
        self._received = 0
        self._gathered = 0

    def gather_partials(self, out: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
        self.bytes_moved += (out.numel() * 4 + lse.numel() * 4) * (self.size - 1)  # packed float32, as the real group
        return out.unsqueeze(0).expand(self.size, *out.shape), lse.unsqueeze(0).expand(self.size, *lse.shape)

    def broadcast_from_query_host(self, tensor: Tensor) -> Tensor:
        if self.rank == self.query_host:
            self.bytes_moved += tensor.numel() * tensor.element_size() * (self.size - 1)
        return tensor

    def start_broadcast_from_first(self, tensor: Tensor) -> Transfer:
        if self.rank == 0:
            self._board.messages.append(tensor)
            self.bytes_moved += tensor.numel() * tensor.element_size() * (self.size - 1)
            return Done(tensor)
        if self._received >= len(self._board.messages):
            raise RuntimeError("simulate host 0 first: the other hosts receive the anchor it sends")
        message = self._board.messages[self._received]
        self._received += 1
        return Done(tensor.copy_(message))  # lands in the receiver's own buffer, as a real receive does

    def start_ring_shift(self, tensor: Tensor, recv_shape: tuple[int, ...]) -> Transfer:
        sent = tensor.numel() * tensor.element_size()
        self.bytes_moved += sent
        self.hop_bytes.append(sent)
        length = recv_shape[2]
        if tensor.shape[2] >= length:
            return Done(tensor[:, :, :length].contiguous())
        repeats = -(-length // tensor.shape[2])
        return Done(tensor.repeat(1, 1, repeats, 1)[:, :, :length].contiguous())

    def start_all_gather(self, tensor: Tensor) -> Transfer:
        if self._gathered == len(self._board.gathers):
            self._board.gathers.append({})
        parts = self._board.gathers[self._gathered]
        self._gathered += 1
        parts[self.rank] = tensor
        self.bytes_moved += tensor.numel() * tensor.element_size() * (self.size - 1)
        rows = [parts[host] if host in parts else torch.zeros_like(tensor) for host in range(self.size)]
        return Done(torch.stack(rows))
