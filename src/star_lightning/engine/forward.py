"""What every phase shares: one forward of the model, positions, the model's facts, syncs and phase names.

A phase (:mod:`.prefill`, :mod:`.decode`) is a few lines around :func:`forward`: it builds one
:class:`~star_lightning.attention.step.ForwardStep` and runs the model once (gpt-fast's ``prefill`` /
``decode_one_token``), so it can be timed, profiled, compiled or captured from outside.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.profiler import record_function
from transformers import DynamicCache, PretrainedConfig

from star_lightning.attention.star import ATTENTION_NAME
from star_lightning.attention.step import ForwardStep

# Names of the phases in PyTorch profiler traces (``--trainer.profiler pytorch``).
PHASE1, PHASE2_QUERY, PHASE2_DECODE = "star_lightning/phase1", "star_lightning/phase2_query", "star_lightning/decode"

PhaseListener = Callable[[str], None]


@contextmanager
def phase(name: str, on_phase: PhaseListener | None) -> Iterator[None]:
    """A named range in profiler traces, announced to ``on_phase``."""
    if on_phase is not None:
        on_phase(name)
    with record_function(name):
        yield


def model_devices(model: nn.Module) -> list[torch.device]:
    """The devices holding the model's weights: one, or the GPUs of a host the layers are spread over."""
    return sorted({param.device for param in model.parameters()}, key=str)


def synchronize(devices: list[torch.device]) -> None:
    for device in devices:
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def forward(
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


def dense_forward(model: nn.Module, ids: Tensor, positions: Tensor, cache: DynamicCache) -> Tensor:
    """One forward of the model's own attention over its own cache; the last logits ``[V]``."""
    output = model(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return output.logits[0, -1]  # [V]


def position_ids(start: int, stop: int, device: torch.device) -> Tensor:
    return torch.arange(start, stop, device=device).unsqueeze(0)  # [1, L]


def model_config(model: nn.Module) -> PretrainedConfig:
    config = getattr(model, "config", None)
    if not isinstance(config, PretrainedConfig):
        raise TypeError(f"{type(model).__name__} is not a transformers model (it has no PretrainedConfig)")
    return config


def num_layers(model: nn.Module) -> int:
    return int(model_config(model).get_text_config().num_hidden_layers)


def kv_shape(model: nn.Module) -> tuple[int, int]:
    """``(KV heads, head dim)`` of one attention layer on this process (the anchor's receive buffers need them before
    the forward that fills them): the config's, or, with the heads split over tensor-parallel GPUs, this GPU's share
    (:func:`star_lightning.parallel.tensor_parallel.local_key_heads`)."""
    config = model_config(model).get_text_config()
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
    config = model_config(model).get_text_config()
    heads = int(config.num_attention_heads)
    return heads // int(getattr(config, "num_key_value_heads", None) or heads)


def model_dtype_and_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    parameter = next(model.parameters())
    return parameter.dtype, parameter.device


def uses_star_attention(model: nn.Module) -> bool:
    """Whether the model's attention is Star Attention's function (dense: the model was servable)."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) == ATTENTION_NAME


def reset_peak_memory(devices: list[torch.device]) -> None:
    for device in devices:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(devices: list[torch.device]) -> int:
    """The host's peak: allocated memory summed over its GPUs, or the process's resident set on CPU."""
    if devices[0].type == "cuda":
        return sum(int(torch.cuda.max_memory_allocated(device)) for device in devices)
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
