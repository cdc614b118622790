"""A sliding-window layer's mask for one attention call, by the true positions of its queries and keys.

Its own file because every backend that masks reads it (the ``math`` tiles, FlexAttention, flash-attn's
``window_size``) and the selector only asks whether a call has one: no backend imports another to get it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from star_lightning.attention import flex

# Query rows per tile of the CPU windowed path: enough rows for efficient matmuls, few enough keys per tile.
BAND_ROWS = 256


@dataclass(frozen=True)
class SlidingWindow:
    """A sliding-window layer's mask for one call, by true positions: query at ``p`` sees key at ``k`` iff
    ``p - size < k <= p``."""

    size: int
    query_positions: Tensor  # [Lq] long
    key_positions: Tensor  # [Lk] long
    aligned: bool = False
    """The queries are the keys, one contiguous run of positions (a forward attending to itself): what flash-attn's
    ``window_size`` takes."""
    derived: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)
    """What the kernels derive from the positions (FlexAttention's mask, the CPU tiles' key ranges), built once for
    every layer that shares this window (the step keeps one window per forward and kind of call)."""

    def part(self, queries: slice = slice(None), keys: slice = slice(None)) -> SlidingWindow:
        """The window of a call on a slice of the queries and a slice of the keys."""
        return SlidingWindow(self.size, self.query_positions[queries], self.key_positions[keys])

    def positional_mask(self, valid_length: Tensor | None) -> flex.PositionalMask:
        """FlexAttention's mask of this window (keys past ``valid_length`` unseen), built once per window."""
        if "flex" not in self.derived:
            self.derived["flex"] = flex.positional_mask(
                self.query_positions, self.key_positions, self.size, valid_length
            )
        mask: flex.PositionalMask = self.derived["flex"]
        return mask

    def band_tiles(self, key_length: int) -> list[tuple[slice, slice]] | None:
        """Tiles of ``BAND_ROWS`` query rows, each with the range of the first ``key_length`` keys its rows can
        reach; None when the keys' positions do not ascend. Built once per window."""
        if ("band", key_length) not in self.derived:
            keys = self.key_positions[:key_length]  # [Lk]
            tiles = None
            if bool((keys[1:] >= keys[:-1]).all()):
                queries, far = self.query_positions, 1 << 40
                pad = -queries.shape[0] % BAND_ROWS
                low = F.pad(queries, (0, pad), value=far).view(-1, BAND_ROWS).amin(-1)  # [T]: each tile's least
                high = F.pad(queries, (0, pad), value=-far).view(-1, BAND_ROWS).amax(-1)  # [T]: and largest
                first = torch.searchsorted(keys, low - self.size, right=True).tolist()  # first key in reach
                last = torch.searchsorted(keys, high, right=True).tolist()  # one past the last
                length = queries.shape[0]
                tiles = [
                    (slice(start, min(length, start + BAND_ROWS)), slice(a, max(a, b)))
                    for start, a, b in zip(range(0, length, BAND_ROWS), first, last, strict=True)
                ]
            self.derived[("band", key_length)] = tiles
        result: list[tuple[slice, slice]] | None = self.derived[("band", key_length)]
        return result

    def hidden(self, rows: slice) -> Tensor:
        """``[l, Lk]``: True where query row (of ``rows``) must not see the key."""
        query = self.query_positions[rows][:, None]  # [l, 1]
        key = self.key_positions[None, :]  # [1, Lk]
        return (key > query) | (key <= query - self.size)
