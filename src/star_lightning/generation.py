"""Running one request: Phase 1 (``prefill_*``), Phase 2 query encoding and decoding, and the token loop.

Each phase is a small function, so it can be timed, profiled and compiled on its own. All hosts of a
context-parallel group run the same calls in the same order; they differ only in the blocks they own and in
whether they store the new tokens (the query host) -- the cache and the attention step encode that.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn
from torch.profiler import record_function
from transformers import DynamicCache, PretrainedConfig

from star_lightning.attention.star import AttentionStep
from star_lightning.cache import StarKVCache
from star_lightning.parallel.group import ContextGroup, is_query_host
from star_lightning.partition import BlockPlan, plan_blocks, split_evenly
from star_lightning.sampling import SamplingConfig, choose_token

# Names of the phases in PyTorch profiler traces (``--trainer.profiler pytorch``).
PHASE1, PHASE2_QUERY, PHASE2_DECODE = "star_lightning/phase1", "star_lightning/phase2_query", "star_lightning/decode"

AttentionMethod = Literal["star", "ring", "dense"]
DecodeMode = Literal["auto", "eager", "static", "graph"]


@dataclass(frozen=True)
class StarSettings:
    """How the context is encoded. ``dense`` is plain transformers attention in one process."""

    attention: AttentionMethod = "star"
    block_size: int = 4096
    anchor_block_size: int | None = None
    use_anchor: bool = True
    reuse_anchor: bool = True
    backend: str = "auto"
    decode: DecodeMode = "auto"
    """Phase 2 decoding of star/ring: ``eager`` (one forward per token over the growing cache), ``static`` (static
    shapes: the preallocated cache with a device-side valid length), ``graph`` (``static`` captured once as a CUDA
    graph and replayed per token: no Python or launch overhead); ``auto`` is ``graph`` on CUDA, ``eager`` else."""


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 32
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    eos_token_ids: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise ValueError(
                f"max_new_tokens must be positive, got {self.max_new_tokens}; set --model.max_new_tokens N"
            )


@dataclass
class RequestStats:
    """Per-request figures for the profiler and the benchmarks (seconds, tokens, bytes)."""

    context_tokens: int = 0
    local_context_tokens: int = 0
    query_tokens: int = 0
    new_tokens: int = 0
    phase1_s: float = 0.0
    query_s: float = 0.0
    decode_s: float = 0.0
    decode_setup_s: float = 0.0
    decode_mode: str = "eager"
    phase2_bytes: int = 0
    peak_mem_bytes: int = 0

    @property
    def ttft_s(self) -> float:
        """Time to first token: the whole context and query encoding, i.e. until the first token is chosen."""
        return self.phase1_s + self.query_s

    @property
    def decode_ms_per_token(self) -> float:
        steps = max(0, self.new_tokens - 1)
        return 1000.0 * self.decode_s / steps if steps else 0.0

    @property
    def total_s(self) -> float:
        return self.phase1_s + self.query_s + self.decode_setup_s + self.decode_s


@dataclass
class GenerationResult:
    token_ids: list[int]
    stats: RequestStats


StopCheck = Callable[[list[int]], bool]
PhaseListener = Callable[[str], None]


@contextmanager
def _phase(name: str, on_phase: PhaseListener | None) -> Iterator[None]:
    """A named range in profiler traces, announced to ``on_phase``."""
    if on_phase is not None:
        on_phase(name)
    with record_function(name):
        yield


def model_devices(model: nn.Module) -> list[torch.device]:
    """The devices holding the model's weights: one, or the GPUs of a host the layers are spread over."""
    return sorted({param.device for param in model.parameters()}, key=str)


def _synchronize(devices: list[torch.device]) -> None:
    for device in devices:
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def _forward(
    model: nn.Module, ids: Tensor, positions: Tensor, cache: object, step: AttentionStep | None = None
) -> Tensor:
    """One forward; returns the last position's logits ``[V]``."""
    kwargs = {} if step is None else {"star_step": step}
    output = model(
        input_ids=ids,  # [1, L]
        position_ids=positions,  # [1, L]
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
        **kwargs,
    )
    return output.logits[0, -1]  # [V]


def _positions(start: int, stop: int, device: torch.device) -> Tensor:
    return torch.arange(start, stop, device=device).unsqueeze(0)  # [1, L]


def _config(model: nn.Module) -> PretrainedConfig:
    config = getattr(model, "config", None)
    if not isinstance(config, PretrainedConfig):
        raise TypeError(f"{type(model).__name__} is not a transformers model (it has no PretrainedConfig)")
    return config


def _num_layers(model: nn.Module) -> int:
    return int(_config(model).get_text_config().num_hidden_layers)


def prefill_star(
    model: nn.Module,
    context_ids: Tensor,
    plan: BlockPlan,
    group: ContextGroup,
    *,
    extra_capacity: int,
    reuse_anchor: bool = True,
    backend: str = "auto",
) -> StarKVCache:
    """Phase 1 on this host: encode its blocks, each after the anchor, with no communication.

    The anchor's KV is computed once and reused as a prefix cache for every block (exact under causal
    attention); ``reuse_anchor=False`` recomputes ``(anchor, block)`` per block as the reference implementation.
    """
    device = context_ids.device
    host = group.rank
    blocks = plan.blocks_of(host)
    capacity = plan.local_context_length(host) + extra_capacity
    cache = StarKVCache(_num_layers(model), capacity)
    step = AttentionStep(kind="local", causal=True, backend=backend, last_position=plan.context_length - 1)
    anchor = plan.anchor_length
    remaining = list(blocks)
    if remaining and remaining[0].index == 0:
        first = remaining.pop(0)
        cache.set_mode("block")
        _forward(
            model, context_ids[:, first.start : first.end], _positions(first.start, first.end, device), cache, step
        )
        if anchor and reuse_anchor:
            cache.use_context_prefix_as_anchor(anchor)
    elif anchor and reuse_anchor and remaining:
        cache.set_mode("anchor")
        _forward(model, context_ids[:, :anchor], _positions(0, anchor, device), cache, step)
    for block in remaining:
        block_ids = context_ids[:, block.start : block.end]  # [1, l]
        block_positions = _positions(block.start, block.end, device)
        if anchor and not reuse_anchor:
            cache.set_mode("block_recompute", recompute_anchor_length=anchor)
            ids = torch.cat([context_ids[:, :anchor], block_ids], dim=1)  # [1, a + l]
            positions = torch.cat([_positions(0, anchor, device), block_positions], dim=1)  # [1, a + l]
            _forward(model, ids, positions, cache, step)
        else:
            cache.set_mode("block")
            _forward(model, block_ids, block_positions, cache, step)
    cache.drop_anchor()
    return cache


def prefill_ring(
    model: nn.Module, context_ids: Tensor, group: ContextGroup, *, extra_capacity: int, backend: str = "auto"
) -> StarKVCache:
    """Phase 1 of the exact baseline: the context in ``size`` contiguous chunks, global causal ring attention."""
    total = context_ids.shape[1]
    if total < group.size:
        raise ValueError(f"ring attention needs at least one context token per host ({group.size}), got {total}")
    spans = split_evenly(total, group.size)
    start, stop = spans[group.rank]
    lengths = tuple(b - a for a, b in spans)
    cache = StarKVCache(_num_layers(model), (stop - start) + extra_capacity)
    cache.set_mode("block")
    step = AttentionStep(kind="ring", group=group, backend=backend, last_position=total - 1, ring_lengths=lengths)
    _forward(model, context_ids[:, start:stop], _positions(start, stop, context_ids.device), cache, step)
    return cache


def encode_query(
    model: nn.Module, cache: StarKVCache, query_ids: Tensor, start: int, group: ContextGroup, backend: str = "auto"
) -> Tensor:
    """Phase 2 for the query tokens: every host attends with them to its local KV; the partials are merged."""
    cache.set_mode("query", store_new_tokens=is_query_host(group))
    stop = start + query_ids.shape[1]
    step = AttentionStep(
        kind="distributed", causal=is_query_host(group), group=group, backend=backend, last_position=stop - 1
    )
    return _forward(model, query_ids, _positions(start, stop, query_ids.device), cache, step)


def decode_step(
    model: nn.Module, cache: StarKVCache, token: Tensor, position: int, group: ContextGroup, backend: str = "auto"
) -> Tensor:
    """Phase 2 for one generated token (``token`` ``[1, 1]``), the same on every host."""
    step = AttentionStep(
        kind="distributed", causal=is_query_host(group), group=group, backend=backend, last_position=position
    )
    return _forward(model, token, _positions(position, position + 1, token.device), cache, step)


def resolve_decode_mode(mode: str, devices: list[torch.device]) -> str:
    """``auto``: a CUDA graph on one GPU; eager on CPU and on a model spread over several GPUs."""
    if mode not in ("auto", "eager", "static", "graph"):
        raise ValueError(f"unknown decode mode {mode!r}; choose auto, eager, static or graph")
    on_one_gpu = len(devices) == 1 and devices[0].type == "cuda"
    if mode == "auto":
        return "graph" if on_one_gpu else "eager"
    if mode == "graph" and devices[0].type != "cuda":
        raise ValueError("decode mode 'graph' needs CUDA (CUDA graphs); use 'static' or 'eager' on this device")
    if mode in ("static", "graph") and len(devices) > 1:
        raise ValueError(
            f"decode mode {mode!r} needs the model on one device, but it is spread over {len(devices)} GPUs "
            "(gpus_per_host > 1); use --model.decode eager or auto"
        )
    return mode


class StaticDecoder:
    """Phase 2 decoding with static shapes: every step is the same kernels on the same buffers.

    The token, its position, the cache slot and the valid length live in device tensors that are set before each
    step, so the step can be captured once as a CUDA graph (collectives included) and replayed per token. The
    capture's warm-up runs the first real step (its cache write is idempotent: same token, same slot).
    """

    def __init__(
        self, model: nn.Module, cache: StarKVCache, group: ContextGroup, backend: str, last_position: int, graph: bool
    ) -> None:
        self.model, self.cache, self.group, self.use_graph = model, cache, group, graph
        device = cache.star_layers[0].buffers()[0].device
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=device)  # [1, 1]
        self.positions = torch.zeros(1, 1, dtype=torch.long, device=device)  # [1, 1]
        self.step = AttentionStep(
            kind="distributed",
            causal=is_query_host(group),
            group=group,
            backend=backend,
            last_position=last_position,
        )
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None
        self.bytes_per_step = 0
        self.replays = 0
        self.setup_s = 0.0
        cache.begin_static_decode(store_new_tokens=is_query_host(group))

    def _run(self) -> Tensor:
        return _forward(self.model, self.ids, self.positions, self.cache, self.step)

    def _capture(self) -> None:
        t0 = time.perf_counter()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._run()  # warm-up: lazy initialisation and kernel compilation stay out of the graph
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        bytes_before = self.group.bytes_moved
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.logits = self._run()
        self.bytes_per_step = self.group.bytes_moved - bytes_before
        self.graph = graph
        torch.cuda.synchronize()
        self.setup_s = time.perf_counter() - t0

    def __call__(self, token: int, position: int) -> Tensor:
        self.ids.fill_(token)
        self.positions.fill_(position)
        self.cache.prepare_static_step()
        if not self.use_graph:
            logits = self._run()
        else:
            if self.graph is None:
                self._capture()
            assert self.graph is not None and self.logits is not None
            self.graph.replay()
            self.replays += 1
            logits = self.logits
        self.cache.finish_static_step()
        return logits

    def close(self) -> None:
        self.graph = None
        self.logits = None
        self.cache.end_static_decode()


def sample_loop(
    first_logits: Tensor,
    next_logits: Callable[[int, int], Tensor],
    group: ContextGroup,
    settings: GenerationSettings,
    stop_check: StopCheck | None = None,
) -> list[int]:
    """The query host picks each token and broadcasts it (with a stop flag): hosts never choose independently."""
    generator = settings.sampling.generator(first_logits.device)
    tokens: list[int] = []
    logits = first_logits
    for i in range(settings.max_new_tokens):
        packet = torch.zeros(2, dtype=torch.long, device=first_logits.device)  # [token, finished]
        if is_query_host(group):
            token = choose_token(logits, settings.sampling, generator)
            finished = token in settings.eos_token_ids or i + 1 == settings.max_new_tokens
            finished = finished or (stop_check is not None and stop_check([*tokens, token]))
            packet[0], packet[1] = token, int(finished)
        packet = group.broadcast_from_query_host(packet)
        token, finished = int(packet[0].item()), bool(packet[1].item())
        if token not in settings.eos_token_ids:
            tokens.append(token)
        if finished:
            break
        logits = next_logits(token, i)
    return tokens


def _reset_peak_memory(devices: list[torch.device]) -> None:
    for device in devices:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_bytes(devices: list[torch.device]) -> int:
    """The host's peak: allocated memory summed over its GPUs, or the process's resident set on CPU."""
    if devices[0].type == "cuda":
        return sum(int(torch.cuda.max_memory_allocated(device)) for device in devices)
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def generate_star(
    model: nn.Module,
    context_ids: Tensor,
    query_ids: Tensor,
    group: ContextGroup,
    star: StarSettings,
    settings: GenerationSettings,
    stop_check: StopCheck | None = None,
    on_phase: PhaseListener | None = None,
) -> GenerationResult:
    """One request with Star Attention (or the ring baseline) over the hosts of ``group``."""
    device = context_ids.device
    devices = model_devices(model)
    context_length, query_length = context_ids.shape[1], query_ids.shape[1]
    if query_length == 0:
        raise ValueError("the query is empty: every request needs a non-empty 'input_query'")
    mode = resolve_decode_mode(star.decode, devices)
    _reset_peak_memory(devices)
    extra = query_length + settings.max_new_tokens if is_query_host(group) else 0
    stats = RequestStats(context_tokens=context_length, query_tokens=query_length)
    bytes_before = group.bytes_moved
    t0 = time.perf_counter()
    with _phase(PHASE1, on_phase):
        if star.attention == "ring":
            cache = prefill_ring(model, context_ids, group, extra_capacity=extra, backend=star.backend)
        else:
            plan = plan_blocks(context_length, star.block_size, group.size, star.anchor_block_size, star.use_anchor)
            cache = prefill_star(
                model,
                context_ids,
                plan,
                group,
                extra_capacity=extra,
                reuse_anchor=star.reuse_anchor,
                backend=star.backend,
            )
        _synchronize(devices)
    stats.local_context_tokens = cache.context_length()
    t1 = time.perf_counter()
    with _phase(PHASE2_QUERY, on_phase):
        first_logits = encode_query(model, cache, query_ids, context_length, group, star.backend)
        _synchronize(devices)
    t2 = time.perf_counter()
    start = context_length + query_length
    decoder = None
    if mode != "eager" and settings.max_new_tokens > 1:
        last = start + settings.max_new_tokens - 1
        decoder = StaticDecoder(model, cache, group, star.backend, last, graph=mode == "graph")

    def next_logits(token: int, i: int) -> Tensor:
        if decoder is not None:
            return decoder(token, start + i)
        token_ids = torch.tensor([[token]], device=device)  # [1, 1]
        return decode_step(model, cache, token_ids, start + i, group, star.backend)

    try:
        with _phase(PHASE2_DECODE, on_phase):
            tokens = sample_loop(first_logits, next_logits, group, settings, stop_check)
            _synchronize(devices)
    finally:
        if decoder is not None:
            decoder.close()
    t3 = time.perf_counter()
    stats.phase1_s, stats.query_s = t1 - t0, t2 - t1
    stats.decode_mode = mode
    stats.decode_setup_s = decoder.setup_s if decoder is not None else 0.0
    stats.decode_s = t3 - t2 - stats.decode_setup_s
    stats.new_tokens = len(tokens)
    # The capture pass counted one step's bytes without moving them; every replay moves them.
    replayed = decoder.bytes_per_step * (decoder.replays - 1) if decoder is not None and decoder.replays else 0
    stats.phase2_bytes = group.bytes_moved - bytes_before + replayed
    stats.peak_mem_bytes = _peak_memory_bytes(devices)
    return GenerationResult(tokens, stats)


def generate_dense(
    model: nn.Module,
    context_ids: Tensor,
    query_ids: Tensor,
    group: ContextGroup,
    settings: GenerationSettings,
    stop_check: StopCheck | None = None,
    on_phase: PhaseListener | None = None,
) -> GenerationResult:
    """The global-attention reference: the model's own attention over context + query in one process."""
    if group.size != 1:
        raise ValueError(
            f"dense attention runs each request in one process, but the context-parallel group has {group.size} "
            "hosts; set --trainer.strategy.context_parallel_size 1 (the devices then split the requests) or use "
            "--model.attention star/ring"
        )
    device = context_ids.device
    devices = model_devices(model)
    _reset_peak_memory(devices)
    context_length, query_length = context_ids.shape[1], query_ids.shape[1]
    stats = RequestStats(context_tokens=context_length, local_context_tokens=context_length, query_tokens=query_length)
    cache = DynamicCache(config=_config(model))
    t0 = time.perf_counter()
    with _phase(PHASE1, on_phase):
        _forward(model, context_ids, _positions(0, context_length, device), cache)
        _synchronize(devices)
    t1 = time.perf_counter()
    start = context_length + query_length
    with _phase(PHASE2_QUERY, on_phase):
        first_logits = _forward(model, query_ids, _positions(context_length, start, device), cache)
        _synchronize(devices)
    t2 = time.perf_counter()

    def next_logits(token: int, i: int) -> Tensor:
        token_ids = torch.tensor([[token]], device=device)  # [1, 1]
        return _forward(model, token_ids, _positions(start + i, start + i + 1, device), cache)

    with _phase(PHASE2_DECODE, on_phase):
        tokens = sample_loop(first_logits, next_logits, group, settings, stop_check)
        _synchronize(devices)
    t3 = time.perf_counter()
    stats.phase1_s, stats.query_s, stats.decode_s = t1 - t0, t2 - t1, t3 - t2
    stats.new_tokens = len(tokens)
    stats.peak_mem_bytes = _peak_memory_bytes(devices)
    return GenerationResult(tokens, stats)


def generate(
    model: nn.Module,
    context_ids: Tensor,
    query_ids: Tensor,
    group: ContextGroup,
    star: StarSettings,
    settings: GenerationSettings,
    stop_check: StopCheck | None = None,
    on_phase: PhaseListener | None = None,
) -> GenerationResult:
    """Dispatch on the attention method; ``context_ids`` and ``query_ids`` are ``[1, L]`` on the model's device.

    ``on_phase`` is told the name of each phase as it starts (a progress display).
    """
    if star.attention == "dense":
        return generate_dense(model, context_ids, query_ids, group, settings, stop_check, on_phase)
    return generate_star(model, context_ids, query_ids, group, star, settings, stop_check, on_phase)
