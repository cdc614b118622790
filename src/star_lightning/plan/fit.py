"""Whether a layout fits its GPUs, and the smallest changes that would make it fit, found by planning them.

Every suggestion is a plan of the same model and request that fits: more hosts (for dense: ring attention over
hosts, which is exact too), smaller blocks (star; smaller blocks can cost accuracy), tensor parallelism (T GPUs per
host sharing heads and MLP width) where the strategy offers it, else more GPUs per host (layers split over them).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from star_lightning.errors import ConfigurationError
from star_lightning.plan.costs import GIB, RUNTIME_RESERVE_BYTES
from star_lightning.plan.hardware import GpuSpec, Interconnect
from star_lightning.plan.hosts import Efficiency, Layout, Plan, Request, plan_request
from star_lightning.plan.shape import ModelShape

MAX_HOSTS = 4096
PARALLEL_SIZES = (2, 4, 8)
MIN_BLOCK = 128


@dataclass(frozen=True)
class Suggestion:
    """A changed layout that fits, the command-line options that make it, and its plan."""

    change: str
    options: tuple[tuple[str, str], ...]
    plan: Plan

    @property
    def layout(self) -> Layout:
        return self.plan.layout

    def text(self) -> str:
        options = " ".join(f"{name} {value}" for name, value in self.options)
        world = ""
        if any(name == "--trainer.strategy.context_parallel_size" for name, _ in self.options):
            world = f"; nodes x devices a multiple of {self.layout.hosts * self.layout.tensor_parallel_size}"
        return (
            f"{options} ({self.change}: {self.layout.gpus_per_request} GPU(s) per request, peak "
            f"{self.plan.predicted_peak_gib:.1f} GiB per GPU{world})"
        )

    def record(self) -> dict[str, Any]:
        return {
            "change": self.change,
            "options": {name: value for name, value in self.options},
            "gpus_per_request": self.layout.gpus_per_request,
            "predicted_peak_gib": self.plan.predicted_peak_gib,
            "predicted_ttft_s": self.plan.predicted_ttft_s,
        }


def _try(shape: ModelShape, layout: Layout, plan: Plan) -> Plan | None:
    """The plan of ``layout`` for the same request, GPU and settings; None if the layout cannot run at all."""
    try:
        return plan_request(
            shape,
            layout,
            plan.request,
            plan.gpu,
            interconnect=plan.interconnect,
            efficiency=plan.efficiency,
            reserve_bytes=plan.reserve_bytes,
        )
    except ConfigurationError:
        return None


def _more_hosts(shape: ModelShape, plan: Plan, base: Layout) -> Plan | None:
    """The fewest hosts above ``base.hosts`` that fit; None when even the most hosts would not."""
    for hosts in range(base.hosts + 1, MAX_HOSTS + 1):
        candidate = _try(shape, replace(base, hosts=hosts), plan)
        if candidate is None:
            return None  # more hosts than blocks (or chunks): no larger count runs either
        if candidate.fits:
            return candidate
        if _weights_and_fixed_exceed(candidate):
            return None
    return None


def _weights_and_fixed_exceed(plan: Plan) -> bool:
    """Whether what more hosts cannot shrink (weights, a block's activations and anchor) already fills the GPU."""
    host = plan.fullest
    return host.weight_bytes + host.activation_bytes + host.kv_anchor_bytes + plan.reserve_bytes > plan.gpu.memory_bytes


def _context_alone_exceeds(plan: Plan) -> bool:
    """Whether weights plus an even share of the context's K/V already fill the GPU: then no block size helps (blocks
    change activations and the anchor, not how much context a host keeps)."""
    host = plan.fullest
    share = plan.request.context_tokens / plan.layout.hosts / max(1, host.context_tokens)
    return host.weight_bytes + host.kv_context_bytes * share + plan.reserve_bytes > plan.gpu.memory_bytes


def _block_sizes_below(block_size: int) -> list[int]:
    """Candidate block sizes, largest first: steps of an eighth of the power of two below, then halvings."""
    power = 1 << (block_size.bit_length() - 1)
    step = max(MIN_BLOCK, power // 8)
    sizes = list(range((block_size - 1) // step * step, step - 1, -step))
    size = step // 2
    while size >= MIN_BLOCK:
        sizes.append(size)
        size //= 2
    return [s for s in sizes if 0 < s < block_size]


def suggest_changes(shape: ModelShape, plan: Plan, *, max_tensor_parallel: int = 1) -> list[Suggestion]:
    """The smallest fitting change of each kind, fewest GPUs per request first (``[]`` when ``plan`` fits or nothing
    tried fits). ``max_tensor_parallel`` > 1 offers tensor parallelism up to that size (when the strategy has it);
    otherwise more GPUs per host."""
    if plan.fits:
        return []
    layout = plan.layout
    found: list[Suggestion] = []

    def add(change: str, candidate: Plan | None, options: list[tuple[str, str]]) -> None:
        if candidate is not None and candidate.fits:
            found.append(Suggestion(change, tuple(options), candidate))

    # More hosts: dense cannot have them, but ring attention over hosts is exact as well.
    hosts_base = replace(layout, method="ring") if layout.method == "dense" else layout
    more = _more_hosts(shape, plan, hosts_base)
    if more is not None:
        options = [("--trainer.strategy.context_parallel_size", str(more.layout.hosts))]
        if layout.method == "dense":
            options.insert(0, ("--model.attention", "ring"))
        add("more hosts", more, options)

    if layout.method == "star" and not _context_alone_exceeds(plan):
        for size in _block_sizes_below(layout.block_size):
            anchor = None if layout.anchor_block_size is None else min(layout.anchor_block_size, size)
            candidate = _try(shape, replace(layout, block_size=size, anchor_block_size=anchor), plan)
            if candidate is not None and candidate.fits:
                options = [("--model.block_size", str(size))]
                if anchor is not None:
                    options.append(("--model.anchor_block_size", str(anchor)))
                add("smaller blocks, which may cost accuracy", candidate, options)
                break

    per_node = plan.interconnect.gpus_per_node
    if max_tensor_parallel > 1:
        for size in (s * layout.tensor_parallel_size for s in PARALLEL_SIZES):
            if size > max_tensor_parallel or size * layout.gpus_per_host > per_node:
                break
            candidate = _try(shape, replace(layout, tensor_parallel_size=size), plan)
            if candidate is not None and candidate.fits:
                add("tensor parallelism", candidate, [("--trainer.strategy.tensor_parallel_size", str(size))])
                break
    else:
        for size in (s * layout.gpus_per_host for s in PARALLEL_SIZES):
            if size * layout.tensor_parallel_size > per_node:
                break
            candidate = _try(shape, replace(layout, gpus_per_host=size), plan)
            if candidate is not None and candidate.fits:
                add("layers over more GPUs per host", candidate, [("--trainer.strategy.gpus_per_host", str(size))])
                break

    if not found:  # no single change: several GPUs per host and more hosts together
        for size in PARALLEL_SIZES:
            wider = (
                replace(hosts_base, tensor_parallel_size=layout.tensor_parallel_size * size)
                if max_tensor_parallel > 1
                else replace(hosts_base, gpus_per_host=layout.gpus_per_host * size)
            )
            if wider.tensor_parallel_size * wider.gpus_per_host > per_node:
                break
            start = _try(shape, wider, plan)
            if start is None:
                continue
            candidate = start if start.fits else _more_hosts(shape, start, wider)
            if candidate is not None:
                name = "tensor_parallel_size" if max_tensor_parallel > 1 else "gpus_per_host"
                value = wider.tensor_parallel_size if max_tensor_parallel > 1 else wider.gpus_per_host
                options = [
                    (f"--trainer.strategy.{name}", str(value)),
                    ("--trainer.strategy.context_parallel_size", str(candidate.layout.hosts)),
                ]
                if layout.method == "dense":
                    options.insert(0, ("--model.attention", "ring"))
                add("more GPUs per host and more hosts", candidate, options)
                break
    order = {s.change: i for i, s in enumerate(found)}
    return sorted(found, key=lambda s: (s.layout.gpus_per_request, order[s.change]))


def describe_misfit(plan: Plan) -> str:
    """``host 3 needs 91.2 GiB (weights 15.0, KV 70.1, activations 6.1, runtime 2.0) of the 79.6 GiB of GPU``."""
    host = plan.fullest
    per_gpu = " per GPU" if plan.layout.tensor_parallel_size * plan.layout.gpus_per_host > 1 else ""
    need = (host.peak_bytes + plan.reserve_bytes) / GIB
    return (
        f"host {host.host} needs {need:.1f} GiB{per_gpu} (weights {host.weight_bytes / GIB:.1f}, KV "
        f"{host.kv_at_peak_bytes / GIB:.1f}, activations {host.activation_bytes / GIB:.1f}, runtime "
        f"{plan.reserve_bytes / GIB:.1f}) of the {plan.gpu.memory_gib:.1f} GiB of {plan.gpu.name}"
    )


def check_fits(
    config: Any,
    *,
    dtype: Any,
    layout: Layout,
    request: Request,
    gpu: GpuSpec,
    interconnect: Interconnect | None = None,
    efficiency: Efficiency | None = None,
    reserve_bytes: int = RUNTIME_RESERVE_BYTES,
    max_tensor_parallel: int = 1,
) -> Plan:
    """The plan of ``request`` under ``layout``, or a :class:`ConfigurationError` when some host cannot fit its GPU.

    Call it before any weights load. It needs:

    - ``config``: the model's transformers config (``AutoConfig.from_pretrained``; no weights) and ``dtype`` (the
      dtype the weights load in, e.g. ``torch.bfloat16``);
    - ``layout``: the method and its settings (``--model.*``) and the group: ``hosts`` = context_parallel_size,
      ``tensor_parallel_size``, ``gpus_per_host``;
    - ``request``: the longest request of the run (its context tokens, query tokens, and max_new_tokens), since
      every request must fit;
    - ``gpu``: the GPU's memory (``torch.cuda.get_device_properties(i).total_memory`` and its name); rates are
      optional here (``None``: no times are predicted);
    - ``max_tensor_parallel``: the largest tensor_parallel_size the strategy can use, for the suggested fix.

    The error names the fullest host and its bytes and the smallest changes that fit, e.g. ``host 3 needs 91.2 GiB
    (weights 15.0, KV 68.1, activations 6.1, runtime 2.0) of the 79.6 GiB of NVIDIA H100 80GB HBM3; use
    --trainer.strategy.context_parallel_size 8 (more hosts: ...)``. Layouts that cannot run at all raise the
    validators' own errors (more hosts than blocks, ...).
    """
    shape = ModelShape.from_config(config, dtype)
    plan = plan_request(
        shape, layout, request, gpu, interconnect=interconnect, efficiency=efficiency, reserve_bytes=reserve_bytes
    )
    if plan.fits:
        return plan
    suggestions = suggest_changes(shape, plan, max_tensor_parallel=max_tensor_parallel)
    fix = (
        "use " + ", or ".join(s.text() for s in suggestions)
        if suggestions
        else "no layout of more hosts, smaller blocks or more GPUs per host fits it; use GPUs with more memory"
    )
    raise ConfigurationError(f"the layout does not fit: {describe_misfit(plan)}; {fix}")
