"""``star-lightning plan``: per host memory and predicted times of a layout, before launch, from the config alone.

The options are predict's: ``--model.*`` are :class:`~star_lightning.module.StarAttentionLM`'s arguments,
``--trainer.strategy.*`` :class:`~star_lightning.parallel.strategy.StarStrategy`'s, ``--trainer.devices`` /
``num_nodes`` / ``accelerator``, and ``--config`` reads a predict config (its other keys -- data, output, the
trainer's other options -- are ignored). No weights are read: the model's ``config.json`` is enough.

Exit code 0 when every host fits its GPU, 2 when one does not (after printing the plan and the smallest changes that
fit) or when the layout cannot run at all.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from jsonargparse import ArgumentParser, Namespace, set_parsing_settings

from star_lightning.engine.settings import settings_from_options
from star_lightning.errors import ConfigurationError
from star_lightning.module import StarAttentionLM
from star_lightning.options import HOSTS_HELP, OneLineErrors, bad_value, check_devices, help_formatter
from star_lightning.parallel.strategy import StarStrategy
from star_lightning.parser_cache import ParserDescription, describe
from star_lightning.plan.costs import GIB, RUNTIME_RESERVE_BYTES
from star_lightning.plan.fit import Suggestion, describe_misfit, suggest_changes
from star_lightning.plan.hardware import (
    COLLECTIVE_LATENCY_S,
    GPUS_PER_NODE,
    INFINIBAND_BYTES_PER_S,
    NVLINK_BYTES_PER_S,
    GpuSpec,
    Interconnect,
    known_gpu,
    known_gpu_names,
    local_gpu,
    measure_rates,
    with_overrides,
)
from star_lightning.plan.hosts import Efficiency, Layout, Plan, Request, plan_request
from star_lightning.plan.shape import ModelShape

STRATEGY_PATH = f"{StarStrategy.__module__}.{StarStrategy.__name__}"
_TRAINER_KEYS = ("devices", "num_nodes", "accelerator", "strategy")
# The plan's own options, which a config may also hold.
_PLAN_KEYS = (
    "length", "query_tokens", "format", "gpu", "gpu_memory_gib", "matmul_flops", "copy_bytes_per_s", "measure",
    "reserve_gib", "gpus_per_node", "intra_node_bytes_per_s", "inter_node_bytes_per_s", "collective_latency_us",
    "phase1_efficiency", "decode_efficiency",
)  # fmt: skip


# ``--model.*`` options that choose how tokens are sampled or decoded, not what a host holds or how long it works:
# not offered (a predict config's values for them are ignored).
GENERATION_ONLY = ("temperature", "top_p", "seed", "stop_strings", "decode")


class PlanParser(OneLineErrors, ArgumentParser):
    """``plan``'s parser: an option error is one line (:mod:`star_lightning.options`), as ``predict``'s."""


def build_parser() -> ArgumentParser:
    parser = PlanParser(
        prog="star-lightning plan",
        description="Per-host memory and predicted times of a layout, from the model's config (no weights). "
        "Exits 2 when a host does not fit its GPU, naming the smallest changes that would. " + HOSTS_HELP,
        parser_mode="omegaconf+",
        formatter_class=help_formatter(),
    )
    parser.add_argument("--config", action="config", help="a predict config (configs/*.yaml); other keys ignored")
    parser.add_argument("--length", type=int, required=True, help="context tokens of the request (Phase 1)")
    parser.add_argument("--query_tokens", type=int, default=128, help="query tokens of the request (Phase 2)")
    parser.add_argument("--format", type=Literal["text", "json"], default="text", help="text or one JSON object")
    parser.add_class_arguments(StarAttentionLM, "model", skip=set(GENERATION_ONLY))
    parser.add_subclass_arguments(StarStrategy, "trainer.strategy", default={"class_path": STRATEGY_PATH})
    parser.add_argument(
        "--trainer.devices",
        type=int | str | list[int] | None,
        default=None,
        help="processes per node; unset: one request's group",
    )
    parser.add_argument("--trainer.num_nodes", type=int, default=1, help="nodes")
    parser.add_argument("--trainer.accelerator", type=str, default="auto", help="plan models GPUs (gpu/cuda/auto)")
    gpu = parser.add_argument_group("GPU and links (default: this machine's GPU, its rates measured once and cached)")
    gpu.add_argument("--gpu", type=str | None, default=None, help=f"take a known GPU's figures: {known_gpu_names()}")
    gpu.add_argument("--gpu_memory_gib", type=float | None, default=None, help="GPU memory (GiB), e.g. 79.6")
    gpu.add_argument("--matmul_flops", type=float | None, default=None, help="dense matmul rate, FLOP/s (7.92e14)")
    gpu.add_argument("--copy_bytes_per_s", type=float | None, default=None, help="device copy rate (read + write)")
    gpu.add_argument("--measure", type=bool, default=False, help="measure this machine's GPU again (not the cache)")
    gpu.add_argument("--reserve_gib", type=float, default=RUNTIME_RESERVE_BYTES / GIB, help="kept for the runtime")
    gpu.add_argument(
        "--gpus_per_node", type=int, default=GPUS_PER_NODE, help="GPUs per node (which links a group uses)"
    )
    gpu.add_argument("--intra_node_bytes_per_s", type=float, default=NVLINK_BYTES_PER_S, help="NVLink, one way")
    gpu.add_argument("--inter_node_bytes_per_s", type=float, default=INFINIBAND_BYTES_PER_S, help="between nodes")
    gpu.add_argument("--collective_latency_us", type=float, default=COLLECTIVE_LATENCY_S * 1e6, help="one collective")
    efficiency = Efficiency()
    gpu.add_argument("--phase1_efficiency", type=float, default=efficiency.phase1, help="of the matmul rate")
    gpu.add_argument("--decode_efficiency", type=float, default=efficiency.decode, help="of the copy rate")
    return parser


def describe_parser() -> ParserDescription:
    """``plan``'s parser described for the cache (:mod:`star_lightning.parser_cache`): help text and option names."""
    return describe(build_parser())


def _filtered_config(path: str) -> str:
    """The parts of a predict config the plan reads (model, the trainer's layout, its own options), as YAML."""
    file = Path(path)
    if not file.is_file():
        raise ConfigurationError(f"--config {path!r} is not a file; give a YAML config such as configs/ruler/*.yaml")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigurationError(f"--config {path!r} is not valid YAML: {error}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigurationError(f"--config {path!r} must be a mapping of options, got {type(data).__name__}")
    kept = {key: value for key, value in data.items() if key == "model" or key in _PLAN_KEYS}
    if isinstance(kept.get("model"), dict):
        kept["model"] = {key: value for key, value in kept["model"].items() if key not in GENERATION_ONLY}
    trainer = data.get("trainer") or {}
    if isinstance(trainer, dict):
        layout = {key: trainer[key] for key in _TRAINER_KEYS if key in trainer}
        if "strategy" in layout:
            layout["strategy"] = _strategy_value(layout["strategy"])
        if layout:
            kept["trainer"] = layout
    return yaml.safe_dump(kept)


def _strategy_value(value: Any) -> Any:
    """The star strategy's alias (``star``) as its class path; another strategy is refused (plan models star's)."""
    if isinstance(value, str):
        if value in ("star", STRATEGY_PATH, "star_lightning.StarStrategy"):
            return {"class_path": STRATEGY_PATH}
        raise ConfigurationError(
            f"trainer.strategy {value!r}: plan models the star strategy ({STRATEGY_PATH}); set --trainer.strategy star"
        )
    return value


def _normalize(argv: list[str]) -> list[str]:
    """``--config FILE`` -> the filtered config; ``--trainer.strategy star`` -> its class path."""
    out: list[str] = []
    items = iter(argv)
    for item in items:
        name, equals, value = item.partition("=")
        if name in ("--config", "--trainer.strategy") and not equals:
            value = next(items, "")
        if name == "--config" and value:
            out += ["--config", _filtered_config(value)]
        elif name == "--trainer.strategy" and value and not value.lstrip().startswith("{"):
            out += ["--trainer.strategy", json.dumps(_strategy_value(value))]
        else:
            out.append(item)
    return out


def _world_size(devices: Any, num_nodes: int) -> int | None:
    """Processes in the job from ``--trainer.devices`` x ``num_nodes``; None when devices is unset or automatic."""
    if devices is not None:
        check_devices(devices)
    if num_nodes <= 0:
        raise ConfigurationError(f"--trainer.num_nodes must be a positive number of nodes, got {num_nodes}")
    if devices is None or devices in ("auto", -1, "-1"):
        return None
    if isinstance(devices, str):
        parts = [p for p in devices.split(",") if p.strip()]
        count = int(parts[0]) if len(parts) == 1 and parts[0].strip().isdigit() else len(parts)
    elif isinstance(devices, list):
        count = len(devices)
    else:
        count = int(devices)
    return count * num_nodes


def _layout(cfg: Namespace) -> tuple[Layout, int]:
    """The layout of one request's group, checked by the strategy's own validator; and the data-parallel size."""
    model, init_args = cfg.model, dict(cfg.trainer.strategy.init_args)
    strategy = StarStrategy(**init_args)
    tensor_parallel = int(init_args.get("tensor_parallel_size") or 1)
    world = _world_size(cfg.trainer.devices, cfg.trainer.num_nodes)
    context_parallel = init_args.get("context_parallel_size")
    if context_parallel is not None and context_parallel < 1:  # it would make the world size, and be named as that
        raise bad_value("trainer.strategy.context_parallel_size", context_parallel, "a positive number of hosts")
    parallel = strategy.validate_layout(world if world is not None else (context_parallel or 1) * tensor_parallel)
    # The request settings predict builds, on this layout: what predict refuses, plan refuses with the same line.
    settings = settings_from_options(
        model, hosts=parallel.context_parallel_size, tensor_parallel_size=tensor_parallel,
        gpus_per_host=int(init_args.get("gpus_per_host") or 1),
    )  # fmt: skip
    layout = Layout.from_settings(settings)
    return layout, parallel.data_parallel_size


def _check_numbers(cfg: Namespace) -> None:
    """Figures that must be positive (a zero rate or memory would divide by zero, or fit nothing)."""
    for name in ("length", "query_tokens", "gpu_memory_gib", "matmul_flops", "copy_bytes_per_s", "gpus_per_node",
                 "intra_node_bytes_per_s", "inter_node_bytes_per_s"):  # fmt: skip
        value = cfg[name]
        if value is not None and value <= 0:
            raise ConfigurationError(f"--{name} must be positive, got {value}")
    for name in ("reserve_gib", "collective_latency_us"):
        if cfg[name] < 0:
            raise ConfigurationError(f"--{name} must not be negative, got {cfg[name]}")


def _check_positions(cfg: Namespace, config: Any) -> None:
    """The request must fit the positions the model can place, as ``predict`` checks each request: a plan of a
    request predict would refuse says so, before any planning."""
    from star_lightning.models import placeable_positions

    positions = placeable_positions(config)
    total = cfg.length + cfg.query_tokens + cfg.model.max_new_tokens
    if positions is not None and total > positions:
        longest = positions - cfg.query_tokens - cfg.model.max_new_tokens
        fix = f"lower --length to {longest} or less" if longest > 0 else "lower --query_tokens / --model.max_new_tokens"
        raise ConfigurationError(
            f"--length {cfg.length} + --query_tokens {cfg.query_tokens} + --model.max_new_tokens "
            f"{cfg.model.max_new_tokens} = {total} positions, more than the {positions} the model can place "
            f"(predict refuses such a request); {fix}, or plan a model with more positions"
        )


def _gpu(cfg: Namespace, dtype: str) -> GpuSpec:
    """The named GPU, else the one the figures given make, else this machine's; explicit figures override."""
    memory = None if cfg.gpu_memory_gib is None else int(cfg.gpu_memory_gib * GIB)
    gpu: GpuSpec | None
    if cfg.gpu is not None:
        gpu = known_gpu(cfg.gpu, dtype)
    elif memory is not None and cfg.matmul_flops is not None and cfg.copy_bytes_per_s is not None:
        gpu = GpuSpec("the GPU", memory, cfg.matmul_flops, cfg.copy_bytes_per_s, "given")
    elif cfg.measure:
        gpu = measure_rates(dtype=dtype, use_cache=False)
    else:
        gpu = local_gpu(dtype)
    if gpu is None:
        if memory is None:
            raise ConfigurationError(
                "no CUDA GPU on this machine: name the GPU the job runs on (--gpu "
                f"{'/'.join(known_gpu_names())}) or give --gpu_memory_gib (and --matmul_flops, --copy_bytes_per_s "
                "for the times)"
            )
        gpu = GpuSpec("the GPU", memory, None, None, "given")
    return with_overrides(
        gpu, memory_bytes=memory, matmul_flops=cfg.matmul_flops, copy_bytes_per_s=cfg.copy_bytes_per_s
    )


def _model_config(cfg: Namespace) -> tuple[str, Any]:
    from star_lightning.models import check_attention_servable, load_config, resolve_pretrained

    if cfg.model.pretrained is None:
        from star_lightning.assets import default_model_path

        source = str(default_model_path())
    else:
        source = resolve_pretrained(cfg.model.pretrained)
    config = load_config(source, trust_remote_code=cfg.model.trust_remote_code)
    if cfg.model.attention != "dense" and not cfg.model.trust_remote_code:
        check_attention_servable(config)
    return source, config


def _ranges(indices: tuple[int, ...]) -> str:
    """``(0, 1, 2, 5)`` -> ``0-2,5``."""
    parts: list[str] = []
    start = previous = None
    for index in (*indices, None):
        if previous is not None and index == previous + 1:
            previous = index
            continue
        if start is not None:
            parts.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = index
    return ",".join(parts)


def _seconds(value: float | None, unit: str = "s", scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f} {unit}"


def render_text(plan: Plan, suggestions: list[Suggestion], source: str, data_parallel: int) -> str:
    shape, layout, request, gpu = plan.shape, plan.layout, plan.request, plan.gpu
    method: str = layout.method
    if method == "star":
        anchor = f"anchor {plan.anchor_length:,} tokens ({layout.anchor_source})" if plan.anchor_length else "no anchor"
        method = f"star, block {layout.block_size:,}, {anchor}"
    elif method == "ring":
        method = f"ring ({layout.ring_layout})"
    per_host = []
    if layout.tensor_parallel_size > 1:
        per_host.append(f"tensor parallel {layout.tensor_parallel_size}")
    if layout.gpus_per_host > 1:
        per_host.append(f"layers over {layout.gpus_per_host} GPUs")
    rates = (
        f"{gpu.matmul_flops / 1e12:.0f} TFLOP/s, copy {gpu.copy_bytes_per_s / 1e12:.2f} TB/s"
        if gpu.matmul_flops is not None and gpu.copy_bytes_per_s is not None
        else "rates unknown (give --gpu or --matmul_flops/--copy_bytes_per_s for times)"
    )
    per_gpu = " per GPU" if layout.tensor_parallel_size * layout.gpus_per_host > 1 else ""
    lines = [
        f"model: {source} ({shape.model_type}, {shape.total_params / 1e9:.2f}B parameters"
        f"{'' if shape.exact else ' counted as a Llama-like decoder'}, {shape.dtype})",
        f"request: {request.context_tokens:,} context + {request.query_tokens:,} query + "
        f"{request.max_new_tokens:,} new tokens",
        f"layout: {method}; {layout.hosts} host(s){' (' + ', '.join(per_host) + ')' if per_host else ''}, "
        f"{layout.gpus_per_request} GPU(s) per request, {data_parallel} request(s) at a time",
        f"GPU: {gpu.name}, {gpu.memory_gib:.1f} GiB ({plan.reserve_bytes / GIB:.1f} kept for the runtime), {rates}"
        f" [{gpu.source}]",
        "",
        f"GiB{per_gpu}: KV = context + anchor (Phase 1 only) + query/new tokens; peak = weights + KV + activations",
        f"{'host':>4}  {'blocks':<12} {'tokens':>9} {'KV':>7} {'(ctx + anchor + new)':<22} {'weights':>7} "
        f"{'act.':>6} {'peak':>7}  {'Phase 1':>9}  fits",
    ]
    for host in plan.hosts:
        parts = (
            f"({host.kv_context_bytes / GIB:.2f} + {host.kv_anchor_bytes / GIB:.2f} + {host.kv_query_bytes / GIB:.2f})"
        )
        lines.append(
            f"{host.host:>4}  {_ranges(host.blocks):<12} {host.context_tokens:>9,} {host.kv_bytes / GIB:>7.2f} "
            f"{parts:<22} {host.weight_bytes / GIB:>7.2f} {host.activation_bytes / GIB:>6.2f} "
            f"{host.peak_bytes / GIB:>7.2f}  {_seconds(host.phase1_s):>9}  {'yes' if host.fits else 'NO'}"
        )
    lines += [
        "",
        f"predicted: Phase 1 {_seconds(plan.predicted_phase1_s)} (floor {_seconds(plan.phase1_floor_s)}), "
        f"TTFT {_seconds(plan.predicted_ttft_s)}, decode {_seconds(plan.predicted_decode_ms_per_token, 'ms', 1, 1)}"
        f"/token (floor {_seconds(plan.decode_floor_ms, 'ms', 1, 1)})",
    ]
    fullest = plan.fullest
    if plan.fits:
        lines.append(
            f"fits: the fullest host ({fullest.host}) peaks at {fullest.peak_bytes / GIB:.1f} GiB{per_gpu} of "
            f"{plan.usable_bytes / GIB:.1f} usable"
        )
    else:
        lines.append(f"does not fit: {describe_misfit(plan)}")
        if suggestions:
            lines.append("smallest changes that fit:")
            lines += [f"  {s.text()}" for s in suggestions]
        else:
            lines.append(
                "no layout of more hosts, smaller blocks or more GPUs per host fits; use GPUs with more memory"
            )
    return "\n".join(lines)


def run(argv: list[str]) -> int:
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    parser = build_parser()
    try:
        cfg = parser.parse_args(_normalize(argv))
    except ConfigurationError:
        raise
    except Exception as error:  # what reaches past jsonargparse's error(): an interpolation that cannot resolve
        message = " ".join(str(error).split())
        raise ConfigurationError(f"{message} (star-lightning plan --help lists the options)") from None
    _check_numbers(cfg)
    if str(cfg.trainer.accelerator).lower() in ("cpu", "mps", "tpu"):
        raise ConfigurationError(
            f"plan predicts GPU runs; --trainer.accelerator is {cfg.trainer.accelerator!r}. Plan for the GPUs the job "
            "will use (--trainer.accelerator gpu, --gpu NAME)"
        )
    layout, data_parallel = _layout(cfg)
    source, config = _model_config(cfg)
    _check_positions(cfg, config)
    dtype = "bfloat16" if cfg.model.dtype == "auto" else cfg.model.dtype
    shape = ModelShape.from_config(config, dtype)
    gpu = _gpu(cfg, shape.dtype)
    plan = plan_request(
        shape,
        layout,
        Request(cfg.length, cfg.query_tokens, cfg.model.max_new_tokens),
        gpu,
        interconnect=Interconnect(
            intra_node_bytes_per_s=cfg.intra_node_bytes_per_s,
            inter_node_bytes_per_s=cfg.inter_node_bytes_per_s,
            collective_latency_s=cfg.collective_latency_us * 1e-6,
            gpus_per_node=cfg.gpus_per_node,
        ),
        efficiency=Efficiency(phase1=cfg.phase1_efficiency, decode=cfg.decode_efficiency),
        reserve_bytes=int(cfg.reserve_gib * GIB),
    )
    max_tensor_parallel = cfg.gpus_per_node
    suggestions = suggest_changes(shape, plan, max_tensor_parallel=max_tensor_parallel)
    if cfg.format == "json":
        record = plan.record()
        record["model"]["pretrained"] = source
        record["layout"]["data_parallel_size"] = data_parallel
        record["suggestions"] = [s.record() for s in suggestions]
        print(json.dumps(record, indent=1))
    else:
        print(render_text(plan, suggestions, source, data_parallel))
    if not plan.fits:
        if cfg.format == "json":  # stdout is the JSON object; the reason goes to stderr as one line
            print(f"star-lightning plan: the layout does not fit: {describe_misfit(plan)}", file=sys.stderr)
        return 2
    return 0
