"""One step object per forward: everything every attention layer needs to know about the current forward.

The engine (:mod:`star_lightning.engine`) builds a :class:`ForwardStep` and passes it through the model's
forward kwargs (``star_step=...``); the attention function (:mod:`star_lightning.attention.star`) reads it. Nothing
else carries state between the engine and the layers: the KV store is a plain store, the anchor comes from the step.

Phases:

- ``block``: Phase 1, a context block (or the anchor alone), causal, no communication except the anchor's K/V
  (given by ``anchor``; the first host hands its own to ``share_anchor``);
- ``ring``: Phase 1 of the exact ring baseline over ``ring``'s chunks;
- ``query``: Phase 2, the query or a generated token: attention over this host's store, then the exact merge of
  every host's partial. The query host (``keep_new``) stores the new tokens and is causal among them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor

from star_lightning.attention.anchor import AnchorPrefix, AnchorSink
from star_lightning.attention.kernels import KernelChoice, SlidingWindow
from star_lightning.attention.passing import PassingExchange
from star_lightning.cache import KVStore
from star_lightning.parallel.group import ContextGroup, SingleHostGroup
from star_lightning.partition import RingPlan

Phase = Literal["block", "ring", "query"]


@dataclass(frozen=True)
class StaticSlot:
    """Static-shape decoding: the new token's cache slot ``[1]`` (long) and the number of valid keys ``[1]`` (int32),
    both device tensors set before each step, so one captured CUDA graph serves every step."""

    write_slot: Tensor
    valid_length: Tensor


@dataclass(frozen=True)
class BlockRows:
    """What the rows of a Phase 1 forward are besides its block's tokens (the defaults: the block alone).

    ``prefix``: the leading rows that belong to the anchor prefix: the anchor inside the first block, or the prefix
    recomputed before a block (``anchor_source block``, then also the step's ``skip``). They are never passed on, and
    with passing tokens their keys (and the tail's) are the prefix keys the selection is normalised over.
    ``tail_query``: trailing rows that are the query of the prefix (``--model.anchor_query``), computed in the first
    block's forward: they see the first ``prefix`` keys (the anchor) and each other, causally; never stored.
    ``selection``: the rows ``[start, stop)`` whose queries choose the passing tokens, also handed to
    ``share_anchor``; None: the prefix's (``ForwardStep.anchor``), or no passing tokens.
    """

    prefix: int = 0
    tail_query: int = 0
    selection: tuple[int, int] | None = None


@dataclass(frozen=True)
class ForwardStep:
    """What every attention layer does in one forward.

    ``store``: this host's KV store (read in Phase 2; None for a forward that stores and reads nothing, the anchor's
    own forward). ``keep_new``: append this forward's K/V to ``store``, except its first ``skip`` positions (the
    anchor recomputed before a block) and its ``rows.tail_query`` last ones. ``anchor``: the prefix K/V attended to
    before the input's own; ``share_anchor``: where the prefix K/V of this forward go (kept, or sent to the other
    hosts). ``rows``: what a Phase 1 forward's rows are (:class:`BlockRows`); ``passing``: the exchange of passing
    tokens between hosts (:mod:`star_lightning.attention.passing`), None when off. ``static``: Phase 2 with
    static shapes. ``last_position``: the largest position this forward's queries reach, or may reach (a static
    decoder's last token): a sliding window no larger than it may cut something. ``positions``: the true positions
    ``[L]`` of this forward's tokens (the engine's ``_forward`` sets them from the position ids); ``start``: the first
    of them as a host integer when they are one contiguous run (None: not known without a device sync).

    What every layer of the forward would otherwise rebuild (the sliding windows of its kinds of call, with the masks
    and tiles the kernels derive from them) is built by the first layer that needs it and kept here (``derived``):
    one step object per forward, so nothing of one forward reaches the next.
    """

    phase: Phase
    group: ContextGroup = field(default_factory=SingleHostGroup)
    kernels: KernelChoice = field(default_factory=KernelChoice)
    store: KVStore | None = None
    keep_new: bool = True
    skip: int = 0
    anchor: AnchorPrefix | None = None
    share_anchor: AnchorSink | None = None
    ring: RingPlan | None = None
    rows: BlockRows = field(default_factory=BlockRows)
    passing: PassingExchange | None = None
    static: StaticSlot | None = None
    last_position: int = 0
    positions: Tensor | None = None
    start: int | None = None
    derived: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def window(self, size: int | None) -> int | None:
        """``size`` when a sliding window of that size can cut something in this forward, else None (the window is
        then no mask at all, and the kernels stay those of global attention)."""
        return size if size is not None and self.last_position >= size else None

    def token_positions(self) -> Tensor:
        if self.positions is None:
            raise RuntimeError("a forward step without the tokens' positions: run the model through the engine")
        return self.positions

    def own_window(self, size: int | None) -> SlidingWindow | None:
        """The window of this forward's tokens attending to themselves (None without a window)."""
        if size is None:
            return None
        if ("own", size) not in self.derived:
            positions = self.token_positions()
            self.derived[("own", size)] = SlidingWindow(size, positions, positions, aligned=self.start is not None)
        window: SlidingWindow = self.derived[("own", size)]
        return window

    def sees_anchor(self, size: int | None) -> bool:
        """Whether any token of this forward sees a prefix key (the anchor's, and the positions a query in the
        prefix is given) through a window of ``size``: not for a block far from the start, whose windows all begin
        past the prefix; then the prefix's call is skipped, not computed empty. Decided on the host from the
        prefix's positions (a host tensor) and the forward's contiguous run, else assumed."""
        if size is None or self.anchor is None or self.start is None:
            return True
        if ("sees_anchor", size) not in self.derived:
            keys = self.anchor.positions
            if keys.device.type != "cpu":
                return True
            stop = self.start + self.token_positions().shape[0]  # one past this forward's last position
            # a key at k is seen by a token at p iff k <= p < k + size: some p in [start, stop) for some key
            self.derived[("sees_anchor", size)] = bool(((keys > self.start - size) & (keys < stop)).any())
        seen: bool = self.derived[("sees_anchor", size)]
        return seen

    def anchor_window(self, size: int | None) -> SlidingWindow | None:
        """The window of this forward's tokens over the prefix's keys, by their positions."""
        if size is None or self.anchor is None:
            return None
        if ("anchor", size) not in self.derived:
            positions = self.token_positions()
            anchor = self.anchor.positions.to(positions.device)  # [P]
            self.derived[("anchor", size)] = SlidingWindow(size, positions, anchor)
        window: SlidingWindow = self.derived[("anchor", size)]
        return window

    def store_window(self, size: int | None, key_positions: Tensor) -> SlidingWindow | None:
        """The window of this forward's tokens over the host's store, whose positions (``key_positions``, the same in
        every layer) the first layer gives."""
        if size is None:
            return None
        if ("store", size) not in self.derived:
            self.derived[("store", size)] = SlidingWindow(size, self.token_positions(), key_positions)
        window: SlidingWindow = self.derived[("store", size)]
        return window
