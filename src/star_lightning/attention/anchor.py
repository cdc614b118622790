"""Where a host gets the anchor's K/V in Phase 1, one layer at a time.

Under causal attention the anchor's keys and values depend on the anchor alone, so they are the same for every
block and every host. Three ways to have them (``--model.anchor_source``):

- ``host``: each host runs the anchor's forward once and keeps every layer's K/V (:class:`KeptAnchor`);
- ``broadcast``: host 0, which computes them anyway while encoding the first block, sends each layer's K/V as soon
  as that layer has them (:class:`BroadcastAnchor`); the other hosts post every layer's receive before their
  forward starts and wait for a layer only when its attention needs it (:class:`ReceivedAnchor`), so the transfer
  overlaps with their compute and they never run the anchor's forward;
- ``block``: no prefix object at all; every block is a forward of ``(anchor, block)`` (the reference way).

A prefix answers :meth:`AnchorPrefix.kv` with the layer's ``[B, Hkv, a, D]`` keys and values; a sink takes them
(:meth:`AnchorSink.put`) from the forward that computes them.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from star_lightning.parallel.group import ContextGroup, Transfer


class AnchorPrefix(Protocol):
    length: int

    def kv(self, layer: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """The anchor's keys and values of ``layer`` on the device of ``like`` (the layer's own keys)."""
        ...


class AnchorSink(Protocol):
    length: int

    def put(self, layer: int, keys: Tensor, values: Tensor) -> None:
        """Take the anchor's ``[B, Hkv, a, D]`` keys and values of ``layer`` as the forward computes them."""
        ...


class KeptAnchor:
    """Every layer's anchor K/V, kept on this host (a sink while computed, then a prefix)."""

    def __init__(self, num_layers: int, length: int) -> None:
        self.length = length
        self._kv: list[tuple[Tensor, Tensor] | None] = [None] * num_layers

    def put(self, layer: int, keys: Tensor, values: Tensor) -> None:
        self._kv[layer] = (keys, values)

    def kv(self, layer: int, like: Tensor) -> tuple[Tensor, Tensor]:
        kept = self._kv[layer]
        if kept is None:
            raise RuntimeError(f"the anchor's K/V of layer {layer} were not computed before a block needed them")
        return kept


class BroadcastAnchor(KeptAnchor):
    """Host 0: keeps each layer's anchor K/V for its own later blocks and sends it to the other hosts at once."""

    def __init__(self, num_layers: int, length: int, group: ContextGroup) -> None:
        super().__init__(num_layers, length)
        self._group = group
        self._sent: list[Transfer] = []

    def put(self, layer: int, keys: Tensor, values: Tensor) -> None:
        super().put(layer, keys, values)
        message = torch.stack([keys, values])  # [2, B, Hkv, a, D]: one message per layer
        self._sent.append(self._group.start_broadcast_from_first(message))

    def finish(self) -> None:
        """Wait until every layer's message has left (its buffer can then be freed)."""
        for transfer in self._sent:
            transfer.wait()
        self._sent = []


class ReceivedAnchor:
    """Hosts 1..H-1: every layer's receive is posted up front; a layer's K/V are waited for when first needed."""

    def __init__(
        self,
        group: ContextGroup,
        num_layers: int,
        shape: tuple[int, int, int, int],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        batch, heads, length, head_dim = shape
        self.length = length
        self._pending: list[Transfer | None] = [
            group.start_broadcast_from_first(torch.empty(2, batch, heads, length, head_dim, dtype=dtype, device=device))
            for _ in range(num_layers)
        ]
        self._kv: list[tuple[Tensor, Tensor] | None] = [None] * num_layers

    def kv(self, layer: int, like: Tensor) -> tuple[Tensor, Tensor]:
        kept = self._kv[layer]
        if kept is None:
            transfer = self._pending[layer]
            assert transfer is not None
            message = transfer.wait().to(like.device)  # [2, B, Hkv, a, D]
            self._pending[layer] = None
            if message.shape[1:3] != like.shape[:2] or message.shape[-1] != like.shape[-1]:
                raise RuntimeError(
                    f"layer {layer}: the anchor received from host 0 has K/V of shape {tuple(message.shape[1:])} but "
                    f"this layer's keys are {tuple(like.shape)}; the hosts do not run the same model"
                )
            kept = self._kv[layer] = (message[0], message[1])
        return kept

    def finish(self) -> None:
        """Wait for layers no block needed (none, normally), so no receive is left posted."""
        for layer, transfer in enumerate(self._pending):
            if transfer is not None:
                transfer.wait()
                self._pending[layer] = None
