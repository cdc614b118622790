"""A host's share of the distributed KV cache: a plain store (append, view, roll back).

One preallocated buffer per layer (no reallocation and no concatenation of the long context while decoding). The
store holds what this host keeps: the KV of its own context blocks (Phase 1), then, on the query host, the query
and generated tokens (Phase 2). It has no idea of phases or anchors: what to store and what to attend to is the
attention step's business (:mod:`star_lightning.attention.step`).

Beside the K/V, the store keeps each stored token's true position (its place in the request): sliding-window layers
mask by distance, and a host's keys are not at positions ``0..n-1`` (its blocks, the ring's chunks, the query).

Rolling back (:meth:`KVStore.truncate`) to the context's length makes the encoded context answer another query:
what the last query and its generated tokens added is forgotten, the context's KV is kept.

A :class:`StorePool` (one per engine) hands a new store the buffers of the last store that died, where their capacity
(rounded up to a bucket) is the same: the request after it then writes into the same memory, so the CUDA graphs
captured over those buffers (a block's Phase 1 forward, the decode step; kept in :attr:`StoreBuffers.graphs`) replay
for it instead of being captured again. A store never shares buffers with a living one.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor


class _LayerBuffer:
    """One layer's ``[B, Hkv, capacity, D]`` keys and values, their ``[capacity]`` true positions, and how many slots
    are filled."""

    def __init__(self, keys: Tensor, values: Tensor, positions: Tensor) -> None:
        self.keys = keys
        self.values = values
        self.positions = positions
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def grow(self, capacity: int) -> None:
        keys = self.keys.new_zeros(*self.keys.shape[:2], capacity, self.keys.shape[3])  # [B, Hkv, C', D]
        values = self.values.new_zeros(*self.values.shape[:2], capacity, self.values.shape[3])  # [B, Hkv, C', Dv]
        positions = self.positions.new_zeros(capacity)  # [C']
        keys[:, :, : self.length] = self.keys[:, :, : self.length]
        values[:, :, : self.length] = self.values[:, :, : self.length]
        positions[: self.length] = self.positions[: self.length]
        self.keys, self.values, self.positions = keys, values, positions


class StoreBuffers:
    """One store's per-layer buffers, and the CUDA graphs captured over them (which bake their addresses in): handed
    from a store that died to the next one by a :class:`StorePool`."""

    def __init__(self, num_layers: int, capacity: int) -> None:
        self.capacity = capacity
        self.layers: list[_LayerBuffer | None] = [None] * num_layers
        self.graphs: dict[Any, Any] = {}
        """Captured steps over these buffers, by what they were captured for; emptied when a buffer changes."""

    def reset(self) -> None:
        """A new store begins: nothing is filled (what the buffers hold is the dead store's, never read)."""
        for buffer in self.layers:
            if buffer is not None:
                buffer.length = 0


class StorePool:
    """The buffers of the last store that died, for the next store of the same layers and capacity.

    Capacities are rounded up to ``bucket`` positions, so requests of nearly the same length get the same buffers.
    At most one set is kept: a store of another capacity frees it (and the graphs captured over it) before it
    allocates its own."""

    def __init__(self, bucket: int = 1024) -> None:
        if bucket <= 0:
            raise ValueError(f"bucket must be positive, got {bucket}")
        self.bucket = bucket
        self.free: StoreBuffers | None = None
        self.reused = 0
        """How many stores got the buffers of one that died."""

    def capacity(self, requested: int) -> int:
        return -(-requested // self.bucket) * self.bucket

    def take(self, num_layers: int, capacity: int) -> StoreBuffers:
        """Buffers for a store of ``capacity`` positions (rounded up to the bucket): the free set where it fits."""
        capacity = self.capacity(capacity)
        free, self.free = self.free, None
        if free is not None and free.capacity == capacity and len(free.layers) == num_layers:
            free.reset()
            self.reused += 1
            return free
        return StoreBuffers(num_layers, capacity)

    def give_back(self, buffers: StoreBuffers) -> None:
        self.free = buffers


class KVStore:
    """Per-layer KV buffers of ``capacity`` positions, created on the layer's device at its first append.

    ``pool``: where the buffers come from and go back to when the store dies (the capacity is then the pool's
    bucket at or above ``capacity``)."""

    def __init__(self, num_layers: int, capacity: int, pool: StorePool | None = None) -> None:
        self.num_layers = num_layers
        self.allocation = StoreBuffers(num_layers, capacity) if pool is None else pool.take(num_layers, capacity)
        """The buffers this store holds, with the graphs captured over them."""
        self._layers = self.allocation.layers
        if pool is not None:
            weakref.finalize(self, pool.give_back, self.allocation)

    @property
    def capacity(self) -> int:
        """Positions each layer's buffers hold (the pool's bucket at or above the capacity asked for)."""
        return self.allocation.capacity

    def _layer(self, layer: int) -> _LayerBuffer:
        buffer = self._layers[layer]
        if buffer is None:
            raise RuntimeError(f"the KV store of layer {layer} is empty: Phase 1 must run before Phase 2")
        return buffer

    def append(self, layer: int, keys: Tensor, values: Tensor, positions: Tensor) -> None:
        """Store ``keys``/``values`` ``[B, Hkv, n, D]`` and their true ``positions`` ``[n]`` after what the layer
        holds."""
        buffer = self._layers[layer]
        if buffer is not None and buffer.length == 0 and not _fits(buffer, keys, values):
            buffer = self._layers[layer] = None  # a pooled buffer of another shape, dtype or device
            self.allocation.graphs.clear()
        if buffer is None:
            b, h, _, d = keys.shape
            # Zeroed, not empty: a kernel that attends over the whole buffer with a valid length (FlexAttention in a
            # static decode step) gives the unfilled slots weight 0, and 0 x NaN garbage would be NaN.
            buffer = _LayerBuffer(
                keys.new_zeros(b, h, self.capacity, d),  # [B, Hkv, C, D]
                values.new_zeros(b, h, self.capacity, values.shape[-1]),  # [B, Hkv, C, Dv]
                torch.zeros(self.capacity, dtype=torch.long, device=keys.device),  # [C]
            )
            self._layers[layer] = buffer
        new = keys.shape[2]
        if buffer.length + new > buffer.capacity:
            raise RuntimeError(
                f"KV store overflow: {buffer.length} + {new} tokens exceed the capacity {buffer.capacity}"
            )
        buffer.keys[:, :, buffer.length : buffer.length + new] = keys
        buffer.values[:, :, buffer.length : buffer.length + new] = values
        buffer.positions[buffer.length : buffer.length + new] = positions
        buffer.length += new

    def view(self, layer: int) -> tuple[Tensor, Tensor]:
        """The filled part ``[B, Hkv, length, D]`` (a view, no copy)."""
        buffer = self._layer(layer)
        return buffer.keys[:, :, : buffer.length], buffer.values[:, :, : buffer.length]

    def positions(self, layer: int) -> Tensor:
        """The true positions ``[length]`` of the filled part (a view)."""
        buffer = self._layer(layer)
        return buffer.positions[: buffer.length]

    def buffers(self, layer: int) -> tuple[Tensor, Tensor, Tensor]:
        """The whole preallocated buffers: keys, values ``[B, Hkv, C, D]`` and positions ``[C]`` (static-shape
        decoding attends over them)."""
        buffer = self._layer(layer)
        return buffer.keys, buffer.values, buffer.positions

    def write_at(self, layer: int, slot: Tensor, keys: Tensor, values: Tensor, positions: Tensor) -> None:
        """Write one token's KV ``[B, Hkv, 1, D]`` and position ``[1]`` at the slot held in the device tensor ``slot``
        ``[1]``: no host sync and no shape change, so a captured CUDA graph can replay it. :meth:`advance` counts it."""
        buffer = self._layer(layer)
        buffer.keys.index_copy_(2, slot, keys)
        buffer.values.index_copy_(2, slot, values)
        buffer.positions.index_copy_(0, slot, positions)

    def advance(self, count: int = 1) -> None:
        """Count ``count`` positions written by :meth:`write_at` in every layer."""
        for layer in range(self.num_layers):
            buffer = self._layer(layer)
            if buffer.length + count > buffer.capacity:
                raise RuntimeError(
                    f"KV store overflow: {buffer.length} + {count} exceed the capacity {buffer.capacity}"
                )
            buffer.length += count

    def layer_length(self, layer: int) -> int:
        """Positions held in ``layer`` (inside a forward, the layers before it are ahead of those after it)."""
        buffer = self._layers[layer]
        return 0 if buffer is None else buffer.length

    @property
    def length(self) -> int:
        """Positions held (the same in every layer between forwards)."""
        buffer = self._layers[0]
        return 0 if buffer is None else buffer.length

    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on (the buffers stay allocated)."""
        for layer in range(self.num_layers):
            buffer = self._layer(layer)
            if length > buffer.length:
                raise ValueError(f"cannot roll the KV store back to {length} positions: it holds {buffer.length}")
            buffer.length = length

    def ensure_capacity(self, capacity: int) -> None:
        """Room for ``capacity`` positions (a kept context answering a longer query grows its buffers once)."""
        if capacity <= self.capacity:
            return
        self.allocation.capacity = capacity
        self.allocation.graphs.clear()  # captured over the old buffers
        for buffer in self._layers:
            if buffer is not None:
                buffer.grow(capacity)

    def memory_bytes(self) -> int:
        total = 0
        for buffer in self._layers:
            if buffer is not None:
                total += buffer.keys.numel() * buffer.keys.element_size()
                total += buffer.values.numel() * buffer.values.element_size()
                total += buffer.positions.numel() * buffer.positions.element_size()
        return total

    @property
    def device(self) -> torch.device:
        return self._layer(0).keys.device


def _fits(buffer: _LayerBuffer, keys: Tensor, values: Tensor) -> bool:
    """Whether a pooled buffer takes this layer's keys and values (the same heads, head size, dtype and device)."""
    same = buffer.keys.shape[:2] == keys.shape[:2] and buffer.keys.shape[3] == keys.shape[3]
    same = same and buffer.values.shape[3] == values.shape[3] and buffer.keys.dtype == keys.dtype
    return same and buffer.keys.device == keys.device and buffer.values.dtype == values.dtype
