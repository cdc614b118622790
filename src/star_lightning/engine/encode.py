"""Phase 1 of a request, timed: this host's share (:func:`encode_on_host`), or the shares of H hosts played in turn
in this one process (:func:`play_hosts`: the one loop of ``--model.simulate_hosts`` and of the benchmark's simulated
layouts, :mod:`star_lightning.engine.simulate`).

A played host runs the same code as a real one with a group that plays host h of H
(:mod:`star_lightning.parallel.simulated_group`: the anchor and the passing tokens each host gets are the ones the
hosts before it really computed), so one device predicts what H real hosts predict.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from torch import Tensor, nn
from transformers import DynamicCache

from star_lightning.attention.kernels import KernelChoice, sdpa_priority
from star_lightning.cache import KVStore
from star_lightning.engine.context import ContextKey, EncodedContext, context_key
from star_lightning.engine.forward import (
    dense_forward,
    model_config,
    model_devices,
    num_layers,
    position_ids,
    synchronize,
    uses_star_attention,
)
from star_lightning.engine.prefill import prefill_dense, prefill_ring, prefill_star
from star_lightning.engine.prefill_graph import resolve_prefill_mode
from star_lightning.engine.settings import StarSettings
from star_lightning.parallel.group import ContextGroup
from star_lightning.parallel.simulated_group import AnchorBoard, SimulatedHostGroup
from star_lightning.partition import plan_blocks, plan_ring
from star_lightning.rope import length_dependent_rotary_modules, pinned_rope_length


def encode_context(
    model: nn.Module,
    context_ids: Tensor,
    group: ContextGroup,
    star: StarSettings,
    *,
    extra_capacity: int,
    kernels: KernelChoice | None = None,
    prompt_length: int | None = None,
    query_ids: Tensor | None = None,
    key: ContextKey | None = None,
) -> EncodedContext:
    """Phase 1 of any method, timed: the context's KV, ready for queries (``extra_capacity`` positions of room for
    the query and generated tokens on the query host).

    ``prompt_length`` (context + query; None: the context's length): a rope whose scaling regime depends on the
    sequence length (``dynamic``, ``longrope``) rotates every context token for it, as dense's one forward over the
    prompt does (:mod:`star_lightning.rope`). ``query_ids``: the request's query, which ``star.anchor_query`` puts in
    the anchor prefix (required then). ``key``: the request's :func:`context_key`, where the caller made it.

    ``star.simulated_hosts`` H != 1 (0: one host per block): the H hosts' Phase 1 in turn (:func:`play_hosts`),
    their stores joined in host order into this process's one store; Phase 2 over it is exactly the merge over H
    hosts' partials (``phase1_s``: the slowest host).
    """
    star = star.with_hosts(group.size, star.tensor_parallel_size, star.gpus_per_host)
    if star.attention == "star" and star.anchor_query and query_ids is None:
        raise ValueError("anchor_query puts the request's query in the anchor: encode_context needs query_ids")
    kernels = KernelChoice(backend=star.backend) if kernels is None else kernels
    prompt_length = context_ids.shape[1] if prompt_length is None else prompt_length
    if key is None:
        key = context_key(model, context_ids, context_ids[:, :0] if query_ids is None else query_ids, star, group)
    with pinned_rope_length(model, prompt_length):
        if star.attention == "star" and star.simulated_hosts != 1:
            return _encode_played(model, context_ids, star, extra_capacity, kernels, query_ids, key)
        return encode_on_host(model, context_ids, group, star, extra_capacity, kernels, query_ids, key)


def encode_on_host(
    model: nn.Module,
    context_ids: Tensor,
    group: ContextGroup,
    star: StarSettings,
    extra_capacity: int,
    kernels: KernelChoice,
    query_ids: Tensor | None,
    key: ContextKey | None = None,
    *,
    pooled: bool = True,
) -> EncodedContext:
    """This host's Phase 1 share, timed (a length-dependent rope already pinned by the caller). ``pooled``: the store
    takes the engine's pooled buffers (:class:`~star_lightning.cache.StorePool`); played hosts' stores, alive together
    and of other sizes, do not."""
    devices, context_length = model_devices(model), context_ids.shape[1]
    key = key if key is not None else context_key(model, context_ids, context_ids[:, :0], star, group)
    t0 = time.perf_counter()
    if star.attention == "dense" and not uses_star_attention(model):  # transformers' own attention and cache
        cache = DynamicCache(config=model_config(model))
        with sdpa_priority(kernels, context_ids.device, context_length):
            dense_forward(model, context_ids, position_ids(0, context_length, context_ids.device), cache)
        synchronize(devices)
        return EncodedContext(key, context_length, context_length, cache=cache, phase1_s=time.perf_counter() - t0)
    local, sent, pool = context_length, 0, kernels.stores if pooled else None
    if star.attention == "dense":
        store = KVStore(num_layers(model), context_length + extra_capacity, pool)
        prefill_dense(model, context_ids, store, kernels=kernels)
    elif star.attention == "ring":
        ring = plan_ring(context_length, group.size, star.ring_layout)
        local = ring.local_context_length(group.rank)
        store = KVStore(num_layers(model), local + extra_capacity, pool)
        sent = prefill_ring(model, context_ids, ring, group, store, kernels=kernels)
    else:
        plan = plan_blocks(context_length, star.block_size, group.size, star.anchor_block_size, star.use_anchor)
        local = plan.local_context_length(group.rank)
        store = KVStore(num_layers(model), local + extra_capacity, pool)
        sent = prefill_star(
            model, context_ids, plan, group, store, anchor_source=star.anchor_source, kernels=kernels,
            query_ids=query_ids if star.anchor_query else None, query_positions=star.anchor_query_positions,
            passing=star.passing if star.passing_tokens else None, lookback=star.lookback_tokens,
            graphs=resolve_prefill_mode(star, devices, bool(length_dependent_rotary_modules(model))) == "graph",
        )  # fmt: skip
    synchronize(devices)
    return EncodedContext(key, context_length, local, store=store, phase1_s=time.perf_counter() - t0, phase1_bytes=sent)


@dataclass
class PlayedHost:
    """One played host's Phase 1: its group (host ``host`` of the played layout) and its encoded share."""

    host: int
    group: SimulatedHostGroup
    context: EncodedContext
    board: AnchorBoard


def play_hosts(
    model: nn.Module,
    context_ids: Tensor,
    hosts: int,
    star: StarSettings,
    kernels: KernelChoice,
    query_ids: Tensor | None,
    *,
    extra_capacity: Callable[[int], int] = lambda host: 0,
    run_hosts: list[int] | None = None,
    before_host: Callable[[int], None] | None = None,
) -> Iterator[PlayedHost]:
    """The Phase 1 of ``hosts`` hosts, in host order, each through :func:`encode_on_host` with a group that plays it.

    ``run_hosts`` limits the hosts run (for layouts whose hosts do the same work, as the zigzag ring); host 0 (it
    sends the anchor) and the query host (it answers) always run. ``before_host`` is told each host before it runs
    (e.g. to reset a peak-memory counter). The caller pins a length-dependent rope (:mod:`star_lightning.rope`)."""
    chosen = sorted({0, hosts - 1, *(run_hosts if run_hosts is not None else range(hosts))})
    board = AnchorBoard()
    try:
        for host in chosen:
            if before_host is not None:
                before_host(host)
            group = SimulatedHostGroup(host, hosts, board)
            share = encode_on_host(
                model, context_ids, group, star, extra_capacity(host), kernels, query_ids, pooled=False
            )
            yield PlayedHost(host, group, share, board)
            del share  # a played host's share is the caller's to keep or free before the next host runs
    finally:
        board.clear()


def _encode_played(
    model: nn.Module,
    context_ids: Tensor,
    star: StarSettings,
    extra_capacity: int,
    kernels: KernelChoice,
    query_ids: Tensor | None,
    key: ContextKey,
) -> EncodedContext:
    """``--model.simulate_hosts``: every host's Phase 1 in turn, their stores joined in host order into one."""
    context_length, layers = context_ids.shape[1], num_layers(model)
    hosts = star.simulated_hosts or -(-context_length // star.block_size)  # 0: one host per block
    shares = [one.context for one in play_hosts(model, context_ids, hosts, star, kernels, query_ids)]
    store = KVStore(layers, context_length + extra_capacity, kernels.stores)
    for layer in range(layers):
        for share in shares:
            assert share.store is not None
            keys, values = share.store.view(layer)
            store.append(layer, keys, values, share.store.positions(layer))
    phase1_s, sent = max(share.phase1_s for share in shares), sum(share.phase1_bytes for share in shares)
    return EncodedContext(key, context_length, context_length, store=store, phase1_s=phase1_s, phase1_bytes=sent)
