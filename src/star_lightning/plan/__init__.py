"""Before launch: what each host of a layout holds and computes, whether it fits its GPU, and how long it takes.

A pure cost model (no ``torch.distributed``, no weights; a transformers config is enough):

- :class:`~star_lightning.plan.shape.ModelShape`: the model's numbers, from its config;
- :func:`~star_lightning.plan.hosts.plan_request`: per host blocks, tokens, KV / weight / activation bytes, Phase 1
  FLOPs and bytes sent, predicted and floor times, for star, ring or dense;
- :mod:`~star_lightning.plan.costs`: the FLOP and activation formulas and every calibration constant;
- :mod:`~star_lightning.plan.hardware`: known GPUs, measured rates (cached per GPU), links;
- :func:`~star_lightning.plan.fit.check_fits` / :func:`~star_lightning.plan.fit.suggest_changes`: refuse a layout
  that cannot fit, with the smallest changes that would.

``star-lightning plan`` (:mod:`star_lightning.plan.command`) prints it.
"""

from star_lightning.plan.costs import activation_bytes, causal_pairs, forward_flops
from star_lightning.plan.fit import Suggestion, check_fits, describe_misfit, suggest_changes
from star_lightning.plan.hardware import GpuSpec, Interconnect, known_gpu, local_gpu, measure_rates
from star_lightning.plan.hosts import (
    Efficiency,
    HostPlan,
    Layout,
    Plan,
    Request,
    local_context_tokens,
    phase1_flops_per_host,
    plan_request,
    ring_spans,
)
from star_lightning.plan.shape import ModelShape

__all__ = [
    "Efficiency",
    "GpuSpec",
    "HostPlan",
    "Interconnect",
    "Layout",
    "ModelShape",
    "Plan",
    "Request",
    "Suggestion",
    "activation_bytes",
    "causal_pairs",
    "check_fits",
    "describe_misfit",
    "forward_flops",
    "known_gpu",
    "local_context_tokens",
    "local_gpu",
    "measure_rates",
    "phase1_flops_per_host",
    "plan_request",
    "ring_spans",
    "suggest_changes",
]
