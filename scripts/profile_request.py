#!/usr/bin/env python
"""Where one request's time goes, through the engine (``star_lightning.engine.request.generate``), per phase and per
kernel: the profile the CLI's throughput records are explained by.

A model of a named shape (or the config of ``--config``) with random weights: the time of a forward does not depend
on the weights' values, and every request generates exactly ``--new-tokens`` (no EOS). For every attention and
``--prefill`` mode: ``--requests`` requests of about ``--length`` tokens (each a few tokens shorter than the last, so
the last block is ragged as in real data) on one engine, the median of each phase over the requests after the first
two (a graph is captured at the second), then one more request under the PyTorch profiler, whose table (the top ops
by device time, or CPU time on a CPU) is written as text beside the JSON. Not a trace: a summary.

    python scripts/profile_request.py --shape qwen2.5-0.5b --length 8192 --block-size 2048 --out benchmarks/profile
    python scripts/profile_request.py --shape tiny --device cpu --length 512 --block-size 128 --requests 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from star_lightning.attention.kernels import KernelChoice
from star_lightning.engine.request import RequestStats, generate
from star_lightning.engine.settings import GenerationSettings, StarSettings
from star_lightning.models import build_model, load_config
from star_lightning.parallel.group import SingleHostGroup


def shape_config(name: str) -> Any:
    """The config of a named shape: the real models' numbers (random weights are made from it)."""
    from transformers import Gemma3TextConfig, Qwen2Config

    from star_lightning.bench.speed import llama_8b_config, tiny_config

    if name == "qwen2.5-0.5b":  # Qwen2.5-Coder-0.5B-Instruct
        return Qwen2Config(
            vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
            num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True, rope_theta=1e6,
        )  # fmt: skip
    if name == "gemma-3-270m":
        return Gemma3TextConfig(
            vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
            num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
            max_position_embeddings=32768, layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3,
        )  # fmt: skip
    if name == "llama-3.1-8b":
        return llama_8b_config()
    if name == "tiny":
        return tiny_config()
    raise SystemExit(f"--shape {name}: expected qwen2.5-0.5b, gemma-3-270m, llama-3.1-8b or tiny")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen2.5-0.5b", help="qwen2.5-0.5b, gemma-3-270m, llama-3.1-8b or tiny")
    p.add_argument("--config", default=None, help="a model folder or .gguf whose config is used instead of --shape")
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--block-size", type=int, default=2048)
    p.add_argument("--attention", nargs="+", default=["star", "dense"], choices=("star", "dense"))
    p.add_argument("--prefill", nargs="+", default=None, choices=("eager", "graph"),
                   help="star's Phase 1 modes (default: both on CUDA, eager on CPU; dense runs once)")  # fmt: skip
    p.add_argument("--decode", default="auto")
    p.add_argument("--requests", type=int, default=6)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--query-tokens", type=int, default=40)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--rows", type=int, default=25, help="rows of each profile table")
    p.add_argument("--out", default="benchmarks/profile", help="folder of profile.json and the tables")
    args = p.parse_args(argv)
    if args.requests < 3:
        p.error("--requests must be at least 3 (the first runs as it is, the second captures)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU here; use --device cpu")
    if args.prefill is None:
        args.prefill = ["eager", "graph"] if args.device == "cuda" else ["eager"]
    if args.device == "cpu" and "graph" in args.prefill:
        p.error("--prefill graph captures CUDA graphs: use --device cuda, or --prefill eager")
    return args


def _median(stats: list[RequestStats], field: str) -> float:
    return statistics.median(float(getattr(s, field)) for s in stats)


def run_variant(model: Any, args: argparse.Namespace, star: StarSettings, label: str, out: Path) -> dict[str, Any]:
    """``--requests`` requests on one engine, then one under the profiler; the medians and the engine's counts."""
    device = torch.device(args.device)
    kernels = KernelChoice()
    settings = GenerationSettings(max_new_tokens=args.new_tokens)  # no EOS: every request makes all its tokens
    generator = torch.Generator().manual_seed(0)
    vocab = int(model.config.get_text_config().vocab_size)
    query = torch.randint(10, vocab, (1, args.query_tokens), generator=generator).to(device)
    stats, walls = [], []
    for index in range(args.requests + 1):
        context = torch.randint(10, vocab, (1, args.length - args.query_tokens - index), generator=generator)
        context = context.to(device)
        profiled = index == args.requests
        profiler = _profiler(device) if profiled else None
        t0 = time.perf_counter()
        with torch.inference_mode(), profiler if profiler is not None else nullcontext():
            result = generate(model, context, query, SingleHostGroup(), star, settings, kernels=kernels)
            if device.type == "cuda":
                torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
        if profiler is not None:
            (out / f"profile_{label}.txt").write_text(_table(profiler, device, args.rows))
        else:
            stats.append(result.stats)
        del result
    steady = stats[2:]
    return {
        "label": label, "attention": star.attention, "prefill": star.prefill, "decode": star.decode,
        "requests": len(steady), "request_s": statistics.median(walls[2:-1]),
        "phase1_s": _median(steady, "phase1_s"), "query_s": _median(steady, "query_s"),
        "decode_setup_s": _median(steady, "decode_setup_s"),
        "decode_ms_per_token": _median(steady, "decode_ms_per_token"),
        "first_request_s": walls[0], "second_request_s": walls[1],
        "block_captures": kernels.prefill_captures, "block_replays": kernels.prefill_replays,
        "capture_s": kernels.prefill_capture_s, "capture_failure": kernels.prefill_failure,
        "stores_reused": kernels.stores.reused,
    }  # fmt: skip


def _profiler(device: torch.device) -> Any:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return profile(activities=activities)


def _table(profiler: Any, device: torch.device, rows: int) -> str:
    events = profiler.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cudaGraphLaunch", "cuLaunchKernel"))
    graphs = sum(e.count for e in events if e.key == "cudaGraphLaunch")
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    head = f"kernel launches {launches} (of them CUDA graph launches {graphs}); sorted by {sort}\n"
    return head + events.table(sort_by=sort, row_limit=rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = load_config(args.config) if args.config else shape_config(args.shape)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for attention in args.attention:
        model = build_model(config, dtype=dtype, device=device, attention=attention)
        modes = args.prefill if attention == "star" else ["eager"]
        for prefill in modes:
            block = args.block_size if attention == "star" else args.length
            if attention == "dense":
                star = StarSettings(attention="dense", block_size=block, decode=args.decode)
            else:
                star = StarSettings(block_size=block, prefill=prefill, decode=args.decode)
            label = attention if attention == "dense" else f"star_{prefill}"
            record = run_variant(model, args, star, label, out)
            records.append(record)
            print(json.dumps(record), flush=True)
        del model
    name = args.config or args.shape
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    payload = {"command": "python scripts/profile_request.py " + " ".join(sys.argv[1:]), "model": name,
               "weights": "random (timing only)", "length": args.length, "block_size": args.block_size,
               "new_tokens": args.new_tokens, "device": gpu, "torch": torch.__version__,
               "records": records}  # fmt: skip
    temporary = out / "profile.json.tmp"
    temporary.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(temporary, out / "profile.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
