"""The KV cache rules of Star Attention, as a transformers ``Cache``.

Each host keeps only the KV of its own context blocks, in one preallocated buffer per layer (no reallocation
and no concatenation of the long context during decoding). What ``update`` stores and returns depends on the
step the engine is running:

- ``anchor``: the anchor block's KV is kept aside (not part of the context) and returned as is;
- ``block``: the block's KV is appended to the context; attention sees ``[anchor | block]``;
- ``block_recompute``: the input is ``anchor + block`` (the reference implementation's way); only the block's
  part is stored;
- ``query``: Phase 2. The query host appends the new tokens and sees ``[context | new tokens]``; other hosts store
  nothing and see their context only.
- ``decode_static``: Phase 2 decoding with static shapes, so one captured CUDA graph serves every step. The new
  token's KV is written at a slot held in a device tensor (the query host only), and attention sees the whole
  preallocated buffer marked with its valid length (a device tensor as well); the engine sets both before each
  step (:meth:`StarKVCache.prepare_static_step`) and advances the host-side length after it.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from star_lightning.attention.kernels import attach_valid_length

CacheMode = Literal["anchor", "block", "block_recompute", "query", "decode_static"]


class StarCacheState:
    """Settings shared by all layers of one cache, changed by the engine between forwards."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.mode: CacheMode = "block"
        self.store_new_tokens = False
        self.recompute_anchor_length = 0
        self.write_slot: Tensor | None = None  # decode_static: where the new token's KV goes, [1] long
        self.valid_length: Tensor | None = None  # decode_static: keys attention sees, [1] int32


class StarCacheLayer(CacheLayerMixin):
    """One layer's context KV buffer ``[B, Hkv, capacity, D]`` plus the anchor KV used during Phase 1."""

    is_sliding = False
    is_compileable = False

    def __init__(self, state: StarCacheState) -> None:
        super().__init__()
        self.state = state
        self.length = 0
        self.anchor_keys: Tensor | None = None
        self.anchor_values: Tensor | None = None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        b, h, _, d = key_states.shape
        capacity = self.state.capacity
        self.keys = key_states.new_empty(b, h, capacity, d)  # [B, Hkv, C, D]
        self.values = value_states.new_empty(b, h, capacity, value_states.shape[-1])  # [B, Hkv, C, Dv]
        self.device = key_states.device
        self.is_initialized = True

    def _append(self, keys: Tensor, values: Tensor) -> None:
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        new = keys.shape[2]
        if self.length + new > self.state.capacity:
            raise RuntimeError(
                f"KV cache overflow: {self.length} + {new} tokens exceed the capacity {self.state.capacity}"
            )
        buffer_keys, buffer_values = self.buffers()
        buffer_keys[:, :, self.length : self.length + new] = keys
        buffer_values[:, :, self.length : self.length + new] = values
        self.length += new

    def context_view(self) -> tuple[Tensor, Tensor]:
        keys, values = self.buffers()
        return keys[:, :, : self.length], values[:, :, : self.length]  # [B, Hkv, len, D]

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: object, **kwargs: object
    ) -> tuple[Tensor, Tensor]:
        mode = self.state.mode
        if mode == "anchor":
            self.anchor_keys, self.anchor_values = key_states, value_states
            return key_states, value_states
        if mode == "block":
            self._append(key_states, value_states)
            if self.anchor_keys is None or self.anchor_values is None:
                return key_states, value_states
            keys = torch.cat([self.anchor_keys, key_states], dim=2)  # [B, Hkv, a + l, D]
            values = torch.cat([self.anchor_values, value_states], dim=2)
            return keys, values
        if mode == "block_recompute":
            skip = self.state.recompute_anchor_length
            self._append(key_states[:, :, skip:], value_states[:, :, skip:])
            return key_states, value_states
        if mode == "decode_static":
            return self._static_update(key_states, value_states)
        if self.state.store_new_tokens:
            self._append(key_states, value_states)
        return self.context_view()

    def _static_update(self, key_states: Tensor, value_states: Tensor) -> tuple[Tensor, Tensor]:
        """Write the token's KV at the device-side slot (no host sync, no shape change) and return the whole buffer."""
        keys, values = self.buffers()
        slot = self.state.write_slot
        if self.state.store_new_tokens and slot is not None:
            keys.index_copy_(2, slot, key_states)  # [B, Hkv, C, D] <- [B, Hkv, 1, D]
            values.index_copy_(2, slot, value_states)
        attach_valid_length(keys, self.state.valid_length)
        return keys, values

    def buffers(self) -> tuple[Tensor, Tensor]:
        """The whole preallocated buffers ``[B, Hkv, C, D]``."""
        if not self.is_initialized or self.keys is None or self.values is None:
            raise RuntimeError("the context KV cache is empty: Phase 1 must run before Phase 2")
        return self.keys, self.values

    def use_context_prefix_as_anchor(self, length: int) -> None:
        """On the host owning the first block, the anchor is the first ``length`` tokens of its own context."""
        keys, values = self.context_view()
        self.anchor_keys, self.anchor_values = keys[:, :, :length], values[:, :, :length]

    def drop_anchor(self) -> None:
        self.anchor_keys = self.anchor_values = None

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.state.capacity

    def get_max_cache_shape(self) -> int:
        return self.state.capacity

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0


class StarKVCache(Cache):
    """A host's share of the distributed KV cache of one request."""

    def __init__(self, num_layers: int, capacity: int) -> None:
        self.state = StarCacheState(capacity)
        super().__init__(layers=[StarCacheLayer(self.state) for _ in range(num_layers)])

    @property
    def star_layers(self) -> list[StarCacheLayer]:
        return [layer for layer in self.layers if isinstance(layer, StarCacheLayer)]

    def set_mode(self, mode: CacheMode, *, store_new_tokens: bool = False, recompute_anchor_length: int = 0) -> None:
        self.state.mode = mode
        self.state.store_new_tokens = store_new_tokens
        self.state.recompute_anchor_length = recompute_anchor_length

    def use_context_prefix_as_anchor(self, length: int) -> None:
        for layer in self.star_layers:
            layer.use_context_prefix_as_anchor(length)

    def drop_anchor(self) -> None:
        """The anchor's KV is only for Phase 1: free it before Phase 2."""
        for layer in self.star_layers:
            layer.drop_anchor()

    def begin_static_decode(self, *, store_new_tokens: bool) -> None:
        """Switch to ``decode_static``; the query host (``store_new_tokens``) writes each new token's KV."""
        device = self.star_layers[0].buffers()[0].device
        self.set_mode("decode_static", store_new_tokens=store_new_tokens)
        self.state.write_slot = torch.zeros(1, dtype=torch.long, device=device)
        self.state.valid_length = torch.zeros(1, dtype=torch.int32, device=device)

    def prepare_static_step(self) -> None:
        """Point the device-side slot and valid length at the next token (kernel launches, no host sync)."""
        length = self.context_length()
        if self.state.store_new_tokens and length >= self.state.capacity:
            raise RuntimeError(f"KV cache overflow: {length} + 1 tokens exceed the capacity {self.state.capacity}")
        if self.state.write_slot is None or self.state.valid_length is None:
            raise RuntimeError("prepare_static_step() needs begin_static_decode() first")
        self.state.write_slot.fill_(length)
        self.state.valid_length.fill_(length + 1 if self.state.store_new_tokens else length)

    def finish_static_step(self) -> None:
        if self.state.store_new_tokens:
            for layer in self.star_layers:
                layer.length += 1

    def end_static_decode(self) -> None:
        for layer in self.star_layers:
            if layer.is_initialized and layer.keys is not None:
                attach_valid_length(layer.keys, None)
        self.state.write_slot = self.state.valid_length = None
        self.set_mode("query")

    def context_length(self) -> int:
        return self.star_layers[0].length if self.layers else 0

    def memory_bytes(self) -> int:
        total = 0
        for layer in self.star_layers:
            if layer.is_initialized and layer.keys is not None and layer.values is not None:
                total += layer.keys.numel() * layer.keys.element_size()
                total += layer.values.numel() * layer.values.element_size()
        return total
