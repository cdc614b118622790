"""Speed records of ``scripts/benchmark.py``: one per (method, layout, hosts, length), and their tables and plot.

A record holds what was measured (per-host Phase 1 seconds, time to first token, decode ms per token, total,
peak memory) beside the cost model's floors and predictions for the same plan (:mod:`star_lightning.plan`), so
every figure sits next to the hardware floor and the prediction it can be checked against. Simulated records (each
host's Phase 1 run in turn on one GPU, :mod:`star_lightning.engine.simulate`) add the communication the cost model says
cannot hide behind compute, at its stated link speeds, and the Phase 2 collectives' latency per layer; they say
``"simulated": true``.
"""

from __future__ import annotations

import platform
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from star_lightning.engine.request import RequestStats
from star_lightning.engine.settings import StarSettings
from star_lightning.plan import Efficiency, GpuSpec, Interconnect, Layout, ModelShape, Request, known_gpu, plan_request
from star_lightning.plan.hardware import measure_rates

GIB = 1024**3


def llama_8b_config() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(  # Llama-3.1-8B's numbers
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
        vocab_size=128256, max_position_embeddings=1048576, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
    )  # fmt: skip


def tiny_config() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=128, vocab_size=256, max_position_embeddings=1 << 20)  # fmt: skip


def versions() -> dict[str, str]:
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
        out["cudnn"] = str(torch.backends.cudnn.version())
        out["nccl"] = ".".join(str(x) for x in torch.cuda.nccl.version())
    return out


def environment(device: torch.device, *, tiny: bool, rates: str, nprocs: int, command: str) -> dict[str, Any]:
    """The machine, its measured (or tabled) rates and the command: what every record of the run shares."""
    if device.type == "cuda":
        gpu = measure_rates(device, use_cache=False) if rates == "measure" else known_gpu(torch.cuda.get_device_name())
    else:
        gpu = GpuSpec(platform.processor() or "cpu", 0, None, None, "no rates on CPU")
    return {
        "device": device,
        "gpu": gpu.name,
        "rates": {"matmul_flops": gpu.matmul_flops, "copy_bytes_per_s": gpu.copy_bytes_per_s, "source": gpu.source},
        "gpu_spec": gpu,
        "versions": versions(),
        "nprocs": nprocs,
        "tiny": tiny,
        "command": command,
        "interconnect": Interconnect(),
    }


def _layout(star: StarSettings, hosts: int) -> Layout:
    """The planned layout of a measured request: its settings on ``hosts`` hosts (played ones included)."""
    return Layout.from_settings(replace(star, simulated_hosts=1).with_hosts(hosts))


def make_record(
    env: dict[str, Any],
    star: StarSettings,
    hosts: int,
    length: int,
    measured: Any,
    *,
    failure: str | None = None,
    tokens: list[int] | None = None,
    queries: list[RequestStats] | None = None,
) -> dict[str, Any]:
    """One record from a simulated request (``SimulatedRequest``), the hosts' stats of a real one (a list of
    ``RequestStats`` in host order), or a dense one (``GenerationResult``); ``queries``: K answers over one kept
    context (Phase 1 counted once)."""
    gpu: GpuSpec = env["gpu_spec"]
    interconnect: Interconnect = env["interconnect"]
    shape = ModelShape.from_config(env["model_config"], env["dtype"])
    layout = _layout(star, hosts)
    query_tokens, new_tokens = env["query_tokens"], env["new_tokens"]
    plan = plan_request(shape, layout, Request(length, query_tokens, new_tokens), gpu, interconnect=interconnect)
    record: dict[str, Any] = {
        "method": star.attention,
        "anchor_source": star.anchor_source if star.attention == "star" else None,
        "anchor_query": star.anchor_query if star.attention == "star" else None,
        "passing_tokens": star.passing_tokens if star.attention == "star" else None,
        "ring_layout": star.ring_layout if star.attention == "ring" else None,
        "hosts": hosts,
        "seq_len": length,
        "block_size": star.block_size if star.attention == "star" else None,
        "anchor_block_size": plan.anchor_length if star.attention == "star" else None,
        "query_tokens": query_tokens,
        "new_tokens": new_tokens,
        "gpu": env["gpu"],
        "phase1_floor_s": plan.phase1_floor_s,
        "decode_floor_ms": plan.decode_floor_ms,
        "predicted_phase1_s": plan.predicted_phase1_s,
        "predicted_ttft_s": plan.predicted_ttft_s,
        "predicted_decode_ms_per_token": plan.predicted_decode_ms_per_token,
        "predicted_peak_gib": plan.predicted_peak_gib,
        "predicted_phase1_bytes": sum(host.phase1_bytes for host in plan.hosts),
    }
    if failure is not None or measured is None:
        record.update(failure=failure or "not run", simulated=hasattr(measured, "hop_bytes"))
        record["summary"] = f"{_name(record)} L={length} H={hosts}: {record['failure']}"
        return record
    if hasattr(measured, "phase1_host_s"):
        record.update(_simulated(measured, plan, shape, layout, length, env, queries))
    elif isinstance(measured, list):
        record.update(_real(measured))
    else:
        record.update(_real([measured.stats]))
        tokens = measured.token_ids
    record["tokens"] = (tokens if tokens is not None else getattr(measured, "token_ids", []))[:8]
    if record.get("phase1_s"):
        record["phase1_fraction_of_matmul"] = (plan.phase1_floor_s or 0.0) / record["phase1_s"]
    record["summary"] = (
        f"{_name(record)} L={length} H={hosts}{' (simulated)' if record['simulated'] else ''}: "
        f"phase1 {record['phase1_s']:.3f}s (floor {plan.phase1_floor_s or 0:.3f}, predicted "
        f"{plan.predicted_phase1_s or 0:.3f}) ttft {record['ttft_s']:.3f}s "
        f"decode {record['decode_ms_per_token']:.2f}ms "
        f"(floor {plan.decode_floor_ms or 0:.2f}) total {record['total_s']:.2f}s peak {record['peak_mem_gib']:.1f}GiB "
        f"(predicted {plan.predicted_peak_gib:.1f})"
    )
    return record


def _name(record: dict[str, Any]) -> str:
    if record["method"] == "star":
        anchor = record.get("anchor_block_size")
        short = f" anchor {_k(anchor)}" if anchor and anchor != record.get("block_size") else ""
        query_aware = " +aq" if record.get("anchor_query") else ""
        query_aware += f" +pt{record['passing_tokens']}" if record.get("passing_tokens") else ""
        return f"star/{record['anchor_source']}{short}{query_aware}"
    if record["method"] == "ring":
        return f"ring/{record['ring_layout']}"
    return "dense"


def _real(per_host: list[RequestStats]) -> dict[str, Any]:
    """Every host ran for real: Phase 1 ends with the slowest host; the rest is the query host's clock."""
    query = per_host[-1]
    return {
        "simulated": False,
        "phase1_s": max(stats.phase1_s for stats in per_host),
        "phase1_host_s": [stats.phase1_s for stats in per_host],
        "phase1_bytes": sum(stats.phase1_bytes for stats in per_host),
        "phase2_bytes": sum(stats.phase2_bytes for stats in per_host),
        "ttft_s": query.ttft_s,
        "decode_ms_per_token": query.decode_ms_per_token,
        "decode_mode": query.decode_mode,
        "total_s": query.total_s,
        "peak_mem_gib": max(stats.peak_mem_bytes for stats in per_host) / GIB,
        "peak_mem_gib_per_host": [stats.peak_mem_bytes / GIB for stats in per_host],
    }


def _simulated(
    sim: Any,
    plan: Any,
    shape: ModelShape,
    layout: Layout,
    length: int,
    env: dict[str, Any],
    queries: list[RequestStats] | None,
) -> dict[str, Any]:
    """Measured per-host Phase 1 compute plus the communication the cost model says stays exposed for that compute
    (re-planned at each host's achieved rate); Phase 2 measured on the query host plus one collective latency per
    layer (query) and per layer and token (decode)."""
    interconnect: Interconnect = env["interconnect"]
    request = Request(length, env["query_tokens"], env["new_tokens"])
    comm: list[float | None] = []
    for host, measured in enumerate(sim.phase1_host_s):
        floor = plan.hosts[host].phase1_floor_s
        if measured is None or not floor or env["gpu_spec"].matmul_flops is None:
            comm.append(None if measured is None else 0.0)
            continue
        efficiency = Efficiency(phase1=min(1.0, floor / measured))
        at_rate = plan_request(
            shape, layout, request, env["gpu_spec"], interconnect=interconnect, efficiency=efficiency
        )
        comm.append(at_rate.hosts[host].phase1_comm_s or 0.0)
    host_s = [None if t is None else t + (c or 0.0) for t, c in zip(sim.phase1_host_s, comm, strict=True)]
    phase1 = max(t for t in host_s if t is not None)
    latency = interconnect.collective_latency_s if sim.hosts > 1 else 0.0
    phase2 = sim.phase2
    query_s = phase2.query_s + shape.layers * latency
    decode_ms = phase2.decode_ms_per_token + 1e3 * (shape.layers + 1) * latency
    steps = max(0, phase2.new_tokens - 1)
    total = phase1 + query_s + phase2.decode_setup_s + steps * decode_ms / 1e3
    out: dict[str, Any] = {
        "simulated": True,
        "phase1_s": phase1,
        "phase1_host_s": host_s,
        "phase1_host_compute_s": sim.phase1_host_s,
        "phase1_host_comm_s": comm,
        "phase1_bytes": sum(b for b in sim.phase1_host_bytes if b is not None),
        "phase1_host_bytes": sim.phase1_host_bytes,
        "hosts_run": [h for h, t in enumerate(sim.phase1_host_s) if t is not None],
        "ttft_s": phase1 + query_s,
        "decode_ms_per_token": decode_ms,
        "decode_ms_per_token_measured": phase2.decode_ms_per_token,
        "decode_mode": phase2.decode_mode,
        "collective_latency_s": latency,
        "link_bytes_per_s": interconnect.link_bytes_per_s(layout.gpus_per_request),
        "total_s": total,
        "peak_mem_gib": max((b or 0) for b in sim.peak_host_bytes) / GIB,
        "peak_mem_gib_per_host": [None if b is None else b / GIB for b in sim.peak_host_bytes],
    }
    if queries is not None:
        answers = [q.query_s + shape.layers * latency + q.decode_setup_s
                   + max(0, q.new_tokens - 1) * (q.decode_ms_per_token / 1e3 + (shape.layers + 1) * latency)
                   for q in queries]  # fmt: skip
        out["queries_per_context"] = len(queries)
        out["total_s"] = phase1 + sum(answers)
        out["single_request_s"] = total
        out["answer_s_median"] = statistics.median(answers) if answers else 0.0
        out["total_over_single"] = out["total_s"] / total
        out["goal_total_over_single"] = 1 + 0.1 * len(queries)
    return out


# --------------------------------------------------------------------------------------------------------- report


def _fmt(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _k(tokens: int) -> str:
    if tokens % 1048576 == 0:
        return f"{tokens // 1048576}M"
    return f"{tokens // 1024}K" if tokens % 1024 == 0 else str(tokens)


def render(payload: dict[str, Any], out: Path) -> None:
    """``results.md`` (one table per context length, star against the zigzag ring) and ``results.png``."""
    env, records = payload["environment"], [r for r in payload["records"] if "queries_per_context" not in r]
    reuse = [r for r in payload["records"] if "queries_per_context" in r]
    rates = env["rates"]
    lines = [
        "# Star vs ring vs dense: seconds per request",
        "",
        f"GPU: {env['gpu']}; {env['versions']}. Measured in this run: bf16 matmul "
        f"{_fmt((rates['matmul_flops'] or 0) / 1e12, 0)} TFLOP/s, "
        f"device copy {_fmt((rates['copy_bytes_per_s'] or 0) / 1e12)} TB/s. Command: `{env['command']}`.",
        "",
        "Simulated (`sim`): each host's Phase 1 run in turn on this one GPU (exact for Phase 1: hosts do not "
        "communicate but for the anchor or the ring's K/V), plus the communication the cost model says cannot hide "
        "behind that compute (NVLink 450 GB/s within a node of 8 GPUs, 400 Gb/s InfiniBand 50 GB/s across nodes), "
        "and 42 us per Phase 2 collective (an all-gather measured on 4 H200). Floors: Phase 1 FLOPs of the busiest "
        "host / matmul rate; decode (weights + local KV) / copy rate.",
    ]
    for length in sorted({r["seq_len"] for r in records}):
        rows = sorted((r for r in records if r["seq_len"] == length), key=lambda r: (r["hosts"], _name(r)))
        lines += ["", f"## {_k(length)} tokens", "",
                  "| method | hosts | sim | Phase 1 s (floor, predicted) | TTFT s (predicted) | decode ms/tok (floor) "
                  "| total s | peak GiB (predicted) | vs zigzag ring (TTFT) |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in rows:
            if "failure" in r:
                lines.append(
                    f"| {_name(r)} | {r['hosts']} | {'yes' if r.get('simulated') else 'no'} | {r['failure']} "
                    f"(predicted {_fmt(r['predicted_phase1_s'])}) | (predicted {_fmt(r['predicted_ttft_s'])}) | | | "
                    f"(predicted {_fmt(r['predicted_peak_gib'], 1)}) | |"
                )
                continue
            ring = next(
                (x for x in rows if _name(x) == "ring/zigzag" and x["hosts"] == r["hosts"] and "ttft_s" in x), None
            )
            speedup = f"{ring['ttft_s'] / r['ttft_s']:.2f}x" if ring and r["method"] == "star" else ""
            lines.append(
                f"| {_name(r)} | {r['hosts']} | {'yes' if r['simulated'] else 'no'} | {r['phase1_s']:.2f} "
                f"({_fmt(r['phase1_floor_s'])}, {_fmt(r['predicted_phase1_s'])}) | {r['ttft_s']:.2f} "
                f"({_fmt(r['predicted_ttft_s'])}) | {r['decode_ms_per_token']:.1f} ({_fmt(r['decode_floor_ms'], 1)}) | "
                f"{r['total_s']:.2f} | {r['peak_mem_gib']:.1f} ({_fmt(r['predicted_peak_gib'], 1)}) | {speedup} |"
            )
    if reuse:
        lines += ["", "## K queries on one context (Phase 1 once, then K answers over the kept context)", "",
                  "| context | hosts | K | total s | one request s | total / one | goal (1 + 0.1 K) |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in reuse:
            lines.append(
                f"| {_k(r['seq_len'])} | {r['hosts']} | {r['queries_per_context']} | {r['total_s']:.2f} | "
                f"{r['single_request_s']:.2f} | {r['total_over_single']:.2f} | {r['goal_total_over_single']:.1f} |"
            )
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    _plot([r for r in records if "ttft_s" in r], out / "results.png", env)


def _plot(records: list[dict[str, Any]], path: Path, env: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in sorted({_name(r) for r in records}):
        points = sorted(((r["seq_len"], r) for r in records if _name(r) == name), key=lambda point: point[0])
        xs = [p[0] / 1024 for p in points]
        axes[0].plot(xs, [p[1]["ttft_s"] for p in points], marker="o", label=name)
        axes[1].plot(xs, [p[1]["decode_ms_per_token"] for p in points], marker="o", label=name)
    for ax, title in zip(axes, ("time to first token (s)", "decode ms / token"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (K tokens; hosts = context / block)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    figure.suptitle(f"Llama-3.1-8B shape, {env['gpu']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def with_model(env: dict[str, Any], config: Any, dtype: torch.dtype, query_tokens: int, new_tokens: int) -> None:
    """What the records need of the model and the request shape."""
    env.update(model_config=config, dtype=dtype, query_tokens=query_tokens, new_tokens=new_tokens)


def jsonable(env: dict[str, Any]) -> dict[str, Any]:
    """The environment as it goes into results.json."""
    keep = {k: v for k, v in env.items() if k not in ("device", "gpu_spec", "interconnect", "model_config", "dtype")}
    ic = env["interconnect"]
    keep["interconnect"] = {"intra_node_bytes_per_s": ic.intra_node_bytes_per_s, "gpus_per_node": ic.gpus_per_node,
                            "inter_node_bytes_per_s": ic.inter_node_bytes_per_s,
                            "collective_latency_s": ic.collective_latency_s}  # fmt: skip
    keep["model"] = {"config": env["model_config"].to_dict(), "dtype": str(env["dtype"])}
    return keep
