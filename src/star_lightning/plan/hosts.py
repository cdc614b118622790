"""The per-host plan of one request under a layout: what each host holds, computes and sends, and how long it takes.

Facts of the engine this follows (one context-parallel group of ``hosts`` hosts serves one request):

- Every host holds a full copy of the weights. ``tensor_parallel_size`` T > 1 splits the weights, the attention heads
  (so the KV) and the MLP width over T GPUs of the host; ``gpus_per_host`` G > 1 splits the layers over G GPUs run
  one after the other (the memory of G, the speed of one). Memory figures are per GPU (the host's fullest one).
- Star Phase 1 (:func:`star_lightning.partition.plan_blocks`): the host owning block 0 encodes it plainly; every other
  block is attended after the anchor prefix (``anchor_length`` tokens). ``anchor_source``: ``host`` -- a host without
  block 0 runs the anchor's forward once and keeps its K/V through Phase 1; ``broadcast`` -- host 0 sends each layer's
  anchor K/V (keeping the sent messages until Phase 1 ends), the others receive it into buffers of the same size and
  run no anchor forward; ``block`` -- every other block is one forward of ``anchor + block`` tokens (the reference
  implementation's way), no anchor K/V is kept. The anchor's K/V is freed before Phase 2.
- Ring Phase 1: ``contiguous`` = ``hosts`` chunks, host h holds chunk h; ``zigzag`` = ``2 x hosts`` chunks, host h
  holds chunks h and ``2H-1-h``. Each host runs one forward over its chunks; per layer it also holds the K/V message
  it sends and the one it receives (:data:`~star_lightning.plan.costs.RING_MESSAGES` x its own chunk K/V). The first
  hop of every layer waits for its transfer; later hops overlap it with the attention to the previous hop's K/V.
- Dense: one host, one forward over the whole context, transformers' growing cache.
- The query host (the last) also stores the query and generated tokens' K/V; its store is allocated up front for
  ``local context + query + max_new_tokens``. Phase 2 merges every host's partial at every layer (one collective
  per layer per token when hosts > 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from star_lightning.engine.settings import AnchorSource, Attention, RingLayout, StarSettings
from star_lightning.errors import ConfigurationError
from star_lightning.partition import SELECTION_WINDOW, plan_blocks, plan_ring, split_evenly
from star_lightning.plan import costs
from star_lightning.plan.costs import GIB
from star_lightning.plan.hardware import GpuSpec, Interconnect
from star_lightning.plan.shape import ModelShape


@dataclass(frozen=True)
class Layout:
    """How one request is spread: the attention method, its settings and the hosts of one context-parallel group."""

    method: Attention = "star"
    hosts: int = 1
    block_size: int = 4096
    anchor_block_size: int | None = None
    use_anchor: bool = True
    anchor_source: AnchorSource = "broadcast"
    ring_layout: RingLayout = "zigzag"
    tensor_parallel_size: int = 1
    gpus_per_host: int = 1
    anchor_query: bool = False
    """Star: the query follows the anchor in every block's prefix (``--model.anchor_query``)."""
    passing_tokens: int = 0
    """Star: tokens each host passes per layer to the hosts after it (``--model.passing_tokens``)."""
    lookback_tokens: int = 0
    """Star: context tokens before a non-first block that its forward recomputes (``--model.lookback_tokens``)."""

    @property
    def gpus_per_request(self) -> int:
        return self.hosts * self.tensor_parallel_size * self.gpus_per_host

    @classmethod
    def from_settings(cls, settings: StarSettings) -> Layout:
        """The layout of a request's settings (the one way ``predict``, ``plan`` and the benchmarks build it)."""
        return cls(
            method=settings.attention, hosts=settings.hosts, block_size=settings.block_size,
            anchor_block_size=settings.anchor_block_size, use_anchor=settings.use_anchor,
            anchor_source=settings.anchor_source, ring_layout=settings.ring_layout,
            tensor_parallel_size=settings.tensor_parallel_size, gpus_per_host=settings.gpus_per_host,
            anchor_query=settings.anchor_query, passing_tokens=settings.passing_tokens,
            lookback_tokens=settings.lookback_tokens,
        )  # fmt: skip

    def settings(self) -> StarSettings:
        """The request settings this layout plans (validated: the checks ``predict`` makes, with its messages)."""
        return StarSettings(
            attention=self.method, block_size=self.block_size, anchor_block_size=self.anchor_block_size,
            use_anchor=self.use_anchor, anchor_source=self.anchor_source, ring_layout=self.ring_layout,
            anchor_query=self.anchor_query, passing_tokens=self.passing_tokens,
            lookback_tokens=self.lookback_tokens, hosts=self.hosts,
            tensor_parallel_size=self.tensor_parallel_size, gpus_per_host=self.gpus_per_host,
        )  # fmt: skip


@dataclass(frozen=True)
class Request:
    """The request the plan is for: its context (Phase 1), its query and the tokens it may generate."""

    context_tokens: int
    query_tokens: int = 128
    max_new_tokens: int = 32


@dataclass(frozen=True)
class Efficiency:
    """What fraction of the rates the engine reaches, and its fixed costs per token (see :mod:`.costs`)."""

    phase1: float = costs.PHASE1_EFFICIENCY
    decode: float = costs.DECODE_EFFICIENCY
    decode_overhead_s_per_layer: float = costs.DECODE_OVERHEAD_S_PER_LAYER
    eager_decode_overhead_s_per_layer: float = costs.EAGER_DECODE_OVERHEAD_S_PER_LAYER
    query_overhead_s: float = costs.QUERY_OVERHEAD_S

    def __post_init__(self) -> None:
        for name in ("phase1", "decode"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ConfigurationError(
                    f"{name} efficiency must be a fraction of the rate in (0, 1], got {value}; set --{name}_efficiency"
                )


@dataclass(frozen=True)
class Forward:
    """One Phase 1 forward a host runs: ``tokens`` new tokens seeing ``pairs`` (query, key) pairs; ``merged``: a
    partial over keys outside the forward (the anchor, ring hops) is merged into its attention output."""

    tokens: int
    pairs: int
    merged: bool = False

    @classmethod
    def causal(cls, tokens: int, prefix: int = 0, merged: bool = False) -> Forward:
        """``tokens`` causal among themselves after ``prefix`` fully visible keys."""
        return cls(tokens, costs.causal_pairs(tokens, prefix), merged)

    def flops(self, shape: ModelShape) -> float:
        return costs.linear_flops(shape, self.tokens) + costs.attention_flops(shape, self.pairs)


@dataclass(frozen=True)
class HostPlan:
    """One host's share. Bytes are per GPU (the host's fullest GPU); FLOPs and bytes sent are the host's."""

    host: int
    blocks: tuple[int, ...]
    """Indices of its blocks (star), chunks (ring), or ``(0,)`` (dense)."""
    context_tokens: int
    anchor_tokens: int
    """Anchor tokens whose K/V it holds during Phase 1 (computed, received or being sent)."""
    stored_new_tokens: int
    """Query + generated tokens it stores (the query host)."""
    kv_context_bytes: int
    kv_anchor_bytes: int
    kv_query_bytes: int
    weight_bytes: int
    activation_bytes: int
    """Activations at the host's peak (the largest of its Phase 1 forwards, or Phase 2's)."""
    peak_bytes: int
    """Weights + the KV alive at the peak + activations at the peak, on its fullest GPU."""
    host_peak_bytes: int
    """The peak summed over all of the host's GPUs."""
    host_kv_bytes: int
    """The host's KV (context + anchor + query and generated tokens) summed over all of its GPUs."""
    peak_phase: str
    phase1_flops: float
    phase1_bytes: int
    """Bytes it sends during Phase 1 (anchor broadcast, ring messages)."""
    phase1_floor_s: float | None
    phase1_s: float | None
    phase1_comm_s: float | None
    """Of ``phase1_s``: communication not hidden behind compute."""
    query_s: float | None
    decode_floor_s: float | None
    decode_s: float | None
    fits: bool

    @property
    def kv_bytes(self) -> int:
        """Context + anchor + query and generated tokens."""
        return self.kv_context_bytes + self.kv_anchor_bytes + self.kv_query_bytes

    @property
    def kv_at_peak_bytes(self) -> int:
        return self.peak_bytes - self.weight_bytes - self.activation_bytes

    def record(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "blocks": list(self.blocks),
            "context_tokens": self.context_tokens,
            "anchor_tokens": self.anchor_tokens,
            "stored_new_tokens": self.stored_new_tokens,
            "kv_bytes": self.kv_bytes,
            "kv_context_bytes": self.kv_context_bytes,
            "kv_anchor_bytes": self.kv_anchor_bytes,
            "kv_query_bytes": self.kv_query_bytes,
            "weight_bytes": self.weight_bytes,
            "activation_bytes": self.activation_bytes,
            "peak_bytes": self.peak_bytes,
            "peak_gib": self.peak_bytes / GIB,
            "host_peak_bytes": self.host_peak_bytes,
            "host_kv_bytes": self.host_kv_bytes,
            "peak_phase": self.peak_phase,
            "phase1_flops": self.phase1_flops,
            "phase1_bytes": self.phase1_bytes,
            "phase1_floor_s": self.phase1_floor_s,
            "phase1_s": self.phase1_s,
            "phase1_comm_s": self.phase1_comm_s,
            "query_s": self.query_s,
            "decode_floor_ms": None if self.decode_floor_s is None else 1e3 * self.decode_floor_s,
            "decode_ms_per_token": None if self.decode_s is None else 1e3 * self.decode_s,
            "fits": self.fits,
        }


@dataclass(frozen=True)
class Plan:
    """Every host's share of one request, whether each fits its GPU, and the predicted times."""

    shape: ModelShape
    layout: Layout
    request: Request
    gpu: GpuSpec
    hosts: tuple[HostPlan, ...]
    anchor_length: int
    reserve_bytes: int
    interconnect: Interconnect = field(default_factory=Interconnect)
    efficiency: Efficiency = field(default_factory=Efficiency)

    @property
    def fits(self) -> bool:
        return all(host.fits for host in self.hosts)

    @property
    def fullest(self) -> HostPlan:
        """The host with the largest per-GPU peak (the first of equals)."""
        return max(self.hosts, key=lambda host: (host.peak_bytes, -host.host))

    @property
    def usable_bytes(self) -> int:
        return self.gpu.memory_bytes - self.reserve_bytes

    @property
    def predicted_peak_gib(self) -> float:
        return self.fullest.peak_bytes / GIB

    def _slowest(self, name: str) -> float | None:
        values = [getattr(host, name) for host in self.hosts]
        return None if any(v is None for v in values) else max(values)

    @property
    def phase1_floor_s(self) -> float | None:
        return self._slowest("phase1_floor_s")

    @property
    def predicted_phase1_s(self) -> float | None:
        return self._slowest("phase1_s")

    @property
    def predicted_ttft_s(self) -> float | None:
        """The slowest host's Phase 1, then the query's encoding (every host merges with every other per layer)."""
        phase1, query = self.predicted_phase1_s, self._slowest("query_s")
        return None if phase1 is None or query is None else phase1 + query

    @property
    def decode_floor_ms(self) -> float | None:
        floor = self._slowest("decode_floor_s")
        return None if floor is None else 1e3 * floor

    @property
    def predicted_decode_ms_per_token(self) -> float | None:
        decode = self._slowest("decode_s")
        return None if decode is None else 1e3 * decode

    def record(self) -> dict[str, Any]:
        """The plan as one JSON-ready object (``star-lightning plan --format json``)."""
        shape, layout, request, gpu = self.shape, self.layout, self.request, self.gpu
        return {
            "fits": self.fits,
            "model": {
                "model_type": shape.model_type,
                "params": shape.total_params,
                "dtype": shape.dtype,
                "layers": shape.layers,
                "hidden": shape.hidden,
                "heads": shape.heads,
                "kv_heads": shape.kv_heads,
                "head_dim": shape.head_dim,
                "intermediate": shape.intermediate,
                "vocab": shape.vocab,
                "tied_embeddings": shape.tied_embeddings,
                "kv_bytes_per_token": shape.kv_bytes_per_token,
                "params_exact": shape.exact,
            },
            "layout": {
                "method": layout.method,
                "hosts": layout.hosts,
                "block_size": layout.block_size if layout.method == "star" else None,
                "anchor_block_size": layout.anchor_block_size if layout.method == "star" else None,
                "anchor_length": self.anchor_length,
                "anchor_source": layout.anchor_source if layout.method == "star" else None,
                "ring_layout": layout.ring_layout if layout.method == "ring" else None,
                "tensor_parallel_size": layout.tensor_parallel_size,
                "gpus_per_host": layout.gpus_per_host,
                "gpus_per_request": layout.gpus_per_request,
            },
            "request": {
                "context_tokens": request.context_tokens,
                "query_tokens": request.query_tokens,
                "max_new_tokens": request.max_new_tokens,
            },
            "gpu": {
                "name": gpu.name,
                "memory_bytes": gpu.memory_bytes,
                "usable_bytes": self.usable_bytes,
                "reserve_bytes": self.reserve_bytes,
                "matmul_flops": gpu.matmul_flops,
                "copy_bytes_per_s": gpu.copy_bytes_per_s,
                "source": gpu.source,
            },
            "hosts": [host.record() for host in self.hosts],
            "totals": {
                "gpus_per_request": layout.gpus_per_request,
                "kv_bytes": sum(h.host_kv_bytes for h in self.hosts),
                "peak_bytes": sum(h.host_peak_bytes for h in self.hosts),
                "phase1_flops": sum(h.phase1_flops for h in self.hosts),
                "phase1_bytes": sum(h.phase1_bytes for h in self.hosts),
            },
            "fullest_host": self.fullest.host,
            "predicted_peak_gib": self.predicted_peak_gib,
            "phase1_floor_s": self.phase1_floor_s,
            "predicted_phase1_s": self.predicted_phase1_s,
            "predicted_ttft_s": self.predicted_ttft_s,
            "decode_floor_ms": self.decode_floor_ms,
            "predicted_decode_ms_per_token": self.predicted_decode_ms_per_token,
        }


# ------------------------------------------------------------------------------------------------ who holds what


def ring_spans(context_length: int, hosts: int, layout: RingLayout) -> list[tuple[tuple[int, int], ...]]:
    """Each host's ``[start, end)`` ring chunks in context order: the engine's own plan (``partition.plan_ring``)."""
    plan = plan_ring(context_length, hosts, layout)
    return [plan.spans_of(host) for host in range(hosts)]


@dataclass(frozen=True)
class Assignment:
    """Who encodes what in Phase 1: per host its blocks (star) or chunks (ring), its context tokens, its forwards."""

    blocks: tuple[tuple[int, ...], ...]
    context_tokens: tuple[int, ...]
    forwards: tuple[tuple[Forward, ...], ...]
    anchor_length: int
    ring: tuple[tuple[tuple[int, int], ...], ...] | None
    """Ring: each host's ``[start, end)`` chunks."""
    prefix_query: int = 0
    """Star: query tokens in the anchor prefix."""
    passing_tokens: int = 0
    """Star: tokens each host passes per layer and round (0 with one host)."""
    block_lengths: tuple[tuple[tuple[int, bool], ...], ...] = ()
    """Star: each host's blocks as ``(length, is the first block)``, in round order."""

    @property
    def rounds(self) -> int:
        """Star with passing tokens: the hosts encode their blocks in step, one block per round each."""
        return max((len(blocks) for blocks in self.block_lengths), default=1)


def assign(layout: Layout, context_tokens: int, query_tokens: int = 0) -> Assignment:
    """The Phase 1 work of each host under ``layout`` (star: the blocks :func:`~.partition.plan_blocks` gives).

    ``query_tokens``: with ``anchor_query`` the prefix is the anchor and the query (the first block's forward computes
    the query's rows after the anchor too); with ``passing_tokens`` a block also attends to what the hosts before its
    own passed in its round or earlier; with ``lookback_tokens`` a non-first block's forward starts that many context
    tokens earlier (after the anchor).

    Raises the block plan's own errors (more hosts than blocks, bad block sizes).
    """
    if layout.method == "dense":
        return Assignment(((0,),), (context_tokens,), ((Forward.causal(context_tokens),),), 0, None)
    if layout.method == "ring":
        spans = tuple(ring_spans(context_tokens, layout.hosts, layout.ring_layout))
        parts = 2 * layout.hosts if layout.ring_layout == "zigzag" else layout.hosts
        blocks = tuple((h,) if parts == layout.hosts else (h, parts - 1 - h) for h in range(layout.hosts))
        local = tuple(sum(b - a for a, b in host) for host in spans)
        forwards = tuple(
            (Forward(tokens, sum(costs.span_causal_pairs(a, b) for a, b in host), merged=layout.hosts > 1),)
            for tokens, host in zip(local, spans, strict=True)
        )
        return Assignment(blocks, local, forwards, 0, spans)
    plan = plan_blocks(context_tokens, layout.block_size, layout.hosts, layout.anchor_block_size, layout.use_anchor)
    anchor = plan.anchor_length
    query = query_tokens if (layout.anchor_query and anchor) else 0
    prefix = anchor + query
    passing = layout.passing_tokens if (layout.hosts > 1 and anchor) else 0
    per_host = []
    for host in range(layout.hosts):
        host_forwards: list[Forward] = []
        own = plan.blocks_of(host)
        if own[0].index != 0 and anchor and layout.anchor_source == "host":
            host_forwards.append(Forward.causal(prefix))  # the prefix's forward, once
        for round_index, block in enumerate(own):
            if block.index == 0:  # the anchor is its start; the prefix's query rows ride along, seeing the anchor
                first = Forward.causal(block.length)
                host_forwards.append(Forward(first.tokens + query, first.pairs + costs.causal_pairs(query, anchor)))
                continue
            rows = block.lookback(anchor, layout.lookback_tokens) + block.length
            if anchor and layout.anchor_source == "block":
                forward = Forward.causal(prefix + rows)
            elif anchor:
                forward = Forward.causal(rows, prefix, merged=True)
            else:
                forward = Forward.causal(rows)
            # Tokens the hosts before this one passed in this round or earlier, seen by every row of the block.
            passed = passing * sum(min(round_index + 1, len(plan.blocks_of(earlier))) for earlier in range(host))
            host_forwards.append(
                Forward(forward.tokens, forward.pairs + block.length * passed, forward.merged or passed > 0)
            )
        per_host.append(tuple(host_forwards))
    return Assignment(
        tuple(tuple(b.index for b in plan.blocks_of(h)) for h in range(layout.hosts)),
        tuple(plan.local_context_length(h) for h in range(layout.hosts)),
        tuple(per_host),
        anchor,
        None,
        prefix_query=query,
        passing_tokens=passing,
        block_lengths=tuple(tuple((b.length, b.index == 0) for b in plan.blocks_of(h)) for h in range(layout.hosts)),
    )


def local_context_tokens(layout: Layout, context_tokens: int) -> list[int]:
    """Context tokens each host keeps the K/V of."""
    return list(assign(layout, context_tokens).context_tokens)


def phase1_flops_per_host(shape: ModelShape, layout: Layout, context_tokens: int) -> list[float]:
    """Phase 1 FLOPs of each host (all of its GPUs together), counted the way the engine runs it."""
    return [sum(f.flops(shape) for f in host) for host in assign(layout, context_tokens).forwards]


# ------------------------------------------------------------------------------------------------------- the plan


def validate_layout(shape: ModelShape, layout: Layout) -> None:
    """Settings no plan can be made of, each named with its fix: the request settings' own checks
    (:class:`~star_lightning.engine.settings.StarSettings`), then the model's."""
    layout.settings()
    t, g = layout.tensor_parallel_size, layout.gpus_per_host
    if shape.heads % t or shape.kv_heads % t:
        raise ConfigurationError(
            f"tensor_parallel_size {t} must divide the attention heads ({shape.heads}) and the KV heads "
            f"({shape.kv_heads}); choose one of {[d for d in (1, 2, 4, 8, 16) if not shape.kv_heads % d]}"
        )
    if g > shape.layers:
        raise ConfigurationError(
            f"gpus_per_host {g} is more than the model's {shape.layers} layers; set --trainer.strategy.gpus_per_host "
            f"to at most {shape.layers}"
        )


def _gpu_shares(shape: ModelShape, layout: Layout) -> list[tuple[float, float]]:
    """Per GPU of a host: (weight bytes, fraction of the layers) -- layers split evenly over ``gpus_per_host`` GPUs,
    the embedding on the first, the final norm and an untied output projection on the last; all over T."""
    g, t = layout.gpus_per_host, layout.tensor_parallel_size
    embedding = shape.vocab * shape.hidden
    shares = []
    for index, (first, last) in enumerate(split_evenly(shape.layers, g)):
        params = (last - first) * shape.layer_params
        if index == 0:
            params += embedding
        if index == g - 1:
            params += shape.hidden + (0 if shape.tied_embeddings else embedding)
        shares.append((params * shape.bytes_per_element / t, (last - first) / shape.layers))
    return shares


def plan_request(
    shape: ModelShape,
    layout: Layout,
    request: Request,
    gpu: GpuSpec,
    *,
    interconnect: Interconnect | None = None,
    efficiency: Efficiency | None = None,
    reserve_bytes: int = costs.RUNTIME_RESERVE_BYTES,
) -> Plan:
    """Every host's memory, FLOPs and times for ``request`` under ``layout`` on ``gpu``.

    Raises :class:`~star_lightning.errors.ConfigurationError` for a layout that cannot run at all (more hosts than
    blocks, dense over several hosts, ...), with the validators' own messages.
    """
    interconnect = interconnect or Interconnect()
    efficiency = efficiency or Efficiency()
    validate_layout(shape, layout)
    if request.context_tokens <= 0:
        raise ConfigurationError(f"the context must have at least one token, got {request.context_tokens}")
    if request.query_tokens <= 0 or request.max_new_tokens <= 0:
        raise ConfigurationError(
            f"query_tokens ({request.query_tokens}) and max_new_tokens ({request.max_new_tokens}) must be positive"
        )
    hosts = layout.hosts
    t = layout.tensor_parallel_size
    work = assign(layout, request.context_tokens, request.query_tokens)
    forwards, anchor, local, blocks, ring = (
        work.forwards,
        work.anchor_length,
        work.context_tokens,
        work.blocks,
        work.ring,
    )
    flops = [sum(f.flops(shape) for f in host) for host in forwards]
    new_tokens = request.query_tokens + request.max_new_tokens
    rate = None if gpu.matmul_flops is None else gpu.matmul_flops * t
    bandwidth = None if gpu.copy_bytes_per_s is None else gpu.copy_bytes_per_s * t
    latency = interconnect.collective_latency_s
    eager = layout.gpus_per_host > 1  # dense decodes as star does (one host through the engine)
    overhead = efficiency.eager_decode_overhead_s_per_layer if eager else efficiency.decode_overhead_s_per_layer
    per_token_collectives = shape.layers * latency * ((hosts > 1) + 2 * (t > 1))

    plans = []
    for host in range(hosts):
        query_host = host == hosts - 1
        stored_new = new_tokens if query_host else 0
        anchor_copies = _anchor_copies(layout, anchor, owns_first=blocks[host][0] == 0)
        memory = _host_memory(
            shape, layout, request, local[host], stored_new, anchor_copies * anchor, forwards[host], ring is not None
        )

        # Times: Phase 1 at the achieved matmul rate plus exposed communication; Phase 2 bound by bandwidth.
        floor = phase1_s = comm_s = query_s = decode_floor = decode_s = None
        if rate is not None:
            floor = flops[host] / rate
            achieved = rate * efficiency.phase1
            comm_s = _phase1_exposed_comm(
                shape, layout, host, forwards[host], anchor_copies > 0, anchor, local, ring, achieved, interconnect
            ) + _passing_exposed(shape, layout, work, host, achieved, interconnect)
            phase1_s = flops[host] / achieved + comm_s
        if bandwidth is not None:
            # Every step reads the weights once and this host's whole KV (the query host's own tokens included).
            kv_read = (local[host] + stored_new) * shape.kv_bytes_per_token
            decode_floor = (shape.decode_weight_bytes + kv_read) / bandwidth
            decode_s = decode_floor / efficiency.decode + shape.layers * overhead + per_token_collectives
            if rate is not None:
                causal = costs.causal_pairs(request.query_tokens) if query_host else 0
                pairs = request.query_tokens * local[host] + causal
                query_flops = costs.linear_flops(shape, request.query_tokens) + costs.attention_flops(shape, pairs)
                query_s = (
                    max(query_flops / (rate * efficiency.phase1), decode_floor / efficiency.decode)
                    + efficiency.query_overhead_s
                    + per_token_collectives
                )

        plans.append(
            HostPlan(
                host=host,
                blocks=blocks[host],
                context_tokens=local[host],
                anchor_tokens=anchor if anchor_copies else 0,
                stored_new_tokens=stored_new,
                kv_context_bytes=round(memory.context_kv),
                kv_anchor_bytes=round(memory.anchor_kv),
                kv_query_bytes=round(memory.query_kv),
                weight_bytes=round(memory.weights),
                activation_bytes=round(memory.activation),
                peak_bytes=round(memory.peak),
                host_peak_bytes=round(memory.host_peak),
                host_kv_bytes=round(memory.host_kv),
                peak_phase=memory.phase,
                phase1_flops=flops[host],
                phase1_bytes=_phase1_bytes_sent(shape, layout, host, anchor, local, work),
                phase1_floor_s=floor,
                phase1_s=phase1_s,
                phase1_comm_s=comm_s,
                query_s=query_s,
                decode_floor_s=decode_floor,
                decode_s=decode_s,
                fits=round(memory.peak) + reserve_bytes <= gpu.memory_bytes,
            )
        )
    return Plan(shape, layout, request, gpu, tuple(plans), anchor, reserve_bytes, interconnect, efficiency)


@dataclass(frozen=True)
class _Memory:
    """A host's fullest GPU at its peak: the parts, and the peak summed over the host's GPUs."""

    peak: float
    weights: float
    context_kv: float
    anchor_kv: float
    query_kv: float
    activation: float
    phase: str
    host_peak: float
    host_kv: float


def _host_memory(
    shape: ModelShape,
    layout: Layout,
    request: Request,
    context_tokens: int,
    stored_new: int,
    anchor_kv_tokens: float,
    forwards: Sequence[Forward],
    ring: bool,
) -> _Memory:
    """Peak memory of each GPU of a host: weights + the KV alive + the activations of the larger phase."""
    t = layout.tensor_parallel_size
    kv_token = shape.kv_bytes_per_token / t  # one token, all layers, one GPU's heads
    kv_token_layer = shape.kv_bytes_per_token_layer / t
    in_flight = costs.RING_MESSAGES * context_tokens * kv_token_layer if ring and layout.hosts > 1 else 0.0
    phase1_activation = max(
        costs.activation_bytes(shape, f.tokens, merged=f.merged, in_flight_bytes=in_flight, tensor_parallel=t)
        for f in forwards
    )
    query_activation = costs.activation_bytes(shape, request.query_tokens, merged=layout.hosts > 1, tensor_parallel=t)
    gpus = []
    # Star and ring keep each stored token's true position beside its K/V (int64 per layer, on every shard).
    stored_token = kv_token + costs.POSITION_BYTES_PER_TOKEN_LAYER * shape.layers
    for weights, layer_share in _gpu_shares(shape, layout):
        context_kv = context_tokens * stored_token * layer_share
        query_kv = stored_new * stored_token * layer_share
        anchor_kv = anchor_kv_tokens * kv_token * layer_share
        # The store is allocated for everything up front (dense's too: one block through the engine); the anchor is
        # freed before Phase 2.
        phases = {
            "phase1": (context_kv + query_kv + anchor_kv, phase1_activation),
            "phase2": (context_kv + query_kv, query_activation),
        }
        phase = max(phases, key=lambda name: sum(phases[name]))
        kv_alive, activation = phases[phase]
        peak = weights + kv_alive + activation
        gpus.append(_Memory(peak, weights, context_kv, anchor_kv, query_kv, activation, phase, 0.0, 0.0))
    fullest = max(gpus, key=lambda gpu: gpu.peak)
    # Each of the host's T tensor-parallel GPUs holds a like share of every GPU's figures.
    return replace(
        fullest,
        host_peak=t * sum(gpu.peak for gpu in gpus),
        host_kv=t * sum(gpu.context_kv + gpu.anchor_kv + gpu.query_kv for gpu in gpus),
    )


def _anchor_copies(layout: Layout, anchor: int, *, owns_first: bool) -> float:
    """How many copies of the anchor's K/V a host holds during Phase 1 (its own store's prefix not counted)."""
    if layout.method != "star" or not anchor or layout.anchor_source == "block":
        return 0.0
    if layout.anchor_source == "broadcast" and layout.hosts > 1:
        return costs.ANCHOR_SEND_COPIES if owns_first else 1.0  # host 0's sent messages; the others' receive buffers
    return 0.0 if owns_first else 1.0  # ``host``: the anchor's forward, kept


def _phase1_bytes_sent(
    shape: ModelShape, layout: Layout, host: int, anchor: int, local: Sequence[int], work: Assignment
) -> int:
    """Bytes the host sends in Phase 1: host 0 the anchor prefix to every other host (broadcast; with passing tokens
    also each layer's selection queries); ring hosts, at hop k, the K/V of host ``host - k + 1``; with passing tokens,
    every host its passing message of each layer and round to every other host (an all-gather)."""
    if layout.method == "ring":
        size = layout.hosts
        return sum(local[(host - k + 1) % size] for k in range(1, size)) * shape.kv_bytes_per_token
    sent = 0
    others = layout.hosts - 1
    if layout.method == "star" and layout.anchor_source == "broadcast" and anchor and host == 0:
        sent += (anchor + work.prefix_query) * shape.kv_bytes_per_token * others
        if work.passing_tokens:
            selection = work.prefix_query or min(SELECTION_WINDOW, anchor)
            sent += selection * shape.heads * shape.head_dim * shape.bytes_per_element * shape.layers * others
    if layout.method == "star" and work.passing_tokens:
        sent += work.rounds * shape.layers * _passing_message_bytes(shape, work.passing_tokens) * others
    return sent


def _passing_message_bytes(shape: ModelShape, tokens: int) -> int:
    """One host's passing message of one layer: ``tokens`` slots of K/V and their int64 positions, every KV head."""
    return tokens * (shape.kv_bytes_per_token_layer + shape.kv_heads * 8)


def _passing_exposed(
    shape: ModelShape, layout: Layout, work: Assignment, host: int, achieved_flops: float, interconnect: Interconnect
) -> float:
    """Seconds of the passing tokens' all-gathers not hidden: per layer and round, what the all-gather takes beyond
    the attention it overlaps (the block's attention to the prefix; the first block's attention to itself)."""
    if layout.method != "star" or not work.passing_tokens or layout.hosts < 2:
        return 0.0
    t = layout.tensor_parallel_size
    link = interconnect.link_bytes_per_s(layout.gpus_per_request)
    gather = (
        interconnect.collective_latency_s
        + (layout.hosts - 1) * _passing_message_bytes(shape, work.passing_tokens) / t / link
    )
    per_pair = 4.0 * shape.heads * shape.head_dim  # one layer, all heads (divided by T through the rate)
    exposed = 0.0
    blocks = work.block_lengths[host]
    for round_index in range(work.rounds):
        if round_index >= len(blocks):
            exposed += shape.layers * gather  # a round without a block: nothing to hide it behind
            continue
        length, first = blocks[round_index]
        pairs = costs.causal_pairs(length) if first else length * (work.anchor_length + work.prefix_query)
        exposed += shape.layers * max(0.0, gather - pairs * per_pair / achieved_flops)
    return exposed


def _phase1_exposed_comm(
    shape: ModelShape,
    layout: Layout,
    host: int,
    forwards: Sequence[Forward],
    holds_anchor: bool,
    anchor: int,
    local: Sequence[int],
    ring: Sequence[tuple[tuple[int, int], ...]] | None,
    achieved_flops: float,
    interconnect: Interconnect,
) -> float:
    """Seconds of Phase 1 communication not hidden behind compute (the rate given is the host's achieved one)."""
    t = layout.tensor_parallel_size
    link = interconnect.link_bytes_per_s(layout.gpus_per_request)
    latency = interconnect.collective_latency_s
    exposed = 0.0
    if t > 1:  # two all-reduces of the hidden states per layer (attention and MLP outputs), inside the node
        for forward in forwards:
            size = forward.tokens * shape.hidden * shape.bytes_per_element
            exposed += 2 * shape.layers * (2 * (t - 1) / t * size / interconnect.intra_node_bytes_per_s + latency)
    if layout.method == "star" and layout.anchor_source == "broadcast" and holds_anchor and layout.hosts > 1:
        # A receiver's first layer waits for host 0's first message (later ones arrive while it computes); host 0
        # waits at the end of Phase 1 for its last message to leave.
        exposed += anchor * shape.kv_bytes_per_token_layer / t / link + latency
    if layout.method == "ring" and ring is not None and layout.hosts > 1:
        exposed += shape.layers * _ring_exposed_per_layer(
            shape, layout, host, local, ring, achieved_flops, link, latency
        )
    return exposed


def _ring_exposed_per_layer(
    shape: ModelShape,
    layout: Layout,
    rank: int,
    local: Sequence[int],
    ring: Sequence[tuple[tuple[int, int], ...]],
    achieved_flops: float,
    link: float,
    latency: float,
) -> float:
    """One layer of the ring: hop 1's transfer waits in full; hop k > 1's overlaps the attention to hop k-1's K/V."""
    size = layout.hosts
    t = layout.tensor_parallel_size
    per_pair = 4.0 * shape.heads * shape.head_dim  # one layer, all heads (divided by T through the rate)

    def transfer_s(source: int) -> float:
        return local[source] * shape.kv_bytes_per_token_layer / t / link + latency

    def attention_s(source: int) -> float:
        mine = local[rank]
        if layout.ring_layout == "contiguous":
            pairs = mine * local[source] if source < rank else 0
        elif source < rank:
            first = ring[source][0][1] - ring[source][0][0]
            pairs = mine * first
        else:
            second = ring[rank][1][1] - ring[rank][1][0]
            pairs = second * local[source]
        return pairs * per_pair / achieved_flops

    exposed = transfer_s((rank - 1) % size)
    for hop in range(2, size):
        exposed += max(0.0, transfer_s((rank - hop) % size) - attention_s((rank - hop + 1) % size))
    return exposed
