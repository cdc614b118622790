"""Phase 2: the query over every host's KV (:func:`encode_query`), one generated token (:func:`decode_step`), the
decode mode, and the token loop (:func:`sample_loop`: the query host chooses, every host follows).

Over an encoded context (:func:`query_logits`, :func:`static_decoder_for`, :func:`store_step`, :func:`cache_step`):
the query and the next-token step the request loop calls; where the decode step is captured
(:class:`~star_lightning.engine.static_decoder.StaticDecoder`), the query forward is too
(:class:`~star_lightning.engine.static_query.StaticQuery`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from star_lightning.attention.kernels import KernelChoice
from star_lightning.attention.step import ForwardStep
from star_lightning.cache import KVStore
from star_lightning.engine.context import EncodedContext
from star_lightning.engine.forward import dense_forward, forward, position_ids
from star_lightning.engine.settings import DECODE_MODES, GenerationSettings
from star_lightning.engine.static_decoder import StaticDecoder
from star_lightning.engine.static_query import StaticQuery, padded_rows
from star_lightning.parallel.group import ContextGroup, is_query_host
from star_lightning.sampling import choose_token

StopCheck = Callable[[list[int]], bool]


def encode_query(
    model: nn.Module,
    store: KVStore,
    query_ids: Tensor,
    start: int,
    group: ContextGroup,
    kernels: KernelChoice | None = None,
) -> Tensor:
    """Phase 2 for the query tokens: every host attends with them to its local KV; the partials are merged."""
    stop = start + query_ids.shape[1]
    step = ForwardStep(
        phase="query",
        group=group,
        kernels=KernelChoice() if kernels is None else kernels,
        store=store,
        keep_new=is_query_host(group),
        last_position=stop - 1,
    )
    return forward(model, query_ids, position_ids(start, stop, query_ids.device), step, start=start)


def decode_step(
    model: nn.Module,
    store: KVStore,
    token: Tensor,
    position: int,
    group: ContextGroup,
    kernels: KernelChoice | None = None,
) -> Tensor:
    """Phase 2 for one generated token (``token`` ``[1, 1]``), the same on every host."""
    return encode_query(model, store, token, position, group, kernels)


def resolve_decode_mode(mode: str, devices: list[torch.device], length_dependent_rope: bool = False) -> str:
    """``auto``: a compiled CUDA graph on one GPU; eager on CPU, on a model spread over several GPUs, and for a rope
    whose frequencies follow the sequence length (transformers recomputes them behind host-side branches, which a
    CUDA graph cannot capture)."""
    if mode not in DECODE_MODES:
        raise ValueError(f"unknown decode mode {mode!r}; choose {', '.join(DECODE_MODES)}")
    on_one_gpu = len(devices) == 1 and devices[0].type == "cuda"
    if mode == "auto":
        return "compile" if on_one_gpu and not length_dependent_rope else "eager"
    if mode in ("graph", "compile") and devices[0].type != "cuda":
        raise ValueError(f"decode mode {mode!r} needs CUDA (CUDA graphs); use 'static' or 'eager' on this device")
    if mode in ("graph", "compile") and length_dependent_rope:
        raise ValueError(
            f"decode mode {mode!r} cannot capture this model's rope (dynamic or longrope scaling recomputes its "
            "frequencies every step); use --model.decode auto, static or eager"
        )
    if mode in ("static", "graph", "compile") and len(devices) > 1:
        raise ValueError(
            f"decode mode {mode!r} needs the model on one device, but it is spread over {len(devices)} GPUs "
            "(gpus_per_host > 1); use --model.decode eager or auto"
        )
    return mode


def sample_loop(
    first_logits: Tensor,
    next_logits: Callable[[int, int], Tensor],
    group: ContextGroup,
    settings: GenerationSettings,
    stop_check: StopCheck | None = None,
) -> list[int]:
    """The query host picks each token and broadcasts it (with a stop flag): hosts never choose independently. A
    group of one host has nobody to tell: its choice is not sent through the device (two copies and two syncs a
    token fewer)."""
    generator = settings.sampling.generator(first_logits.device)
    tokens: list[int] = []
    logits = first_logits
    alone = group.size == 1
    for i in range(settings.max_new_tokens):
        if alone:
            token = choose_token(logits, settings.sampling, generator)
            finished = _finished(token, tokens, i, settings, stop_check)
        else:
            packet = torch.zeros(2, dtype=torch.long, device=first_logits.device)  # [token, finished]
            if is_query_host(group):
                token = choose_token(logits, settings.sampling, generator)
                packet[0], packet[1] = token, int(_finished(token, tokens, i, settings, stop_check))
            packet = group.broadcast_from_query_host(packet)
            token, finished = int(packet[0].item()), bool(packet[1].item())
        if token not in settings.eos_token_ids:
            tokens.append(token)
        if finished:
            break
        logits = next_logits(token, i)
    return tokens


def _finished(
    token: int, tokens: list[int], i: int, settings: GenerationSettings, stop_check: StopCheck | None
) -> bool:
    if token in settings.eos_token_ids or i + 1 == settings.max_new_tokens:
        return True
    return stop_check is not None and stop_check([*tokens, token])


NextLogits = Callable[[int, int], Tensor]
"""The logits after generated token ``i`` (``token``)."""


def query_logits(
    model: nn.Module,
    context: EncodedContext,
    query_ids: Tensor,
    group: ContextGroup,
    settings: GenerationSettings,
    kernels: KernelChoice,
    captured: bool = False,
) -> Tensor:
    """The query over the context: every host's store and the merge (star, ring, dense), or dense's own cache.
    ``captured``: where the decode step is captured, the query forward is too (padded, :mod:`.static_query`)."""
    if context.store is None:
        assert context.cache is not None
        stop = context.context_length + query_ids.shape[1]
        positions = position_ids(context.context_length, stop, query_ids.device)  # [1, q]
        return dense_forward(model, query_ids, positions, context.cache)
    store, query_length = context.store, query_ids.shape[1]
    rows = padded_rows(query_length) if captured else None
    if is_query_host(group):
        store.ensure_capacity(context.local_length + max(query_length + settings.max_new_tokens, rows or 0))
    if rows is None:
        return encode_query(model, store, query_ids, context.context_length, group, kernels)
    last = _last_position(context, store)
    return StaticQuery.over(model, store, group, kernels, rows, last, graph=True)(query_ids, context.context_length)


def _last_position(context: EncodedContext, store: KVStore) -> int:
    """The largest position any token over this store can have: a window check made for it holds for every later
    query a captured step replays for (the store's capacity is fixed while it serves)."""
    return context.context_length + store.capacity - context.local_length - 1


def static_decoder_for(
    model: nn.Module,
    context: EncodedContext,
    group: ContextGroup,
    mode: str,
    settings: GenerationSettings,
    kernels: KernelChoice,
) -> tuple[str, StaticDecoder | None]:
    """The decode mode, and the static step over the context's store (the one kept with its buffers where there is
    one: a kept context's next query, or a request whose store got the pool's buffers)."""
    store = context.store
    assert store is not None
    if mode == "eager" or settings.max_new_tokens <= 1:
        return mode, None
    return mode, StaticDecoder.over(model, store, group, kernels, _last_position(context, store), mode)


def store_step(
    model: nn.Module,
    context: EncodedContext,
    group: ContextGroup,
    kernels: KernelChoice,
    decoder: StaticDecoder | None,
    start: int,
    device: torch.device,
) -> NextLogits:
    store = context.store
    assert store is not None

    def next_logits(token: int, i: int) -> Tensor:
        if decoder is not None:
            return decoder(token, start + i)
        ids = torch.tensor([[token]], device=device)  # [1, 1]
        return decode_step(model, store, ids, start + i, group, kernels)

    return next_logits


def cache_step(model: nn.Module, context: EncodedContext, start: int, device: torch.device) -> NextLogits:
    cache = context.cache
    assert cache is not None

    def next_logits(token: int, i: int) -> Tensor:
        ids = torch.tensor([[token]], device=device)  # [1, 1]
        return dense_forward(model, ids, position_ids(start + i, start + i + 1, device), cache)

    return next_logits
