"""Star's Phase 1 blocks replayed as CUDA graphs (``--model.prefill graph``; ``auto`` where it applies).

A small model's block forward is launch-bound: ~100 kernels and their Python a layer, ~1 ms a layer on an H100
whatever the block's length. Where one GPU holds every block of a request and the anchor is its own first block's
rows (:class:`~star_lightning.attention.anchor.StoredAnchor`: no query in the anchor, no passing tokens), a block's
forward reads and writes only fixed buffers: the weights, the store's buffers (handed from request to request by the
engine's :class:`~star_lightning.cache.StorePool`) and the block's ids and positions, copied into the graph's own.
Such a forward is captured the second time its shape comes (the first runs as it is: a shape seen once, as a
ragged block, is not worth a capture) and replayed from then on; the graphs are kept with the store's buffers.

What a capture depends on besides those buffers is its key: the block's place (first position, rows, where the store
writes), its length, the anchor's length, and whether a sliding window can cut anything. The host's last block,
ragged, is padded to a full block's length: its padding rows come after its real ones (causal attention: they change
nothing before them), and what they store lies past the store's length, never read and overwritten by Phase 2.
A capture that fails (a kernel that cannot be captured) leaves the engine's blocks eager, with one warning.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from star_lightning.attention.kernels import KernelChoice
from star_lightning.attention.step import ForwardStep
from star_lightning.cache import KVStore
from star_lightning.engine.forward import forward, model_config
from star_lightning.engine.settings import StarSettings
from star_lightning.engine.star_setup import StarRun
from star_lightning.partition import Block

_SEEN = "seen"  # a key met once: captured when it comes again


@dataclass
class BlockGraph:
    """One captured block forward: its graph, its input buffers ``[1, n]`` and the positions each layer stores."""

    graph: torch.cuda.CUDAGraph
    ids: Tensor
    positions: Tensor
    stored: int


AUTO_MAX_BLOCK = 8192
"""``auto`` replays blocks up to this many tokens: beyond, a block's forward is compute-bound (nothing to win), and a
captured windowed call, which takes ``math`` (FlexAttention is not captured), would hold its whole mask."""


def resolve_prefill_mode(star: StarSettings, devices: list[torch.device], length_dependent_rope: bool = False) -> str:
    """``auto``: ``graph`` on one GPU where the settings allow it (:meth:`StarSettings.prefill_graph_blocker`), blocks
    are at most :data:`AUTO_MAX_BLOCK` tokens and the rope is static, ``eager`` else; ``graph`` needs one GPU and a
    static rope (a rope whose frequencies follow the prompt's length recomputes them on the host at every forward)."""
    on_one_gpu = len(devices) == 1 and devices[0].type == "cuda"
    if star.prefill == "graph" and not on_one_gpu:
        raise ValueError("--model.prefill graph captures CUDA graphs on one GPU; use --model.prefill auto or eager")
    if star.prefill == "graph" and length_dependent_rope:
        raise ValueError(
            "--model.prefill graph cannot capture this model's rope (dynamic or longrope scaling recomputes its "
            "frequencies for every prompt length); use --model.prefill auto or eager"
        )
    if star.prefill == "auto":
        small = star.block_size <= AUTO_MAX_BLOCK and not length_dependent_rope
        return "graph" if on_one_gpu and small and star.prefill_graph_blocker() is None else "eager"
    return star.prefill


def graphs_apply(run: StarRun) -> bool:
    """Whether this host's blocks read only fixed buffers (the anchor from its own store, or recomputed in the
    forward), on a GPU: one host holding every block, no query rows, no exchange."""
    fixed = run.exchange is None and run.sink is None and run.received is None and not run.prefix.query
    return fixed and run.context_ids.device.type == "cuda"


def replay_block(
    model: nn.Module,
    run: StarRun,
    block: Block,
    ids: Tensor,
    positions: Tensor,
    step: ForwardStep,
    start: int | None,
    kernels: KernelChoice,
) -> None:
    """One block's forward: replayed where its key was captured, captured where it comes the second time, else run
    as it is (the first time, or after a capture failed on this engine)."""
    store = step.store
    assert store is not None
    padded = _padded_length(run, block, ids, store)
    key = _key(model, run, block, padded, step, start, store)
    graphs = store.allocation.graphs
    entry = graphs.get(key)
    if kernels.prefill_failure is not None or (entry is None and _first_sight(graphs, key)):
        forward(model, ids, positions, step, start=start)
        return
    if not isinstance(entry, BlockGraph):
        entry = _capture(model, ids, positions, step, start, padded, kernels, graphs)
        if entry is None:
            forward(model, ids, positions, step, start=start)
            return
        graphs[key] = entry
    length = ids.shape[1]
    entry.ids[:, :length].copy_(ids)
    entry.positions[:, :length].copy_(positions)
    entry.graph.replay()
    kernels.prefill_replays += 1
    store.advance(entry.stored - (padded - length))


def _first_sight(graphs: dict[Any, Any], key: tuple[Any, ...]) -> bool:
    if key in graphs:
        return False
    graphs[key] = _SEEN
    return True


def _padded_length(run: StarRun, block: Block, ids: Tensor, store: KVStore) -> int:
    """The forward's length with a ragged block padded to a full one, where the store has room for the padding."""
    missing = run.plan.block_size - block.length
    if missing <= 0 or store.length + ids.shape[1] + missing > store.capacity:
        return ids.shape[1]
    return ids.shape[1] + missing


def _key(
    model: nn.Module,
    run: StarRun,
    block: Block,
    padded: int,
    step: ForwardStep,
    start: int | None,
    store: KVStore,
) -> tuple[Any, ...]:
    """What a captured block forward depends on besides the fixed buffers it reads and writes."""
    window = getattr(model_config(model).get_text_config(), "sliding_window", None)
    cuts = None if window is None else min(step.last_position, int(window))  # step.window(size) is decided by it
    anchor = run.anchor.length if run.anchor is not None else 0
    return ("block", id(model), block.start, padded, start, store.length, step.skip, step.rows, anchor, cuts)


def _capture(
    model: nn.Module,
    ids: Tensor,
    positions: Tensor,
    step: ForwardStep,
    start: int | None,
    padded: int,
    kernels: KernelChoice,
    graphs: dict[Any, Any],
) -> BlockGraph | None:
    """Capture the block's forward on input buffers padded to ``padded`` (a warm-up on a side stream first, which
    also computes this request's block); None, with a warning, where a kernel cannot be captured."""
    store = step.store
    assert store is not None
    before, length, t0 = store.length, ids.shape[1], time.perf_counter()
    static_ids = torch.empty(1, padded, dtype=ids.dtype, device=ids.device)  # [1, n]
    static_positions = torch.empty(1, padded, dtype=positions.dtype, device=positions.device)  # [1, n]
    static_ids[:, :length] = ids
    static_ids[:, length:] = ids[:, -1:]
    static_positions[:, :length] = positions
    last = positions[:, -1:]
    static_positions[:, length:] = last + torch.arange(1, padded - length + 1, device=positions.device)
    if "pool" not in graphs:
        graphs["pool"] = torch.cuda.graph_pool_handle()
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            forward(model, static_ids, static_positions, step, start=start)  # kernels chosen, lazy set-up done
        torch.cuda.current_stream().wait_stream(side)
        store.truncate(before)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=graphs["pool"], capture_error_mode="thread_local"):
            forward(model, static_ids, static_positions, step, start=start)
    except RuntimeError as error:
        store.truncate(before)
        torch.cuda.synchronize()
        kernels.prefill_failure = str(error).splitlines()[0]
        warnings.warn(
            f"capturing a Phase 1 block as a CUDA graph failed ({kernels.prefill_failure}); this engine's blocks run "
            "uncaptured from now on (slower, the same predictions)",
            stacklevel=3,
        )
        return None
    stored = store.length - before
    store.truncate(before)
    kernels.prefill_captures += 1
    kernels.prefill_capture_s += time.perf_counter() - t0
    return BlockGraph(graph, static_ids, static_positions, stored)
