"""Star's Phase 1 set-up on one host (:func:`star_run`): the anchor prefix (the anchor, and with ``anchor_query`` the
query), the passing exchange, the step every block's forward starts from, and where the blocks get the prefix's K/V
(kept, broadcast by host 0, received; :mod:`star_lightning.attention.anchor`). :mod:`.prefill` runs the blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from star_lightning.attention.anchor import AnchorPrefix, BroadcastAnchor, KeptAnchor, ReceivedAnchor, StoredAnchor
from star_lightning.attention.kernels import KernelChoice
from star_lightning.attention.passing import SELECTION_WINDOW, PassingExchange, PassingSettings
from star_lightning.attention.step import BlockRows, ForwardStep
from star_lightning.cache import KVStore
from star_lightning.engine.forward import (
    forward,
    kv_shape,
    model_dtype_and_device,
    num_layers,
    position_ids,
    query_heads_per_key_head,
)
from star_lightning.engine.settings import AnchorSource, QueryPositions
from star_lightning.parallel.group import ContextGroup
from star_lightning.partition import Block, BlockPlan


@dataclass(frozen=True)
class AnchorPrefixTokens:
    """The anchor prefix of one request: the anchor, then (``anchor_query``) the query; ids ``[1, P]`` and positions
    ``[1, P]``, and which of its rows are the selection queries of passing tokens."""

    ids: Tensor
    positions: Tensor
    anchor: int
    query: int
    selection: tuple[int, int]
    last: int
    """The largest of ``positions`` (known on the host: no device sync)."""

    @property
    def length(self) -> int:
        return self.anchor + self.query


def anchor_prefix(
    context_ids: Tensor, plan: BlockPlan, query_ids: Tensor | None, query_positions: QueryPositions
) -> AnchorPrefixTokens:
    """``after_anchor``: the query at ``a .. a+q-1``, right after the anchor (APB gives the query consecutive positions
    inside its anchor); ``phase2``: at ``T .. T+q-1``, where Phase 2 puts it."""
    device, anchor = context_ids.device, plan.anchor_length
    if query_ids is None or not anchor:
        window = min(SELECTION_WINDOW, anchor)
        ids, positions = context_ids[:, :anchor], position_ids(0, anchor, device)  # [1, a]
        return AnchorPrefixTokens(ids, positions, anchor, 0, (anchor - window, anchor), anchor - 1)
    query = query_ids.shape[1]
    start = anchor if query_positions == "after_anchor" else plan.context_length
    ids = torch.cat([context_ids[:, :anchor], query_ids], dim=1)  # [1, a + q]
    positions = torch.cat([position_ids(0, anchor, device), position_ids(start, start + query, device)], dim=1)
    last = max(anchor - 1, start + query - 1)
    return AnchorPrefixTokens(ids, positions, anchor, query, (anchor, anchor + query), last)


@dataclass
class StarRun:
    """One host's Phase 1 set-up: its blocks, the anchor prefix, the step every block's forward starts from, and
    where its blocks get the prefix's K/V (``sink``: the forward computing them hands them here; ``received``: from
    host 0's broadcast; ``stored``: the first positions of this host's own store)."""

    context_ids: Tensor
    plan: BlockPlan
    blocks: tuple[Block, ...]
    prefix: AnchorPrefixTokens
    base: ForwardStep
    anchor_source: AnchorSource
    exchange: PassingExchange | None = None
    lookback: int = 0
    """Context tokens before a non-first block that its forward recomputes (``--model.lookback_tokens``)."""
    sink: KeptAnchor | None = None
    received: ReceivedAnchor | None = None
    stored: StoredAnchor | None = None

    @property
    def selection(self) -> tuple[int, int] | None:
        return self.prefix.selection if self.exchange is not None else None

    @property
    def anchor(self) -> AnchorPrefix | None:
        if self.stored is not None:
            return self.stored
        return self.received if self.received is not None else self.sink

    @property
    def rounds(self) -> int:
        """With passing tokens every host takes part in every round's collectives (a host with fewer blocks too)."""
        if self.exchange is None:
            return len(self.blocks)
        return max(len(self.plan.blocks_of(host)) for host in range(self.plan.num_hosts))

    def begin_round(self, round_index: int) -> Block | None:
        """This round's block, or None where this host has none left (it still joins the round's exchange)."""
        if self.exchange is not None:  # what each host can pass this round: its block's tokens, the anchor's excepted
            self.exchange.begin_round([_candidates(self.plan, h, round_index) for h in range(self.plan.num_hosts)])
        if round_index < len(self.blocks):
            return self.blocks[round_index]
        assert self.exchange is not None
        self.exchange.idle()
        return None

    def finish(self) -> None:
        if isinstance(self.sink, BroadcastAnchor):
            self.sink.finish()
        if self.received is not None:
            self.received.finish()


def _candidates(plan: BlockPlan, host: int, round_index: int) -> int:
    """Tokens host ``host`` may pass in round ``round_index``: its block of that round, without the anchor."""
    blocks = plan.blocks_of(host)
    if round_index >= len(blocks):
        return 0
    block = blocks[round_index]
    return block.length - (plan.anchor_length if block.index == 0 else 0)


def star_run(
    model: nn.Module,
    context_ids: Tensor,
    plan: BlockPlan,
    group: ContextGroup,
    store: KVStore,
    *,
    anchor_source: AnchorSource,
    kernels: KernelChoice,
    query_ids: Tensor | None,
    query_positions: QueryPositions,
    passing: PassingSettings | None,
    lookback: int = 0,
) -> StarRun:
    """Set up this host's Phase 1: the prefix, the passing exchange, the base step and the anchor's source."""
    if lookback and passing is not None and passing.tokens:
        raise ValueError("a lookback and passing tokens are not combined (the settings refuse it)")
    prefix = anchor_prefix(context_ids, plan, query_ids, query_positions)
    exchange = None
    if passing is not None and passing.tokens > 0 and group.size > 1 and plan.anchor_length:
        dtype, root = model_dtype_and_device(model)
        shape = (1, *kv_shape(model))  # [B, Hkv, D] of one token
        exchange = PassingExchange(group, passing, num_layers(model), shape, dtype, root)
    last = max(plan.context_length - 1, prefix.last)
    base = ForwardStep(phase="block", group=group, kernels=kernels, store=store, last_position=last, passing=exchange)
    run = StarRun(context_ids, plan, plan.blocks_of(group.rank), prefix, base, anchor_source, exchange, lookback)
    if plan.anchor_length and anchor_source != "block":
        _anchor_source(model, run, group)
    return run


def _anchor_source(model: nn.Module, run: StarRun, group: ContextGroup) -> None:
    """``broadcast``: host 0 sends each layer's prefix K/V while it encodes the first block, the others receive it
    (posted now, waited for layer by layer); ``host``: a host without the first block runs the prefix's forward once
    and keeps its K/V."""
    layers, prefix = num_layers(model), run.prefix
    positions = prefix.positions[0]  # [P]
    broadcast = run.anchor_source == "broadcast" and group.size > 1
    if run.blocks and run.blocks[0].index == 0 and not broadcast and not prefix.query and run.exchange is None:
        assert run.base.store is not None
        run.stored = StoredAnchor(run.base.store, prefix.length)  # the first block's own rows: nothing kept apart
    elif run.blocks and run.blocks[0].index == 0:
        run.sink = (
            BroadcastAnchor(layers, prefix.length, group, positions)
            if broadcast
            else KeptAnchor(layers, prefix.length, positions)
        )
    elif broadcast:
        dtype, root = model_dtype_and_device(model)
        heads, head_dim = kv_shape(model)
        selection, selection_shape = run.selection, None
        if selection is not None:
            selection_shape = (1, heads * query_heads_per_key_head(model), selection[1] - selection[0], head_dim)
        kv = (1, heads, prefix.length, head_dim)  # [B, Hkv, P, D]
        run.received = ReceivedAnchor(group, layers, kv, dtype, root, positions, selection_shape)
    else:
        run.sink = KeptAnchor(layers, prefix.length, positions)
        step = replace(run.base, keep_new=False, share_anchor=run.sink, rows=BlockRows(selection=run.selection))
        forward(model, prefix.ids, prefix.positions, replace(step, passing=None))
