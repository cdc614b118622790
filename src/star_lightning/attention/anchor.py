"""Where a host gets the anchor's K/V in Phase 1, one layer at a time.

Under causal attention the anchor's keys and values depend on the anchor alone, so they are the same for every
block and every host. Three ways to have them (``--model.anchor_source``):

- ``host``: each host runs the anchor's forward once and keeps every layer's K/V (:class:`KeptAnchor`);
- ``broadcast``: host 0, which computes them anyway while encoding the first block, sends each layer's K/V as soon
  as that layer has them (:class:`BroadcastAnchor`); the other hosts post every layer's receive before their
  forward starts and wait for a layer only when its attention needs it (:class:`ReceivedAnchor`), so the transfer
  overlaps with their compute and they never run the anchor's forward;
- ``block``: no prefix object at all; every block is a forward of ``(anchor, block)`` (the reference way).

A host that encodes the first block itself, with no query in the prefix and no passing tokens (one host holding
every block, as on one GPU), keeps nothing apart: the anchor is the first positions of its own store
(:class:`StoredAnchor`), so every block's forward reads fixed buffers and can be replayed as a CUDA graph.

The prefix is the anchor followed, with ``--model.anchor_query true``, by the request's query tokens (their K/V
depend on the anchor and the query only: the same for every host too). Its ``positions`` are the true positions of
the anchor and the positions the query is given in it. With passing tokens
(:mod:`star_lightning.attention.passing`) it also carries, per layer, the *selection queries* (the query tokens',
or the anchor's last tokens', rotated queries ``[B, Hq, s, D]``), which choose what each host passes on.

A prefix answers :meth:`AnchorPrefix.kv` with the layer's ``[B, Hkv, P, D]`` keys and values; a sink takes them
(:meth:`AnchorSink.put`) from the forward that computes them.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from star_lightning.cache import KVStore
from star_lightning.parallel.group import ContextGroup, Transfer


class AnchorPrefix(Protocol):
    length: int

    @property
    def positions(self) -> Tensor:
        """``[P]`` long: the prefix tokens' positions."""
        ...

    def kv(self, layer: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """The prefix's keys and values of ``layer`` on the device of ``like`` (the layer's own keys)."""
        ...

    def selection(self, layer: int, like: Tensor) -> Tensor | None:
        """The selection queries ``[B, Hq, s, D]`` of ``layer`` (None: not carried, no passing tokens)."""
        ...


class AnchorSink(Protocol):
    length: int

    def put(self, layer: int, keys: Tensor, values: Tensor, selection: Tensor | None = None) -> None:
        """Take the prefix's ``[B, Hkv, P, D]`` keys and values of ``layer`` (and its selection queries) as the forward
        computes them."""
        ...


class KeptAnchor:
    """Every layer's prefix K/V, kept on this host (a sink while computed, then a prefix)."""

    def __init__(self, num_layers: int, length: int, positions: Tensor | None = None) -> None:
        self.length = length
        self.positions = torch.arange(length) if positions is None else positions
        self._kv: list[tuple[Tensor, Tensor] | None] = [None] * num_layers
        self._selection: list[Tensor | None] = [None] * num_layers

    def put(self, layer: int, keys: Tensor, values: Tensor, selection: Tensor | None = None) -> None:
        self._kv[layer] = (keys, values)
        # A copy: the selection rows are a view of the forward's whole query, which would stay alive for every layer
        # (on Llama-3.1-8B with blocks of 32K: 268 MB a layer, 8.6 GB of host 0's Phase 1 peak).
        self._selection[layer] = None if selection is None else selection.clone(memory_format=torch.contiguous_format)

    def kv(self, layer: int, like: Tensor) -> tuple[Tensor, Tensor]:
        kept = self._kv[layer]
        if kept is None:
            raise RuntimeError(f"the anchor's K/V of layer {layer} were not computed before a block needed them")
        return kept

    def selection(self, layer: int, like: Tensor) -> Tensor | None:
        return self._selection[layer]


class StoredAnchor:
    """The anchor as the first ``length`` positions of this host's own store (written by its first block's forward,
    which begins with the anchor): views of the store's buffers, no copy and nothing kept apart."""

    def __init__(self, store: KVStore, length: int) -> None:
        self.length = length
        self._store = store

    @property
    def positions(self) -> Tensor:
        """The anchor's positions ``[P]``: the store's (a view of its layer-0 positions)."""
        return self._store.buffers(0)[2][: self.length]

    def kv(self, layer: int, like: Tensor) -> tuple[Tensor, Tensor]:
        if self._store.layer_length(layer) < self.length:
            raise RuntimeError(f"the anchor's K/V of layer {layer} were not stored before a block needed them")
        keys, values, _ = self._store.buffers(layer)  # [B, Hkv, C, D]
        return keys[:, :, : self.length], values[:, :, : self.length]

    def selection(self, layer: int, like: Tensor) -> Tensor | None:
        return None


class BroadcastAnchor(KeptAnchor):
    """Host 0: keeps each layer's prefix K/V for its own later blocks and sends it to the other hosts at once (the
    selection queries, where carried, as a second message of the layer)."""

    def __init__(self, num_layers: int, length: int, group: ContextGroup, positions: Tensor | None = None) -> None:
        super().__init__(num_layers, length, positions)
        self._group = group
        self._sent: list[Transfer] = []

    def put(self, layer: int, keys: Tensor, values: Tensor, selection: Tensor | None = None) -> None:
        message = torch.stack([keys, values])  # [2, B, Hkv, P, D]: one message per layer
        # What this host keeps is the message itself (alive until it has left anyway): no second copy of the prefix
        # where the given K/V are a copy already (the anchor's with the query's appended).
        super().put(layer, message[0], message[1], selection)
        self._sent.append(self._group.start_broadcast_from_first(message))
        kept = self._selection[layer]
        if kept is not None:
            self._sent.append(self._group.start_broadcast_from_first(kept))  # [B, Hq, s, D]

    def finish(self) -> None:
        """Wait until every layer's message has left (its buffer can then be freed)."""
        for transfer in self._sent:
            transfer.wait()
        self._sent = []


class ReceivedAnchor:
    """Hosts 1..H-1: every layer's receive (two with selection queries) is posted up front; a layer's K/V are waited
    for when first needed. (Passing tokens travel on a process group of their own, so these receives never have to
    keep in step with their all-gathers.)"""

    def __init__(
        self,
        group: ContextGroup,
        num_layers: int,
        shape: tuple[int, int, int, int],
        dtype: torch.dtype,
        device: torch.device,
        positions: Tensor | None = None,
        selection_shape: tuple[int, int, int, int] | None = None,
    ) -> None:
        batch, heads, length, head_dim = shape
        self.length = length
        self.positions = torch.arange(length) if positions is None else positions
        self._group = group
        self._shape = (2, batch, heads, length, head_dim)
        self._selection_shape = selection_shape
        self._dtype, self._device = dtype, device
        self._pending: list[list[Transfer]] = [self._post() for _ in range(num_layers)]
        self._kv: list[tuple[Tensor, Tensor] | None] = [None] * num_layers
        self._selection: list[Tensor | None] = [None] * num_layers

    def _post(self) -> list[Transfer]:
        buffers = [torch.empty(self._shape, dtype=self._dtype, device=self._device)]
        if self._selection_shape is not None:
            buffers.append(torch.empty(self._selection_shape, dtype=self._dtype, device=self._device))
        return [self._group.start_broadcast_from_first(buffer) for buffer in buffers]

    def _receive(self, layer: int, like: Tensor) -> tuple[Tensor, Tensor]:
        kept = self._kv[layer]
        if kept is None:
            transfers = self._pending[layer]
            self._pending[layer] = []
            message = transfers[0].wait().to(like.device)  # [2, B, Hkv, P, D]
            if message.shape[1:3] != like.shape[:2] or message.shape[-1] != like.shape[-1]:
                raise RuntimeError(
                    f"layer {layer}: the anchor received from host 0 has K/V of shape {tuple(message.shape[1:])} but "
                    f"this layer's keys are {tuple(like.shape)}; the hosts do not run the same model"
                )
            kept = self._kv[layer] = (message[0], message[1])
            if len(transfers) > 1:
                self._selection[layer] = transfers[1].wait().to(like.device)  # [B, Hq, s, D]
        return kept

    def kv(self, layer: int, like: Tensor) -> tuple[Tensor, Tensor]:
        return self._receive(layer, like)

    def selection(self, layer: int, like: Tensor) -> Tensor | None:
        self._receive(layer, like)
        return self._selection[layer]

    def finish(self) -> None:
        """Wait for layers no block needed (none, normally), so no receive is left posted."""
        for layer, transfers in enumerate(self._pending):
            for transfer in transfers:
                transfer.wait()
            self._pending[layer] = []
