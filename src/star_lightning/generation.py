"""Running one request: Phase 1 (``prefill_*``), Phase 2 (``encode_query``, ``decode_step``), the token loop.

Each phase is a small function that builds one :class:`~star_lightning.attention.step.ForwardStep` per forward,
so it can be timed, profiled and compiled on its own (as gpt-fast's ``prefill``/``decode_one_token``). All hosts of
a context-parallel group run the same calls in the same order; they differ only in the blocks they own and in
whether they store the new tokens (the query host).

:func:`encode_context` (Phase 1, any method) returns this host's share of the encoded context; :func:`answer`
(Phase 2) answers one query over it; :func:`generate` does both, and reuses a kept context when the next request
shares it (exact: the store is rolled back to the context, so nothing of the last query remains).
"""

from __future__ import annotations

import hashlib
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.profiler import record_function
from transformers import DynamicCache, PretrainedConfig

from star_lightning.attention.anchor import AnchorPrefix, BroadcastAnchor, KeptAnchor, ReceivedAnchor
from star_lightning.attention.kernels import KernelChoice, sdpa_priority
from star_lightning.attention.passing import SELECTION_WINDOW, PassingExchange, PassingSettings, Selection
from star_lightning.attention.star import ATTENTION_NAME
from star_lightning.attention.step import BlockRows, ForwardStep, StaticSlot
from star_lightning.cache import KVStore
from star_lightning.parallel.group import ContextGroup, is_query_host
from star_lightning.partition import BlockPlan, RingLayout, RingPlan, plan_blocks, plan_ring
from star_lightning.rope import length_dependent_rotary_modules, pinned_rope_length, rope_length_key
from star_lightning.sampling import SamplingConfig, choose_token

# Names of the phases in PyTorch profiler traces (``--trainer.profiler pytorch``).
PHASE1, PHASE2_QUERY, PHASE2_DECODE = "star_lightning/phase1", "star_lightning/phase2_query", "star_lightning/decode"

AttentionMethod = Literal["star", "ring", "dense"]
AnchorSource = Literal["broadcast", "host", "block"]
DecodeMode = Literal["auto", "eager", "static", "graph", "compile"]
ANCHOR_SOURCES: tuple[str, ...] = ("broadcast", "host", "block")


@dataclass(frozen=True)
class StarSettings:
    """How the context is encoded. ``dense`` is plain transformers attention in one process."""

    attention: AttentionMethod = "star"
    block_size: int = 4096
    anchor_block_size: int | None = None
    use_anchor: bool = True
    anchor_source: AnchorSource = "broadcast"
    """Where hosts get the anchor's K/V (:mod:`star_lightning.attention.anchor`): ``broadcast`` from host 0,
    ``host`` (each host computes it once), ``block`` (recomputed before every block). With one host, ``broadcast``
    and ``host`` are the same (host 0 takes it from its own first block)."""
    ring_layout: RingLayout = "zigzag"
    anchor_query: bool = False
    """Star: the request's query follows the anchor in every block's prefix (each block is encoded knowing what will
    be asked); its K/V are never stored, and a context encoded this way answers only the same query."""
    anchor_query_positions: QueryPositions = "after_anchor"
    passing_tokens: int = 0
    """Star: tokens each host passes per layer to the hosts after it (:mod:`star_lightning.attention.passing`)."""
    passing_selection: Selection = "shared"
    passing_pool_kernel: int = 7
    simulated_hosts: int = 1
    """Star: play the Phase 1 of this many hosts in this one process, host by host (exact), then Phase 2 over all of
    their KV (:func:`encode_context`); 0 = as many hosts as the context makes blocks; 1 = this process is one host of
    its group."""
    backend: str = "auto"
    decode: DecodeMode = "auto"
    r"""Phase 2 decoding, star, ring and dense alike: ``eager`` (one forward per token over the growing cache),
    ``static`` (static shapes: the preallocated cache with a device-side valid length), ``graph`` (``static`` captured
    once as a CUDA graph and replayed per token: no Python or launch overhead), ``compile`` (``graph`` of the
    ``torch.compile``\ d step: the model's norms, rotary and activations fused); ``auto`` is ``compile`` on one GPU,
    ``eager`` else."""

    def __post_init__(self) -> None:
        if self.anchor_source not in ANCHOR_SOURCES:
            raise ValueError(f"anchor_source must be one of {', '.join(ANCHOR_SOURCES)}, got {self.anchor_source!r}")
        if self.passing_tokens < 0:
            raise ValueError(f"passing_tokens must be 0 (off) or a number of tokens, got {self.passing_tokens}")
        if self.simulated_hosts < 0:
            raise ValueError(f"simulated_hosts must be 0 (one per block), 1 (off) or more, got {self.simulated_hosts}")
        self.passing  # noqa: B018 -- validates the passing settings

    @property
    def passing(self) -> PassingSettings:
        return PassingSettings(self.passing_tokens, self.passing_selection, self.passing_pool_kernel)

    def shapes_kv(self) -> tuple[object, ...]:
        """Every setting that shapes a context's KV (a kept context is reused only where they all agree)."""
        star = self.attention == "star"
        return (
            self.attention, self.block_size, self.anchor_block_size, self.use_anchor, self.ring_layout,
            star and self.anchor_query, self.anchor_query_positions if star and self.anchor_query else None,
            self.passing if star and self.passing_tokens else None, self.simulated_hosts if star else 1,
        )  # fmt: skip


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
    context_reused: bool = False
    phase1_s: float = 0.0
    query_s: float = 0.0
    decode_s: float = 0.0
    decode_setup_s: float = 0.0
    decode_mode: str = "eager"
    phase1_bytes: int = 0
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


StopCheck = Callable[[list[int]], bool]
PhaseListener = Callable[[str], None]


@dataclass
class EncodedContext:
    """This host's share of an encoded context (Phase 1's result), kept to answer every query that shares it.

    ``store``: star/ring's KV store (this host's blocks or chunks); ``cache``: dense's transformers cache. ``key``
    identifies the context's tokens and every setting that shaped its KV.
    """

    key: str
    context_length: int
    local_length: int
    store: KVStore | None = None
    cache: DynamicCache | None = None
    phase1_s: float = 0.0
    phase1_bytes: int = 0
    decoder: StaticDecoder | None = None
    """The static decode step captured for this context's store: the next query over it replays the same graph."""

    def rollback(self) -> None:
        """Forget what the last query and its generated tokens added; keep the context."""
        if self.store is not None:
            self.store.truncate(self.local_length)
        if self.cache is not None:
            added = self.cache.get_seq_length() - self.context_length
            if added > 0:  # a negative crop removes tokens: the form every transformers 5.x release takes
                self.cache.crop(-added)


@dataclass
class GenerationResult:
    token_ids: list[int]
    stats: RequestStats
    context: EncodedContext


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
    model: Callable[..., Any], ids: Tensor, positions: Tensor, step: ForwardStep, start: int | None = None
) -> Tensor:
    """One forward of star/ring/dense (our attention keeps the KV, so no transformers cache); the last logits ``[V]``.
    ``model``: the model, or its compiled forward. ``start``: the first position when ``positions`` are one contiguous
    run (``start, start + 1, ...``), which lets the layers skip what a window cannot reach without a device sync."""
    output = model(
        input_ids=ids,  # [1, L]
        position_ids=positions,  # [1, L]
        use_cache=False,
        logits_to_keep=1,
        star_step=replace(step, positions=positions[0], start=start),  # [L]: the true positions, for sliding windows
    )
    return output.logits[0, -1]  # [V]


def _dense_forward(model: nn.Module, ids: Tensor, positions: Tensor, cache: DynamicCache) -> Tensor:
    """One forward of the model's own attention over its own cache; the last logits ``[V]``."""
    output = model(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return output.logits[0, -1]  # [V]


def _positions(start: int, stop: int, device: torch.device) -> Tensor:
    return torch.arange(start, stop, device=device).unsqueeze(0)  # [1, L]


def _config(model: nn.Module) -> PretrainedConfig:
    config = getattr(model, "config", None)
    if not isinstance(config, PretrainedConfig):
        raise TypeError(f"{type(model).__name__} is not a transformers model (it has no PretrainedConfig)")
    return config


def num_layers(model: nn.Module) -> int:
    return int(_config(model).get_text_config().num_hidden_layers)


def kv_shape(model: nn.Module) -> tuple[int, int]:
    """``(KV heads, head dim)`` of one attention layer on this process (the anchor's receive buffers need them before
    the forward that fills them): the config's, or, with the heads split over tensor-parallel GPUs, this GPU's share
    (:func:`star_lightning.parallel.tensor_parallel.local_key_heads`)."""
    config = _config(model).get_text_config()
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    for name, module in model.named_modules():
        projection = getattr(module, "k_proj", None)
        if isinstance(projection, nn.Linear):
            if hasattr(projection.weight, "device_mesh"):  # a DTensor: the model is sharded
                from star_lightning.parallel.tensor_parallel import local_key_heads

                return local_key_heads(model, f"{name}.k_proj", kv_heads), head_dim
            return kv_heads, head_dim
    return kv_heads, head_dim


def query_heads_per_key_head(model: nn.Module) -> int:
    """Query heads per KV head (grouped-query attention): the same on every tensor-parallel shard."""
    config = _config(model).get_text_config()
    heads = int(config.num_attention_heads)
    return heads // int(getattr(config, "num_key_value_heads", None) or heads)


def _model_dtype_and_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    parameter = next(model.parameters())
    return parameter.dtype, parameter.device


QueryPositions = Literal["after_anchor", "phase2"]
QUERY_POSITIONS: tuple[str, ...] = ("after_anchor", "phase2")


@dataclass(frozen=True)
class _Prefix:
    """The anchor prefix of one request: the anchor, then (``anchor_query``) the query; ids ``[1, P]`` and positions
    ``[1, P]``, and which of its rows are the selection queries of passing tokens."""

    ids: Tensor
    positions: Tensor
    anchor: int
    query: int
    selection: tuple[int, int]

    @property
    def length(self) -> int:
        return self.anchor + self.query


def _anchor_prefix(
    context_ids: Tensor, plan: BlockPlan, query_ids: Tensor | None, query_positions: QueryPositions
) -> _Prefix:
    """``after_anchor``: the query at ``a .. a+q-1``, right after the anchor (APB gives the query consecutive positions
    inside its anchor); ``phase2``: at ``T .. T+q-1``, where Phase 2 puts it."""
    device, anchor = context_ids.device, plan.anchor_length
    if query_ids is None or not anchor:
        window = min(SELECTION_WINDOW, anchor)
        return _Prefix(context_ids[:, :anchor], _positions(0, anchor, device), anchor, 0, (anchor - window, anchor))
    if query_positions not in QUERY_POSITIONS:
        raise ValueError(f"anchor_query_positions must be one of {', '.join(QUERY_POSITIONS)}, got {query_positions!r}")
    query = query_ids.shape[1]
    start = anchor if query_positions == "after_anchor" else plan.context_length
    ids = torch.cat([context_ids[:, :anchor], query_ids], dim=1)  # [1, a + q]
    positions = torch.cat([_positions(0, anchor, device), _positions(start, start + query, device)], dim=1)
    return _Prefix(ids, positions, anchor, query, (anchor, anchor + query))


def _candidates(plan: BlockPlan, host: int, round_index: int) -> int:
    """Tokens host ``host`` may pass in round ``round_index``: its block of that round, without the anchor."""
    blocks = plan.blocks_of(host)
    if round_index >= len(blocks):
        return 0
    block = blocks[round_index]
    return block.length - (plan.anchor_length if block.index == 0 else 0)


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
) -> int:
    """Phase 1 on this host: encode its blocks, each after the anchor prefix; returns the bytes it sent.

    ``broadcast``: host 0 sends each layer's prefix K/V while it encodes the first block; the others receive it
    (posted before their forward, waited for layer by layer) and never run the prefix's forward. ``host``: a host
    without the first block runs the prefix's forward once and keeps its K/V. ``block``: every non-first block is a
    forward of ``(prefix, block)`` (the reference implementation's way; only the block's K/V is stored).

    ``query_ids``: the request's query, appended to the anchor in every block's prefix (``--model.anchor_query``) at
    the positions ``query_positions`` says; the first block's forward computes it too (as trailing rows that see
    only the anchor), and no host stores it. ``passing``: every host passes ``passing.tokens`` of its block's tokens per
    layer to the hosts after it (:mod:`star_lightning.attention.passing`); the hosts encode their blocks in rounds, in
    step (a host with fewer blocks takes part in a round's collectives without one).
    """
    kernels = KernelChoice() if kernels is None else kernels
    device = context_ids.device
    layers = num_layers(model)
    blocks = list(plan.blocks_of(group.rank))
    anchor = plan.anchor_length
    bytes_before = group.bytes_moved
    prefix_of = _anchor_prefix(context_ids, plan, query_ids, query_positions)
    exchange: PassingExchange | None = None
    dtype, root = _model_dtype_and_device(model)
    heads, head_dim = kv_shape(model)
    if passing is not None and passing.tokens > 0 and group.size > 1 and anchor:
        exchange = PassingExchange(group, passing, layers, (1, heads, head_dim), dtype, root)
    selection = prefix_of.selection if exchange is not None else None
    last = max(plan.context_length - 1, int(prefix_of.positions.max()) if prefix_of.length else 0)
    base = ForwardStep(phase="block", group=group, kernels=kernels, store=store, last_position=last, passing=exchange)

    prefix: AnchorPrefix | None = None  # where this host's blocks get the prefix's K/V
    sink: KeptAnchor | None = None  # the forward that computes the prefix's K/V hands them here
    received: ReceivedAnchor | None = None
    owns_first = bool(blocks) and blocks[0].index == 0
    broadcast = anchor_source == "broadcast" and group.size > 1
    prefix_positions = prefix_of.positions[0]  # [P]
    if anchor and anchor_source != "block":
        if owns_first:
            sink = (
                BroadcastAnchor(layers, prefix_of.length, group, prefix_positions)
                if broadcast
                else KeptAnchor(layers, prefix_of.length, prefix_positions)
            )
        elif broadcast:
            selection_shape = None
            if selection is not None:
                selection_shape = (1, heads * query_heads_per_key_head(model), selection[1] - selection[0], head_dim)
            received = ReceivedAnchor(
                group, layers, (1, heads, prefix_of.length, head_dim), dtype, root, prefix_positions, selection_shape
            )
        else:
            sink = KeptAnchor(layers, prefix_of.length, prefix_positions)
            rows = BlockRows(selection=selection)
            _forward(
                model, prefix_of.ids, prefix_of.positions,
                replace(base, keep_new=False, share_anchor=sink, rows=rows, passing=None),
            )  # fmt: skip
        prefix = received if received is not None else sink
    rounds = len(blocks)
    if exchange is not None:  # every host takes part in every round's collectives
        rounds = max(len(plan.blocks_of(host)) for host in range(plan.num_hosts))
    for round_index in range(rounds):
        if exchange is not None:  # what each host can pass this round: its block's tokens, the anchor's excepted
            exchange.begin_round([_candidates(plan, host, round_index) for host in range(plan.num_hosts)])
        if round_index >= len(blocks):
            assert exchange is not None
            exchange.idle()
            continue
        block = blocks[round_index]
        block_ids = context_ids[:, block.start : block.end]  # [1, l]
        block_positions = _positions(block.start, block.end, device)
        if block.index == 0:
            # The prefix's query rides along as trailing rows where anyone needs its K/V or selection queries.
            tail = prefix_of.query if (sink is not None or exchange is not None) else 0
            ids, positions = block_ids, block_positions  # [1, l]
            if tail:
                ids = torch.cat([block_ids, prefix_of.ids[:, anchor:]], dim=1)  # [1, l + q]
                positions = torch.cat([block_positions, prefix_of.positions[:, anchor:]], dim=1)
            first_selection = selection
            if selection is not None and tail:
                first_selection = (block.length, block.length + tail)
            rows = BlockRows(prefix=anchor, tail_query=tail, selection=first_selection)
            first = None if tail else block.start  # with the query's rows the positions are no contiguous run
            _forward(model, ids, positions, replace(base, share_anchor=sink, rows=rows), start=first)
        elif anchor and anchor_source == "block":
            ids = torch.cat([prefix_of.ids, block_ids], dim=1)  # [1, P + l]
            positions = torch.cat([prefix_of.positions, block_positions], dim=1)  # [1, P + l]
            rows = BlockRows(prefix=prefix_of.length, selection=selection)
            _forward(model, ids, positions, replace(base, skip=prefix_of.length, rows=rows))
        else:
            _forward(model, block_ids, block_positions, replace(base, anchor=prefix), start=block.start)
    if isinstance(sink, BroadcastAnchor):
        sink.finish()
    if received is not None:
        received.finish()
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
    positions = torch.cat([_positions(start, stop, device) for start, stop in spans], dim=1)  # [1, L_local]
    bytes_before = group.bytes_moved
    step = ForwardStep(
        phase="ring", group=group, kernels=kernels, store=store, ring=plan, last_position=plan.context_length - 1
    )
    _forward(model, ids, positions, step)
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
    step = ForwardStep(
        phase="block", kernels=KernelChoice() if kernels is None else kernels, store=store, last_position=length - 1
    )
    _forward(model, context_ids, _positions(0, length, context_ids.device), step, start=0)


def uses_star_attention(model: nn.Module) -> bool:
    """Whether the model's attention is Star Attention's function (dense: the model was servable)."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) == ATTENTION_NAME


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
    return _forward(model, query_ids, _positions(start, stop, query_ids.device), step, start=start)


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
    if mode not in ("auto", "eager", "static", "graph", "compile"):
        raise ValueError(f"unknown decode mode {mode!r}; choose auto, eager, static, graph or compile")
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


class StaticDecoder:
    """Phase 2 decoding with static shapes: every step is the same kernels on the same buffers.

    The token, its position, the cache slot and the valid length live in device tensors that are set before each
    step, so the step can be captured once as a CUDA graph (collectives included) and replayed per token. The
    capture's warm-up runs the first real step (its cache write is idempotent: same token, same slot).
    """

    def __init__(
        self,
        model: nn.Module,
        store: KVStore,
        group: ContextGroup,
        kernels: KernelChoice,
        last_position: int,
        graph: bool,
        compile: bool = False,
    ) -> None:
        self.kernels = kernels
        self.model, self.store, self.group = model, store, group
        self.use_graph = graph and kernels.graph_failure is None  # this engine's captures failed before: none
        self.forward = kernels.compiled_forward(model) if compile else model
        device = store.device
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=device)  # [1, 1]
        self.positions = torch.zeros(1, 1, dtype=torch.long, device=device)  # [1, 1]
        self.slot = StaticSlot(
            write_slot=torch.zeros(1, dtype=torch.long, device=device),
            valid_length=torch.zeros(1, dtype=torch.int32, device=device),
        )
        self.keep_new = is_query_host(group)
        self.step = ForwardStep(
            phase="query",
            group=group,
            kernels=kernels,
            store=store,
            keep_new=self.keep_new,
            static=self.slot,
            last_position=last_position,
        )
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None
        self.bytes_per_step = 0
        self.replays = 0
        self.setup_s = 0.0
        self.requested = ("compile" if compile else "graph") if graph else "static"
        self.mode = self.requested if self.use_graph or not graph else "static"
        """The mode it decodes in: ``static`` where a graph was asked for but cannot be captured."""
        self.capacity = store.capacity  # the buffers the graph was captured on: valid while the store keeps them

    def serves(self, store: KVStore, group: ContextGroup, mode: str) -> bool:
        """Whether this step, as captured, is right for a request over ``store`` (a kept context's next query)."""
        same = store is self.store and group is self.group and mode == self.requested
        return same and store.capacity == self.capacity

    def begin_request(self) -> None:
        """Per-request figures start at zero; a graph captured for an earlier request is replayed as it is."""
        self.setup_s = 0.0
        self.replays = 0

    def _run(self) -> Tensor:
        return _forward(self.forward, self.ids, self.positions, self.step)

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
        length = self.store.length
        if self.keep_new and length >= self.store.capacity:
            raise RuntimeError(f"KV store overflow: {length} + 1 tokens exceed the capacity {self.store.capacity}")
        self.ids.fill_(token)
        self.positions.fill_(position)
        self.slot.write_slot.fill_(length)
        self.slot.valid_length.fill_(length + 1 if self.keep_new else length)
        if self.use_graph and self.graph is None:
            try:
                self._capture()
            except RuntimeError as error:  # a kernel that cannot be captured: decode without the graph, exactly
                warnings.warn(
                    f"capturing the decode step as a CUDA graph failed ({str(error).splitlines()[0]}); decoding with "
                    "the static step, uncaptured (slower, the same tokens)",
                    stacklevel=2,
                )
                self.use_graph, self.graph, self.logits, self.mode = False, None, None, "static"
                self.kernels.graph_failure = str(error).splitlines()[0]
                torch.cuda.synchronize()
        if not self.use_graph:
            logits = self._run()
        else:
            assert self.graph is not None and self.logits is not None
            self.graph.replay()
            self.replays += 1
            logits = self.logits
        if self.keep_new:
            self.store.advance(1)
        return logits

    @property
    def replayed_bytes(self) -> int:
        """Bytes this request's replays moved that the group did not count (a capture counts one step's bytes
        without moving them, a replay moves them without counting)."""
        if not self.replays:
            return 0
        captured_now = self.setup_s > 0
        return self.bytes_per_step * (self.replays - 1 if captured_now else self.replays)


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


def context_key(
    context_ids: Tensor,
    star: StarSettings,
    group: ContextGroup,
    rope_length: int | None = None,
    query_ids: Tensor | None = None,
) -> str:
    """What identifies an encoded context: its tokens, the layout of hosts and every setting that shaped its KV
    (``rope_length``: the prompt length a length-dependent rope was pinned to, :mod:`star_lightning.rope`), and with
    the query in the anchor, the query's tokens (``query_ids``)."""
    digest = hashlib.sha256(context_ids.detach().cpu().numpy().tobytes()).hexdigest()
    if star.attention == "star" and star.anchor_query and query_ids is not None:
        digest += "+" + hashlib.sha256(query_ids.detach().cpu().numpy().tobytes()).hexdigest()
    shape = (*star.shapes_kv(), rope_length)
    return f"{digest}:{context_ids.shape[1]}:{shape}:{group.rank}/{group.size}"


def request_context_key(
    model: nn.Module,
    context_ids: Tensor,
    query_ids: Tensor,
    star: StarSettings,
    group: ContextGroup,
    anchor_query_ids: Tensor | None = None,
) -> str:
    """The :func:`context_key` a request's context is encoded under (a kept context answers it when they match);
    ``anchor_query_ids``: the anchor's query when it is not ``query_ids`` (:mod:`star_lightning.anchor_text`)."""
    rope_length = rope_length_key(model, context_ids.shape[1] + query_ids.shape[1])
    anchor = query_ids if anchor_query_ids is None else anchor_query_ids
    return context_key(context_ids, star, group, rope_length, anchor)


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
) -> EncodedContext:
    """Phase 1 of any method on this host, timed: the context's KV, ready for queries (``extra_capacity`` positions
    of room for the query and generated tokens on the query host).

    ``prompt_length`` (context + query; None: the context's length): a rope whose scaling regime depends on the
    sequence length (``dynamic``, ``longrope``) rotates every context token for it, as dense's one forward over the
    prompt does (:mod:`star_lightning.rope`). ``query_ids``: the request's query, which ``star.anchor_query`` puts in
    the anchor prefix (required then).

    ``star.simulated_hosts`` H != 1 (a group of one process; 0: one host per block): each of H hosts' Phase 1 runs
    in turn through the same code with a group that plays host h of H (:mod:`star_lightning.parallel.
    simulated_group`: the anchor and the passing tokens each host gets are the ones the hosts before it really
    computed), and the H stores are joined in host order into this process's one store; Phase 2 over it is exactly
    the merge over H hosts' partials. So one device predicts what H real hosts predict (``phase1_s``: the slowest
    host).
    """
    prompt_length = context_ids.shape[1] if prompt_length is None else prompt_length
    if star.attention == "star" and star.anchor_query and query_ids is None:
        raise ValueError("anchor_query puts the request's query in the anchor: encode_context needs query_ids")
    with pinned_rope_length(model, prompt_length):
        if star.attention == "star" and star.simulated_hosts != 1:
            return _encode_simulated(model, context_ids, group, star, extra_capacity, kernels, prompt_length, query_ids)
        return _encode_context(model, context_ids, group, star, extra_capacity, kernels, prompt_length, query_ids)


def _encode_context(
    model: nn.Module,
    context_ids: Tensor,
    group: ContextGroup,
    star: StarSettings,
    extra_capacity: int,
    kernels: KernelChoice | None,
    prompt_length: int,
    query_ids: Tensor | None,
) -> EncodedContext:
    kernels = KernelChoice(backend=star.backend) if kernels is None else kernels
    devices = model_devices(model)
    context_length = context_ids.shape[1]
    key = context_key(context_ids, star, group, rope_length_key(model, prompt_length), query_ids)
    t0 = time.perf_counter()
    if star.attention == "dense":
        if group.size != 1:
            raise ValueError(
                f"dense attention runs each request in one process, but the context-parallel group has {group.size} "
                "hosts; set --trainer.strategy.context_parallel_size 1 (the devices then split the requests) or use "
                "--model.attention star/ring"
            )
        if uses_star_attention(model):
            store = KVStore(num_layers(model), context_length + extra_capacity)
            prefill_dense(model, context_ids, store, kernels=kernels)
            _synchronize(devices)
            phase1_s = time.perf_counter() - t0
            return EncodedContext(key, context_length, context_length, store=store, phase1_s=phase1_s)
        cache = DynamicCache(config=_config(model))
        with sdpa_priority(kernels, context_ids.device, context_length):
            _dense_forward(model, context_ids, _positions(0, context_length, context_ids.device), cache)
        _synchronize(devices)
        return EncodedContext(key, context_length, context_length, cache=cache, phase1_s=time.perf_counter() - t0)
    if star.attention == "ring":
        ring = plan_ring(context_length, group.size, star.ring_layout)
        local = ring.local_context_length(group.rank)
        store = KVStore(num_layers(model), local + extra_capacity)
        sent = prefill_ring(model, context_ids, ring, group, store, kernels=kernels)
    else:
        plan = plan_blocks(context_length, star.block_size, group.size, star.anchor_block_size, star.use_anchor)
        local = plan.local_context_length(group.rank)
        store = KVStore(num_layers(model), local + extra_capacity)
        sent = _prefill_star_settings(model, context_ids, plan, group, store, star, kernels, query_ids)
    _synchronize(devices)
    return EncodedContext(key, context_length, local, store=store, phase1_s=time.perf_counter() - t0, phase1_bytes=sent)


def _prefill_star_settings(
    model: nn.Module,
    context_ids: Tensor,
    plan: BlockPlan,
    group: ContextGroup,
    store: KVStore,
    star: StarSettings,
    kernels: KernelChoice,
    query_ids: Tensor | None,
) -> int:
    return prefill_star(
        model, context_ids, plan, group, store, anchor_source=star.anchor_source, kernels=kernels,
        query_ids=query_ids if star.anchor_query else None, query_positions=star.anchor_query_positions,
        passing=star.passing if star.passing_tokens else None,
    )  # fmt: skip


def _encode_simulated(
    model: nn.Module,
    context_ids: Tensor,
    group: ContextGroup,
    star: StarSettings,
    extra_capacity: int,
    kernels: KernelChoice | None,
    prompt_length: int,
    query_ids: Tensor | None,
) -> EncodedContext:
    from star_lightning.parallel.simulated_group import AnchorBoard, SimulatedHostGroup

    if group.size != 1:
        raise ValueError(
            f"simulated_hosts plays every host in one process, but this process is one of {group.size} hosts; set "
            "--trainer.strategy.context_parallel_size 1 or --model.simulate_hosts 1"
        )
    kernels = KernelChoice(backend=star.backend) if kernels is None else kernels
    devices = model_devices(model)
    context_length, layers = context_ids.shape[1], num_layers(model)
    hosts = star.simulated_hosts or -(-context_length // star.block_size)  # 0: one host per block
    plan = plan_blocks(context_length, star.block_size, hosts, star.anchor_block_size, star.use_anchor)
    board = AnchorBoard()
    stores, seconds, sent = [], [], 0
    for host in range(hosts):
        t0 = time.perf_counter()
        host_store = KVStore(layers, plan.local_context_length(host))
        played = SimulatedHostGroup(host, hosts, board)
        sent += _prefill_star_settings(model, context_ids, plan, played, host_store, star, kernels, query_ids)
        _synchronize(devices)
        seconds.append(time.perf_counter() - t0)
        stores.append(host_store)
    board.clear()
    store = KVStore(layers, context_length + extra_capacity)
    for layer in range(layers):
        for host_store in stores:
            keys, values = host_store.view(layer)
            store.append(layer, keys, values, host_store.positions(layer))
    key = context_key(context_ids, star, group, rope_length_key(model, prompt_length), query_ids)
    return EncodedContext(key, context_length, context_length, store=store, phase1_s=max(seconds), phase1_bytes=sent)


def answer(
    model: nn.Module,
    context: EncodedContext,
    query_ids: Tensor,
    group: ContextGroup,
    star: StarSettings,
    settings: GenerationSettings,
    *,
    kernels: KernelChoice | None = None,
    stop_check: StopCheck | None = None,
    on_phase: PhaseListener | None = None,
) -> tuple[list[int], RequestStats]:
    """Phase 2, timed: encode the query over the encoded context, then decode until EOS, a stop or the budget (a
    length-dependent rope pinned to the prompt's length, :mod:`star_lightning.rope`)."""
    with pinned_rope_length(model, context.context_length + query_ids.shape[1]):
        return _answer(model, context, query_ids, group, star, settings, kernels, stop_check, on_phase)


def _answer(
    model: nn.Module,
    context: EncodedContext,
    query_ids: Tensor,
    group: ContextGroup,
    star: StarSettings,
    settings: GenerationSettings,
    kernels: KernelChoice | None,
    stop_check: StopCheck | None,
    on_phase: PhaseListener | None,
) -> tuple[list[int], RequestStats]:
    kernels = KernelChoice(backend=star.backend) if kernels is None else kernels
    devices = model_devices(model)
    query_length = query_ids.shape[1]
    if query_length == 0:
        raise ValueError("the query is empty: every request needs a non-empty 'input_query'")
    device = query_ids.device
    start = context.context_length + query_length
    stats = RequestStats(
        context_tokens=context.context_length, local_context_tokens=context.local_length, query_tokens=query_length
    )
    bytes_before = group.bytes_moved
    t0 = time.perf_counter()
    decoder: StaticDecoder | None = None
    if context.store is not None:
        store = context.store
        if is_query_host(group):
            store.ensure_capacity(context.local_length + query_length + settings.max_new_tokens)
        with _phase(PHASE2_QUERY, on_phase):
            first_logits = encode_query(model, store, query_ids, context.context_length, group, kernels)
            _synchronize(devices)
        length_dependent = bool(length_dependent_rotary_modules(model))
        mode = stats.decode_mode = resolve_decode_mode(star.decode, devices, length_dependent)
        if mode != "eager" and settings.max_new_tokens > 1:
            decoder = context.decoder
            if decoder is None or not decoder.serves(store, group, mode):
                # The largest position any token over this store can have: a window check made for it holds for
                # every later query the captured step replays for (the store's capacity is fixed while it serves).
                last = context.context_length + store.capacity - context.local_length - 1
                decoder = StaticDecoder(
                    model, store, group, kernels, last, graph=mode in ("graph", "compile"), compile=mode == "compile"
                )
                context.decoder = decoder
            decoder.begin_request()

        def next_logits(token: int, i: int) -> Tensor:
            if decoder is not None:
                return decoder(token, start + i)
            return decode_step(model, store, torch.tensor([[token]], device=device), start + i, group, kernels)

    else:
        cache = context.cache
        assert cache is not None
        with _phase(PHASE2_QUERY, on_phase):
            first_logits = _dense_forward(model, query_ids, _positions(context.context_length, start, device), cache)
            _synchronize(devices)

        def next_logits(token: int, i: int) -> Tensor:
            ids = torch.tensor([[token]], device=device)  # [1, 1]
            return _dense_forward(model, ids, _positions(start + i, start + i + 1, device), cache)

    t1 = time.perf_counter()
    with _phase(PHASE2_DECODE, on_phase):
        tokens = sample_loop(first_logits, next_logits, group, settings, stop_check)
        _synchronize(devices)
    t2 = time.perf_counter()
    stats.query_s = t1 - t0
    stats.decode_setup_s = decoder.setup_s if decoder is not None else 0.0
    if decoder is not None:
        stats.decode_mode = decoder.mode
    stats.decode_s = t2 - t1 - stats.decode_setup_s
    stats.new_tokens = len(tokens)
    stats.phase2_bytes = group.bytes_moved - bytes_before + (decoder.replayed_bytes if decoder is not None else 0)
    return tokens, stats


def generate(
    model: nn.Module,
    context_ids: Tensor,
    query_ids: Tensor,
    group: ContextGroup,
    star: StarSettings,
    settings: GenerationSettings,
    stop_check: StopCheck | None = None,
    on_phase: PhaseListener | None = None,
    *,
    kernels: KernelChoice | None = None,
    kept: EncodedContext | None = None,
    anchor_query_ids: Tensor | None = None,
) -> GenerationResult:
    """One request; ``context_ids`` and ``query_ids`` are ``[1, L]`` on the model's device.

    ``anchor_query_ids`` (``[1, Q]``): what ``star.anchor_query`` puts after the anchor, when it is not the whole
    query (the question alone, :mod:`star_lightning.anchor_text`); Phase 2 still reads ``query_ids``.

    ``kept``: the context the previous request encoded (``GenerationResult.context``); when this request's context
    is the same (same tokens, same settings), Phase 1 is skipped and the kept context answers (``phase1_s`` 0).
    ``on_phase`` is told the name of each phase as it starts (a progress display).
    """
    kernels = KernelChoice(backend=star.backend) if kernels is None else kernels
    devices = model_devices(model)
    _reset_peak_memory(devices)
    extra = query_ids.shape[1] + settings.max_new_tokens if is_query_host(group) else 0
    prompt_length = context_ids.shape[1] + query_ids.shape[1]
    anchor_ids = query_ids if anchor_query_ids is None else anchor_query_ids
    reused = kept is not None and kept.key == request_context_key(
        model, context_ids, query_ids, star, group, anchor_ids
    )
    if reused:
        assert kept is not None
        context = kept
        context.rollback()
    else:
        with _phase(PHASE1, on_phase):
            context = encode_context(
                model, context_ids, group, star, extra_capacity=extra, kernels=kernels, prompt_length=prompt_length,
                query_ids=anchor_ids,
            )  # fmt: skip
    tokens, stats = answer(
        model, context, query_ids, group, star, settings, kernels=kernels, stop_check=stop_check, on_phase=on_phase
    )
    stats.context_reused = reused
    stats.phase1_s = 0.0 if reused else context.phase1_s
    stats.phase1_bytes = 0 if reused else context.phase1_bytes
    stats.peak_mem_bytes = _peak_memory_bytes(devices)
    return GenerationResult(tokens, stats, context)
