"""Tensor parallelism inside a host: the model's own transformers TP plan, applied with PyTorch's
``parallelize_module`` over the host's slice of the device mesh (the torchtitan way).

transformers ships a plan per architecture (``config.base_model_tp_plan`` for the decoder, the model class's
``_tp_plan`` for the output head): attention's q/k/v projections split by heads (column-wise), the output projection
joins them (row-wise, one all-reduce), the MLP likewise. Star Attention's math then runs unchanged on each GPU's
heads: Phase 1 on the local heads, Phase 2's merge per head shard across the hosts (each tensor shard has its own
context-parallel group). The output head gathers the vocabulary, so every shard sees the same logits and the query
host's shards choose the same token.

The plan is applied by PyTorch rather than by ``from_pretrained(tp_plan=...)``, whose mesh handling assumes the
whole world is one tensor-parallel model (ours is ``data x context x tensor``) and changes between transformers
releases. Each process reads the full weights and keeps its shard (``src_data_rank=None``: no broadcast).
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from star_lightning.errors import ConfigurationError

# transformers' style names (5.x and the 4.x ones still found in configs) -> what PyTorch does with them. Inference
# needs the local result of every split projection (``use_local_output``): attention sees plain tensors.
_SPLIT = {"colwise", "local_colwise", "rowwise", "local_rowwise"}
_GATHERED = {"colwise_gather_output", "colwise_rep", "gather"}
_SPLIT_INPUT = {"rowwise_split_input", "rowwise_rep"}
# Styles that leave the weights whole on every shard (correct, unsplit): norms, sequence parallelism, training-only.
_REPLICATED = {"replicated_with_grad_allreduce", "replicate", "sequence_parallel", "isolated", "local", "local_params"}


def _style(name: str, where: str) -> ParallelStyle | None:
    if name in ("colwise", "local_colwise"):
        return ColwiseParallel(use_local_output=True)
    if name in ("rowwise", "local_rowwise"):
        return RowwiseParallel(use_local_output=True)
    if name in _GATHERED:
        return ColwiseParallel(output_layouts=Replicate(), use_local_output=True)
    if name in _SPLIT_INPUT:
        return RowwiseParallel(input_layouts=Replicate(), use_local_output=True)
    if name == "embedding_rowwise":  # the vocabulary split; token ids arrive whole
        return RowwiseParallel(input_layouts=Replicate(), use_local_output=True)
    if name == "embedding_colwise":
        return ColwiseParallel(input_layouts=Replicate(), output_layouts=Replicate(), use_local_output=True)
    if name in _REPLICATED:
        return None
    raise ConfigurationError(
        f"the model's tensor-parallel plan uses the style {name!r} for {where}, which star_lightning does not apply; "
        "use --trainer.strategy.tensor_parallel_size 1 (or gpus_per_host to spread its layers)"
    )


def model_tp_plan(model_or_class: Any, config: Any) -> dict[str, str]:
    """The plan transformers ships for this model: module path pattern -> style (empty when it has none)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    prefix = getattr(model_or_class, "base_model_prefix", "model")
    plan = {
        f"{prefix}.{pattern}": style for pattern, style in (getattr(text, "base_model_tp_plan", None) or {}).items()
    }
    plan.update(getattr(model_or_class, "_tp_plan", None) or {})
    return plan


def check_tensor_parallel(config: Any, model_class: Any, size: int) -> None:
    """Before any weights are read: the model has a plan and its heads and MLP split evenly over ``size`` GPUs."""
    if size == 1:
        return
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text, "model_type", type(config).__name__)
    plan = model_tp_plan(model_class, config)
    if not plan:
        raise ConfigurationError(
            f"model type {model_type!r} ships no tensor-parallel plan; use --trainer.strategy.tensor_parallel_size 1, "
            "or --trainer.strategy.gpus_per_host to spread its layers over the host's GPUs"
        )
    for pattern, style in plan.items():
        _style(style, pattern)
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    intermediate = int(getattr(text, "intermediate_size", size))
    uneven = [f"{name} {count}" for name, count in (("attention heads", heads), ("key/value heads", kv_heads),
                                                     ("MLP width", intermediate)) if count % size]  # fmt: skip
    if uneven:
        raise ConfigurationError(
            f"tensor_parallel_size {size} does not divide the model's {', '.join(uneven)}; choose a "
            f"tensor_parallel_size that divides {kv_heads} (the key/value heads)"
        )


def apply_tensor_parallel(model: nn.Module, mesh: DeviceMesh) -> None:
    """Shard ``model`` in place over the 1-D tensor-parallel ``mesh`` by its own plan (each process keeps its shard
    of the weights it holds; norms and embeddings stay whole)."""
    config = getattr(model, "config", None)
    plan = {pattern: style for pattern, name in model_tp_plan(type(model), config).items()
            if (style := _style(name, pattern)) is not None}  # fmt: skip
    parallelize_module(model, mesh, plan, src_data_rank=None)


def local_key_heads(model: nn.Module, projection_path: str, heads: int) -> int:
    """How many key/value heads this process computes: all of them, or a ``1/T`` share when the plan splits the key
    projection's output over a mesh of ``T`` (a plan that gathers the output, as OLMo-2's, leaves them whole)."""
    weight = model.get_submodule(projection_path).weight
    mesh = getattr(weight, "device_mesh", None)
    if mesh is None:
        return heads
    pattern = re.sub(r"\.\d+\.", ".*.", projection_path)
    style = model_tp_plan(type(model), getattr(model, "config", None)).get(pattern)
    return heads // mesh.size() if style in ("colwise", "local_colwise") else heads
