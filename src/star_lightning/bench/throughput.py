"""Throughput of ``star-lightning predict`` as a user runs it: one record per (model, attention, context length).

The figures come from the run itself: ``predict`` logs every request's scalars to TensorBoard (``request/*``,
:mod:`star_lightning.callbacks.profiling`), each with the wall-clock time it was written; they are read back here
with TensorBoard's own reader. What the process costs as a whole is its wall time from launch to exit.

- ``wall_s``: the command's wall time, launch to exit;
- ``startup_s``: from launch to the start of the first request (the first request's scalars are written when it
  ends; its own phases, ``phase1_s + query_s + decode_setup_s + decode_s``, are taken off);
- ``startup_parts``: where the process's start-up went, as it logged it (``startup/*``, :mod:`star_lightning.startup`:
  ``imports_s``, ``parse_s``, ``checks_s``, ``model_load_s``, ``to_first_request_s``, ...), ``{}`` if it logged none;
- ``per_request_s``: the median time between two requests' scalars: everything a request costs in steady state
  (tokenization, the phases, writing its prediction);
- ``phase1_s``, ``query_s``, ``decode_setup_s``, ``decode_ms_per_token``, ``new_tokens``: the medians of the
  requests' own figures, over the same steady-state requests as ``per_request_s`` (all but the first, which pays
  the captures and compiles; the first alone in a run of one request);
- ``compute_floor_s``: one median request's FLOPs over the measured matmul rate plus its decode bytes over the copy
  rate (:mod:`star_lightning.plan`'s shapes, forwards, costs and rates), counting a sliding-window layer's keys
  only within its window (None without rates: on a CPU); ``phase1_floor_s``: its Phase 1 part;
- ``variant``: the label of the run's extra ``predict`` options (``predict_args``), "" for none;
- ``gpu``: the device's name.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from star_lightning.engine.settings import StarSettings
from star_lightning.plan import GpuSpec, Layout, ModelShape
from star_lightning.plan.costs import attention_flops, causal_pairs, linear_flops
from star_lightning.plan.hosts import assign

RECORD_FIELDS = (
    "model",
    "attention",
    "variant",
    "predict_args",
    "seq_len",
    "requests",
    "wall_s",
    "startup_s",
    "startup_parts",
    "per_request_s",
    "phase1_s",
    "query_s",
    "decode_setup_s",
    "decode_ms_per_token",
    "new_tokens",
    "compute_floor_s",
    "phase1_floor_s",
    "gpu",
)


@dataclass(frozen=True)
class RequestScalars:
    """One request's TensorBoard scalars (``request/<name>``) and when they were written (seconds since the epoch)."""

    index: int
    wall_time: float
    values: dict[str, float]


def read_run(log_dir: str | Path) -> tuple[list[RequestScalars], dict[str, float]]:
    """A run's TensorBoard events under ``log_dir``, read once with TensorBoard's own reader (every scalar kept): its
    requests (:func:`_requests`) and its start-up parts (:func:`_startup`)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return _requests(events), _startup(events)


def _requests(events: Any) -> list[RequestScalars]:
    """Every request the run logged (``request/<name>`` scalars), in the order they were written."""
    tags = [tag for tag in events.Tags().get("scalars", []) if tag.startswith("request/")]
    by_step: dict[int, RequestScalars] = {}
    for tag in tags:
        for event in events.Scalars(tag):
            known = by_step.get(event.step)
            values = {} if known is None else known.values
            values[tag.removeprefix("request/")] = float(event.value)
            wall = event.wall_time if known is None else max(known.wall_time, event.wall_time)
            by_step[event.step] = RequestScalars(event.step, wall, values)
    return sorted(by_step.values(), key=lambda request: request.wall_time)


def _startup(events: Any) -> dict[str, float]:
    """The run's start-up parts (``startup/<part>`` scalars, logged once) as ``{part: seconds}``."""
    tags = [tag for tag in events.Tags().get("scalars", []) if tag.startswith("startup/")]
    return {tag.removeprefix("startup/"): round(float(events.Scalars(tag)[0].value), 3) for tag in sorted(tags)}


def _engine_seconds(request: RequestScalars) -> float:
    """The request's own phases, as the engine timed them."""
    values = request.values
    return sum(values.get(name, 0.0) for name in ("phase1_s", "query_s", "decode_setup_s", "decode_s"))


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(requests: list[RequestScalars], launched_at: float, ended_at: float) -> dict[str, Any]:
    """``requests``, ``wall_s``, ``startup_s``, ``per_request_s``, ``phase1_s``, ``decode_ms_per_token`` of a run
    launched at ``launched_at`` and ended at ``ended_at`` (seconds since the epoch)."""
    summary: dict[str, Any] = {"requests": len(requests), "wall_s": ended_at - launched_at}
    if not requests:
        return summary
    first = requests[0]
    intervals = [b.wall_time - a.wall_time for a, b in itertools.pairwise(requests)]
    steady = requests[1:] or requests  # the requests per_request_s's intervals end with
    decode = [1000.0 / r.values["decode_tokens_per_s"] for r in steady if r.values.get("decode_tokens_per_s", 0) > 0]
    return {
        **summary,
        "startup_s": first.wall_time - launched_at - _engine_seconds(first),
        "per_request_s": _median(intervals) if intervals else _engine_seconds(first),
        "phase1_s": _median([r.values.get("phase1_s", 0.0) for r in steady]),
        "query_s": _median([r.values.get("query_s", 0.0) for r in steady]),
        "decode_setup_s": _median([r.values.get("decode_setup_s", 0.0) for r in steady]),
        "decode_ms_per_token": _median(decode),
        "new_tokens": _median([r.values.get("new_tokens", 0.0) for r in steady]),
    }


def median_request(requests: list[RequestScalars]) -> tuple[int, int]:
    """``(context tokens, new tokens)`` of the median request."""
    contexts = sorted(int(r.values.get("context_tokens", 0)) for r in requests)
    new = sorted(int(r.values.get("new_tokens", 0)) for r in requests)
    return contexts[len(contexts) // 2], new[len(new) // 2]


def window_layers(config: Any) -> tuple[int, int | None]:
    """How many layers attend through a sliding window, and its size (``layer_types``, or every layer for a plain
    ``sliding_window`` as in Mistral)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(text, "sliding_window", None)
    if not isinstance(window, int) or window <= 0:
        return 0, None
    types = getattr(text, "layer_types", None)
    if types:
        return sum(1 for kind in types if "sliding" in str(kind)), window
    return int(text.num_hidden_layers), window


def _windowed_pairs(tokens: int, window: int) -> int:
    """Visible pairs of ``tokens`` causal tokens when each sees only its last ``window`` positions."""
    reach = min(tokens, window)  # the first ``window`` tokens see every token before them
    return causal_pairs(reach) + (tokens - reach) * window


def compute_floor_s(
    config: Any,
    attention: str,
    context_tokens: int,
    new_tokens: int,
    block_size: int,
    gpu: GpuSpec,
    dtype: str = "bfloat16",
) -> float | None:
    """One request's floor on ``gpu``: Phase 1's FLOPs (the forwards the plan assigns one host) over the matmul rate
    (:func:`phase1_floor_s`), plus each decode step's bytes (the weights, the keys in reach) over the copy rate."""
    phase1 = phase1_floor_s(config, attention, context_tokens, block_size, gpu, dtype)
    if phase1 is None or gpu.copy_bytes_per_s is None:
        return None
    shape = ModelShape.from_config(config, dtype)
    windowed, window = window_layers(config)
    reach = (shape.layers - windowed) * context_tokens + windowed * min(context_tokens, window or context_tokens)
    step_bytes = shape.decode_weight_bytes + shape.kv_bytes_per_token_layer * reach
    return phase1 + max(0, new_tokens - 1) * step_bytes / gpu.copy_bytes_per_s


def phase1_floor_s(
    config: Any, attention: str, context_tokens: int, block_size: int, gpu: GpuSpec, dtype: str = "bfloat16"
) -> float | None:
    """Phase 1's floor on ``gpu``: the FLOPs of the forwards the plan assigns one host over the matmul rate. A
    sliding-window layer's pairs are counted within each forward's own tokens and its window (so the floor stays a
    lower bound)."""
    if gpu.matmul_flops is None:
        return None
    shape = ModelShape.from_config(config, dtype)
    windowed, window = window_layers(config)
    global_layers = shape.layers - windowed
    layout = Layout.from_settings(
        StarSettings(attention="star" if attention == "star" else "dense", block_size=block_size)
    )
    flops = 0.0
    for forward in assign(layout, context_tokens).forwards[0]:
        window_pairs = _windowed_pairs(forward.tokens, window) if window else 0
        flops += linear_flops(shape, forward.tokens)
        flops += attention_flops(shape, global_layers * forward.pairs + windowed * window_pairs) / shape.layers
    return flops / gpu.matmul_flops


def record(
    model: str,
    attention: str,
    seq_len: int,
    summary: dict[str, Any],
    floors: tuple[float | None, float | None],
    gpu: str,
    variant: tuple[str, str] = ("", ""),
) -> dict[str, Any]:
    """One record with exactly :data:`RECORD_FIELDS`; ``floors``: the request's and its Phase 1's; ``variant``: the
    label and the extra ``predict`` options."""
    values = {"model": model, "attention": attention, "seq_len": seq_len, **summary, "gpu": gpu}
    values.update(compute_floor_s=floors[0], phase1_floor_s=floors[1], variant=variant[0], predict_args=variant[1])
    return {name: values.get(name) for name in RECORD_FIELDS}


def device_gpu(device: str) -> GpuSpec:
    """The GPU's name and measured rates (measured once per GPU and cached, :func:`star_lightning.plan.local_gpu`);
    a CPU has a name and no rates."""
    import platform

    if device == "gpu":
        from star_lightning.plan import local_gpu

        gpu = local_gpu()
        if gpu is None:
            raise SystemExit("--device gpu, but torch sees no CUDA GPU")
        return gpu
    return GpuSpec(platform.processor() or "cpu", 0, None, None, "no rates on CPU")


def model_config(path: str) -> Any:
    """The config of a model folder or GGUF file (``""``: the shipped model)."""
    from star_lightning.models import load_config

    if not path:
        from star_lightning.assets import default_model_path

        path = str(default_model_path())
    return load_config(path)


def placeable_length(config: Any) -> int | None:
    """The longest prompt the model can place (None: no limit)."""
    from star_lightning.models import placeable_positions

    return placeable_positions(config)


def write_random_model(folder: str | Path, tokenizer_source: str) -> None:
    """A Llama-3.1-8B-shaped model with random weights (bf16 safetensors, made on the GPU) and the tokenizer of
    ``tokenizer_source`` in ``folder``, once (an existing complete folder is kept): the benchmark shape of
    ``scripts/benchmark.py``, loaded from local disk as a user's model is."""
    import torch

    from star_lightning.bench.speed import llama_8b_config
    from star_lightning.models import build_model, load_tokenizer

    target = Path(folder)
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return
    tokenizer = load_tokenizer(tokenizer_source)
    config = llama_8b_config()
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(config, dtype=torch.bfloat16, device=device, attention="dense")
    model.save_pretrained(target, max_shard_size="5GB")
    tokenizer.save_pretrained(target)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
