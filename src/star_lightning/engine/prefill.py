"""Phase 1 on this host: star (blocks after the anchor prefix), ring (exact, chunks), dense (one causal forward).

Each ``prefill_*`` builds its :class:`~star_lightning.attention.step.ForwardStep` in named helpers (star's set-up:
:mod:`.star_setup`) and runs the model once per block (:func:`~star_lightning.engine.forward.forward`); every host
of a group runs the same calls in the same order, differing only in the blocks it owns.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from star_lightning.attention.kernels import KernelChoice
from star_lightning.attention.passing import PassingSettings
from star_lightning.attention.step import BlockRows, ForwardStep
from star_lightning.cache import KVStore
from star_lightning.engine.forward import forward, position_ids
from star_lightning.engine.prefill_graph import graphs_apply, replay_block
from star_lightning.engine.settings import AnchorSource, QueryPositions
from star_lightning.engine.star_setup import StarRun, star_run
from star_lightning.parallel.group import ContextGroup
from star_lightning.partition import Block, BlockPlan, RingPlan


def block_forward(run: StarRun, block: Block) -> tuple[Tensor, Tensor, ForwardStep, int | None]:
    """One block's forward inputs: ids ``[1, n]``, positions ``[1, n]``, its step and its first position (None
    where the positions are no contiguous run). With a lookback the block's rows follow the context tokens just
    before it (:meth:`~star_lightning.partition.Block.lookback`), recomputed and not stored: the step skips them."""
    prefix, selection = run.prefix, run.selection
    if block.index == 0:
        ids = run.context_ids[:, block.start : block.end]  # [1, l]
        positions = position_ids(block.start, block.end, ids.device)  # [1, l]
        # The prefix's query rides along as trailing rows where anyone needs its K/V or selection queries.
        tail = prefix.query if (run.sink is not None or run.exchange is not None) else 0
        if tail:
            ids = torch.cat([ids, prefix.ids[:, prefix.anchor :]], dim=1)  # [1, l + q]
            positions = torch.cat([positions, prefix.positions[:, prefix.anchor :]], dim=1)  # [1, l + q]
            selection = (block.length, block.length + tail) if selection is not None else None
        rows = BlockRows(prefix=prefix.anchor, tail_query=tail, selection=selection)
        return ids, positions, replace(run.base, share_anchor=run.sink, rows=rows), None if tail else block.start
    first = block.start - block.lookback(prefix.anchor, run.lookback)
    ids = run.context_ids[:, first : block.end]  # [1, w + l]
    positions = position_ids(first, block.end, ids.device)  # [1, w + l]
    if prefix.anchor and run.anchor_source == "block":
        ids = torch.cat([prefix.ids, ids], dim=1)  # [1, P + w + l]
        positions = torch.cat([prefix.positions, positions], dim=1)  # [1, P + w + l]
        rows = BlockRows(prefix=prefix.length, selection=selection)
        skip = prefix.length + block.start - first
        return ids, positions, replace(run.base, skip=skip, rows=rows), None
    return ids, positions, replace(run.base, anchor=run.anchor, skip=block.start - first), first


def prefill_star(
    model: nn.Module,
    context_ids: Tensor,
    plan: BlockPlan,
    group: ContextGroup,
    store: KVStore,
    *,
    anchor_source: AnchorSource = "broadcast",
    kernels: KernelChoice | None = None,
    query_ids: Tensor | None = None,
    query_positions: QueryPositions = "after_anchor",
    passing: PassingSettings | None = None,
    lookback: int = 0,
    graphs: bool = False,
) -> int:
    """Phase 1 on this host: encode its blocks, each after the anchor prefix; returns the bytes it sent.

    ``anchor_source``: where the blocks get the prefix's K/V (:mod:`.star_setup`; ``block``: every non-first
    block is a forward of ``(prefix, block)``, the reference implementation's way, storing only the block's K/V).
    ``query_ids``: the request's query, appended to the anchor in every block's prefix at ``query_positions``; the
    first block's forward computes it too (as trailing rows that see only the anchor), and no host stores it.
    ``passing``: every host passes ``passing.tokens`` of its block's tokens per layer to the hosts after it
    (:mod:`star_lightning.attention.passing`), the hosts encoding their blocks in rounds, in step.
    ``lookback``: every non-first block's forward starts this many context tokens earlier (after the anchor), those
    rows recomputed and not stored (``--model.lookback_tokens``; not with passing tokens).
    ``graphs``: replay the blocks' forwards as CUDA graphs where they read only fixed buffers
    (:mod:`.prefill_graph`).
    """
    kernels = KernelChoice() if kernels is None else kernels
    bytes_before = group.bytes_moved
    run = star_run(
        model, context_ids, plan, group, store, anchor_source=anchor_source, kernels=kernels,
        query_ids=query_ids, query_positions=query_positions, passing=passing, lookback=lookback,
    )  # fmt: skip
    replay = graphs and graphs_apply(run)
    for round_index in range(run.rounds):
        block = run.begin_round(round_index)
        if block is not None:
            ids, positions, step, start = block_forward(run, block)
            if replay:
                replay_block(model, run, block, ids, positions, step, start, kernels)
            else:
                forward(model, ids, positions, step, start=start)
    run.finish()
    return group.bytes_moved - bytes_before


def prefill_ring(
    model: nn.Module,
    context_ids: Tensor,
    plan: RingPlan,
    group: ContextGroup,
    store: KVStore,
    *,
    kernels: KernelChoice | None = None,
) -> int:
    """Phase 1 of the exact baseline: this host's chunks in one forward, global causal ring attention; returns the
    bytes it sent."""
    kernels = KernelChoice() if kernels is None else kernels
    spans = plan.spans_of(group.rank)
    device = context_ids.device
    ids = torch.cat([context_ids[:, start:stop] for start, stop in spans], dim=1)  # [1, L_local]
    positions = torch.cat([position_ids(start, stop, device) for start, stop in spans], dim=1)  # [1, L_local]
    bytes_before = group.bytes_moved
    step = ForwardStep(
        phase="ring", group=group, kernels=kernels, store=store, ring=plan,
        last_position=plan.context_length - 1,
    )  # fmt: skip
    forward(model, ids, positions, step)
    return group.bytes_moved - bytes_before


def prefill_dense(
    model: nn.Module, context_ids: Tensor, store: KVStore, *, kernels: KernelChoice | None = None
) -> None:
    """Phase 1 of the dense baseline: the whole context as one block on one host, with no anchor: one causal forward
    that stores its K/V, which is exactly the model's own attention over the context (tested against transformers').

    Why dense runs through the engine rather than transformers' own cache and loop: its Phase 2 (query, decode in
    every ``--model.decode`` mode, a kept context's roll back) is then star's one-host Phase 2, kernel for kernel,
    so an end-to-end comparison of dense and star compares their attention, not two loops (transformers' eager loop
    decoded at 2.4x star's captured graph on an H200); sliding-window layers (Gemma-2/3, Mistral) run the same
    windowed kernels as star's, by the same true positions. Models star cannot serve keep transformers' own attention
    and loop (:func:`star_lightning.models.set_attention`).
    """
    length = context_ids.shape[1]
    kernels = KernelChoice() if kernels is None else kernels
    step = ForwardStep(phase="block", kernels=kernels, store=store, last_position=length - 1)
    forward(model, context_ids, position_ids(0, length, context_ids.device), step, start=0)
