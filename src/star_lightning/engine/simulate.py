"""An ``H``-host request measured on one device: each host's Phase 1 share in turn, then the query host's Phase 2.

Phase 1 has no communication besides the anchor's (star) or the ring's K/V, so one host's share run alone on one
GPU takes that host's real Phase 1 compute time, through the product's own code path (the one loop of played hosts,
:func:`~star_lightning.engine.encode.play_hosts`). What each host would send is counted; the caller models its time
at a stated link speed. The query host, played last, keeps its context and answers the query, so Phase 2's local work
and the merge over ``H`` partials are measured too (the collectives' latency is not: the caller adds it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from star_lightning.attention.kernels import KernelChoice
from star_lightning.engine.context import EncodedContext
from star_lightning.engine.encode import play_hosts
from star_lightning.engine.forward import model_devices
from star_lightning.engine.request import RequestStats, answer
from star_lightning.engine.settings import GenerationSettings, StarSettings
from star_lightning.parallel.simulated_group import SimulatedHostGroup
from star_lightning.rope import pinned_rope_length


@dataclass
class SimulatedRequest:
    """Per host (``None`` where a host was not run): Phase 1 seconds, bytes it sends in Phase 1 (and per ring hop),
    peak memory; the query host's Phase 2 stats and tokens, and (``keep_context``) its encoded context and group, to
    answer more queries over the same context."""

    hosts: int
    phase1_host_s: list[float | None]
    phase1_host_bytes: list[int | None]
    peak_host_bytes: list[int | None]
    hop_bytes: list[list[int]] = field(default_factory=list)
    phase2: RequestStats = field(default_factory=RequestStats)
    token_ids: list[int] = field(default_factory=list)
    context: EncodedContext | None = None
    query_group: SimulatedHostGroup | None = None

    @property
    def phase1_s(self) -> float:
        """The slowest host measured (Phase 1 ends when the last host is done)."""
        return max(t for t in self.phase1_host_s if t is not None)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def simulate_request(
    model: nn.Module,
    context_ids: Tensor,
    query_ids: Tensor,
    hosts: int,
    star: StarSettings,
    settings: GenerationSettings,
    *,
    kernels: KernelChoice | None = None,
    run_hosts: list[int] | None = None,
    keep_context: bool = False,
) -> SimulatedRequest:
    """Run the hosts of an ``hosts``-host request in turn (host 0 first, the query host last).

    ``run_hosts`` limits the hosts run (for layouts whose hosts do the same work, as the zigzag ring); host 0 (star:
    it sends the anchor) and the query host (it answers) always run. ``keep_context``: keep the query host's
    encoded context (``SimulatedRequest.context``, with ``query_group``) to answer further queries over it.
    """
    kernels = KernelChoice(backend=star.backend) if kernels is None else kernels
    device = model_devices(model)[0]
    query_host = hosts - 1
    result = SimulatedRequest(hosts, [None] * hosts, [None] * hosts, [None] * hosts)
    extra = query_ids.shape[1] + settings.max_new_tokens

    def before_host(host: int) -> None:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        _synchronize(device)

    with pinned_rope_length(model, context_ids.shape[1] + query_ids.shape[1]):
        for played in play_hosts(
            model, context_ids, hosts, star, kernels, query_ids, run_hosts=run_hosts, before_host=before_host,
            extra_capacity=lambda host: extra if host == query_host else 0,
        ):  # fmt: skip
            host, group, context = played.host, played.group, played.context
            result.phase1_host_s[host] = context.phase1_s
            result.phase1_host_bytes[host] = context.phase1_bytes
            result.hop_bytes.append(list(group.hop_bytes))
            if device.type == "cuda":
                # The board is the simulation's own: a real receiver holds only its receive buffers (counted).
                board_bytes = played.board.nbytes if host > 0 else 0
                result.peak_host_bytes[host] = int(torch.cuda.max_memory_allocated(device)) - board_bytes
            if host == query_host:
                _answer_on_query_host(model, result, played.context, group, query_ids, star, settings, kernels)
                if keep_context:
                    result.context, result.query_group = context, group
                if device.type == "cuda":
                    result.peak_host_bytes[host] = max(
                        result.peak_host_bytes[host] or 0,
                        int(torch.cuda.max_memory_allocated(device)) - played.board.nbytes,
                    )
            del context, played
    return result


def _answer_on_query_host(
    model: nn.Module,
    result: SimulatedRequest,
    context: EncodedContext,
    group: SimulatedHostGroup,
    query_ids: Tensor,
    star: StarSettings,
    settings: GenerationSettings,
    kernels: KernelChoice,
) -> None:
    result.token_ids, result.phase2 = answer(model, context, query_ids, group, star, settings, kernels=kernels)
