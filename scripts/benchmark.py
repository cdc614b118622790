#!/usr/bin/env python
"""Star vs ring vs dense attention: seconds per request on the project's real code path, with roofline floors.

One process per GPU (torch.multiprocessing), NCCL on CUDA (gloo on CPU). Every request goes through
``star_lightning.generation.generate`` with a Llama-3.1-8B-shaped model built with random weights on the device
(no download); star/ring use ``use_star_attention(model)`` and a ``DistributedContextGroup``, dense the model's own
sdpa attention. Per method, number of hosts and context length it records Phase 1 seconds, time to first token,
decode ms/token, total seconds for a fixed number of generated tokens and peak memory per GPU, next to the hardware
floors measured in the same run (bf16 matmul rate, device copy bandwidth). Before the benchmark it checks every
CUDA attention kernel against a float64 reference and times the candidate kernels.

    python scripts/benchmark.py --nprocs 2                      # the GPU benchmark (writes benchmarks/results.*)
    python scripts/benchmark.py --device cpu --tiny --nprocs 2  # end-to-end smoke test on CPU, in seconds
    python scripts/benchmark.py --report benchmarks/results.json  # re-render results.md / results.png

Single-GPU jobs (dense; ring, star with one host) run side by side, one per GPU; jobs with H hosts use H GPUs
(world / H copies of the same request run at once; the first group's figures are recorded).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

# NVLink multicast stays off on the lent machines (KINDS.md); children inherit these.
for _name, _value in (
    ("NCCL_NVLS_ENABLE", "0"),
    ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
    ("NVSHMEM_DISABLE_NVLS", "1"),
):
    os.environ.setdefault(_name, _value)

GIB = 1024**3
METHODS = ("dense", "ring", "star", "star_recompute_anchor")


# ----------------------------------------------------------------------------------------------------------- model


def llama_config(tiny: bool) -> Any:
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            vocab_size=256,
            max_position_embeddings=4096,
            rope_theta=500000.0,
        )
    return LlamaConfig(  # Llama-3.1-8B
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=128001,
    )


def build_model(config: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Random weights made directly on the device (same seed, so every rank holds the same model)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def model_numbers(model: Any) -> dict[str, float]:
    """Parameter counts the floors need: matmul weights per token, and bytes read per decode step."""
    layer_matmul = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2)
    lm_head = model.lm_head.weight.numel()
    decode_weights = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    element = next(model.parameters()).element_size()
    return {
        "layer_matmul_params": float(layer_matmul),
        "lm_head_params": float(lm_head),
        "decode_weight_bytes": float(decode_weights * element),
        "layers": float(cfg.num_hidden_layers),
        "heads": float(cfg.num_attention_heads),
        "kv_heads": float(cfg.num_key_value_heads),
        "head_dim": float(head_dim),
        "kv_bytes_per_token": float(2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * element),
    }


# -------------------------------------------------------------------------------------------------------- roofline


def forward_flops(nums: dict[str, float], tokens: int, prefix: int, extra_keys: int = 0) -> float:
    """One forward of ``tokens`` tokens after ``prefix`` visible keys (causal), plus ``extra_keys`` fully visible."""
    linear = 2.0 * nums["layer_matmul_params"] * tokens + 2.0 * nums["lm_head_params"]
    pairs = tokens * (prefix + extra_keys) + tokens * (tokens + 1) / 2
    attention = 4.0 * nums["layers"] * nums["heads"] * nums["head_dim"] * pairs
    return linear + attention


def phase1_flops_per_host(nums: dict[str, float], method: str, hosts: int, length: int, block: int) -> list[float]:
    """Phase 1 FLOPs of each host, counted the way the code runs it."""
    from star_lightning.partition import plan_blocks, split_evenly

    if method == "dense":
        return [forward_flops(nums, length, 0)]
    if method == "ring":
        spans = split_evenly(length, hosts)
        return [forward_flops(nums, b - a, 0, extra_keys=a) for a, b in spans]
    plan = plan_blocks(length, block, hosts)
    anchor = plan.anchor_length
    per_host = []
    for host in range(hosts):
        flops = 0.0
        blocks = list(plan.blocks_of(host))
        if blocks and blocks[0].index == 0:
            flops += forward_flops(nums, blocks.pop(0).length, 0)
        elif anchor and blocks and method == "star":
            flops += forward_flops(nums, anchor, 0)
        for b in blocks:
            if method == "star":
                flops += forward_flops(nums, b.length, anchor)
            else:
                flops += forward_flops(nums, anchor + b.length, 0)
        per_host.append(flops)
    return per_host


def local_context(method: str, hosts: int, length: int, block: int) -> list[int]:
    from star_lightning.partition import plan_blocks, split_evenly

    if method == "dense":
        return [length]
    if method == "ring":
        return [b - a for a, b in split_evenly(length, hosts)]
    plan = plan_blocks(length, block, hosts)
    return [plan.local_context_length(h) for h in range(hosts)]


# ------------------------------------------------------------------------------------------------------- measuring


def time_cuda(fn: Any, warmup: int = 2, reps: int = 10) -> float:
    """Median seconds of ``fn`` by CUDA events, after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1000.0)
    return statistics.median(times)


def time_graph(fn: Any, calls: int = 10) -> float:
    """Seconds per call of ``fn`` captured ``calls`` times in one CUDA graph (no launch overhead in the figure)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return time_cuda(graph.replay, warmup=2, reps=10) / calls


def time_host(fn: Any, warmup: int = 1, reps: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_ceilings(device: torch.device, tiny: bool) -> dict[str, float]:
    """bf16 matmul rate (random data) and device copy bandwidth (bytes read + written), measured here."""
    if device.type != "cuda":
        n = 256 if tiny else 2048
        a, b = torch.randn(n, n), torch.randn(n, n)
        t = time_host(lambda: a @ b)
        src = torch.randn(16 * 1024 * 1024)
        dst = torch.empty_like(src)
        tc = time_host(lambda: dst.copy_(src))
        return {"matmul_flops": 2 * n**3 / t, "copy_bytes_per_s": 2 * src.numel() * 4 / tc, "matmul_n": n}
    n = 8192
    mats = [torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(3)]
    out = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    t = time_cuda(lambda: torch.matmul(mats[0], mats[1], out=out), warmup=3, reps=10)
    t2 = time_cuda(lambda: torch.matmul(mats[1], mats[2], out=out), warmup=1, reps=10)
    mats = out = None  # free before the copy test
    elements = 2 * GIB // 2  # 2 GiB of bf16 per buffer
    src = torch.randn(elements, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    tc = time_cuda(lambda: dst.copy_(src), warmup=2, reps=10)
    tc2 = time_cuda(lambda: src.copy_(dst), warmup=1, reps=10)
    src = dst = None
    torch.cuda.empty_cache()
    return {
        "matmul_flops": 2 * n**3 / min(t, t2),
        "matmul_flops_runs": [2 * n**3 / t, 2 * n**3 / t2],
        "copy_bytes_per_s": 2 * elements * 2 / min(tc, tc2),
        "copy_bytes_per_s_runs": [2 * elements * 2 / tc, 2 * elements * 2 / tc2],
        "matmul_n": n,
    }


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.double(), ref.double()
    if not torch.isfinite(out64).all():
        return float("nan")
    return float((out64 - ref64).norm() / ref64.norm())


def kernel_checks(device: torch.device, log: Any) -> list[dict[str, Any]]:
    """Each CUDA kernel against the float64 math reference, on fresh random inputs (METHOD.md)."""
    from star_lightning.attention import kernels, triton_decode

    results: list[dict[str, Any]] = []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    heads, kv_heads, dim = (32, 8, 128) if device.type == "cuda" else (4, 2, 16)
    scale = dim**-0.5

    def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> tuple[torch.Tensor, ...]:
        return kernels.attention_with_lse(
            q.double(), k.double(), v.double(), scale=scale, causal=causal, backend="math"
        )

    def check(name: str, backend: str, q_len: int, k_len: int, causal: bool, valid: int | None = None) -> None:
        gen = torch.Generator(device=device).manual_seed(len(results) + 1)
        q = torch.randn(1, heads, q_len, dim, device=device, dtype=dtype, generator=gen)
        k = torch.randn(1, kv_heads, k_len, dim, device=device, dtype=dtype, generator=gen)
        v = torch.randn(1, kv_heads, k_len, dim, device=device, dtype=dtype, generator=gen)
        record: dict[str, Any] = {"check": name, "backend": backend, "q_len": q_len, "k_len": k_len, "causal": causal}
        try:
            if valid is not None:
                record["valid"] = valid
                k_buf = k.clone()
                kernels.attach_valid_length(k_buf, torch.tensor([valid], dtype=torch.int32, device=device))
                out, lse = kernels.attention_with_lse(q, k_buf, v, scale=scale, causal=causal, backend=backend)
                ref_out, ref_lse = reference(q, k[:, :, :valid], v[:, :, :valid], causal)
            else:
                out, lse = kernels.attention_with_lse(q, k, v, scale=scale, causal=causal, backend=backend)
                ref_out, ref_lse = reference(q, k, v, causal)
            record["out_rel_err"] = relative_error(out, ref_out)
            record["lse_max_abs_err"] = float((lse.double() - ref_lse).abs().max())
            tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
            record["ok"] = bool(record["out_rel_err"] < tol and record["lse_max_abs_err"] < 5e-2)
        except Exception as error:  # a kernel that fails is reported, not fatal
            record["ok"] = False
            record["error"] = f"{type(error).__name__}: {error}"[:300]
        results.append(record)
        log(f"check {name:<28} {backend:<7} {json.dumps({k: v for k, v in record.items() if k != 'check'})}")

    if device.type == "cuda":
        for backend in ("sdpa", "cudnn"):
            check("prefill square causal", backend, 1024, 1024, True)
            check("prefill anchor+block causal", backend, 1024, 3072, True)
            check("prefill full (no mask)", backend, 512, 1536, False)
        if triton_decode.available():
            check("decode 1 token", "triton", 1, 40000, True)
            check("decode 1 token, valid length", "triton", 1, 50000, True, valid=33333)
            check("decode 1 token, not causal", "triton", 1, 20000, False, valid=19999)
            check("query 4 tokens causal", "triton", 4, 9000, True)
        check("decode 1 token, valid length", "math", 1, 50000, True, valid=33333)
    else:
        check("prefill anchor+block causal", "math", 64, 192, True)
        check("decode 1 token, valid length", "math", 1, 300, True, valid=201)
    return results


def kernel_timings(device: torch.device, ceilings: dict[str, float], log: Any) -> list[dict[str, Any]]:
    """Candidate kernels on the shapes the 128K benchmark runs: a star block after its anchor, a decode step."""
    from star_lightning.attention import kernels, triton_decode

    out: list[dict[str, Any]] = []
    if device.type != "cuda":
        return out
    dtype, heads, kv_heads, dim = torch.bfloat16, 32, 8, 128
    scale = dim**-0.5
    for q_len, k_len in ((32768, 65536), (32768, 32768)):
        q = torch.randn(1, heads, q_len, dim, device=device, dtype=dtype)
        k = torch.randn(1, kv_heads, k_len, dim, device=device, dtype=dtype)
        v = torch.randn(1, kv_heads, k_len, dim, device=device, dtype=dtype)
        pairs = q_len * (k_len - q_len) + q_len * (q_len + 1) / 2
        flops = 4 * heads * dim * pairs
        for backend in ("sdpa", "cudnn"):
            row: dict[str, Any] = {"kernel": backend, "q_len": q_len, "k_len": k_len, "causal": True}
            try:
                t = time_cuda(
                    lambda b=backend, q=q, k=k, v=v: kernels.attention_with_lse(
                        q, k, v, scale=scale, causal=True, backend=b
                    ),
                    warmup=2,
                    reps=5,
                )
                row.update(ms=1e3 * t, tflops=flops / t / 1e12, fraction_of_matmul=flops / t / ceilings["matmul_flops"])
            except Exception as error:
                row["error"] = f"{type(error).__name__}: {error}"[:300]
            out.append(row)
            log(f"timing {json.dumps(row)}")
        q = k = v = None
    for k_len in (65536, 131072):
        q = torch.randn(1, heads, 1, dim, device=device, dtype=dtype)
        k = torch.randn(1, kv_heads, k_len, dim, device=device, dtype=dtype)
        v = torch.randn(1, kv_heads, k_len, dim, device=device, dtype=dtype)
        kv_bytes = 2 * k.numel() * k.element_size()
        for backend, launch in (("math", "eager"), ("triton", "eager"), ("math", "graph"), ("triton", "graph")):
            if backend == "triton" and not triton_decode.available():
                continue
            row = {"kernel": backend, "launch": launch, "q_len": 1, "k_len": k_len, "causal": True}
            try:

                def call(b: str = backend, q: torch.Tensor = q, k: torch.Tensor = k, v: torch.Tensor = v) -> Any:
                    return kernels.attention_with_lse(q, k, v, scale=scale, causal=True, backend=b)

                t = time_cuda(call, warmup=3, reps=20) if launch == "eager" else time_graph(call)
                floor = kv_bytes / ceilings["copy_bytes_per_s"]
                row.update(us=1e6 * t, floor_us=1e6 * floor, fraction_of_bandwidth=floor / t)
            except Exception as error:
                row["error"] = f"{type(error).__name__}: {error}"[:300]
            out.append(row)
            log(f"timing {json.dumps(row)}")
        q = k = v = None
    torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------------------------ benchmark


def run_request(
    model: Any, method: str, group: Any, length: int, block: int, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    """One request through ``generate``; returns this rank's stats."""
    from star_lightning.attention.star import ATTENTION_NAME
    from star_lightning.generation import GenerationSettings, StarSettings, generate

    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(length)
    context = torch.randint(0, vocab, (1, length), generator=gen).to(device)  # [1, L]
    query = torch.randint(0, vocab, (1, args.query_tokens), generator=gen).to(device)  # [1, Lq]
    attention = "dense" if method == "dense" else ("ring" if method == "ring" else "star")
    wanted = DENSE_ATTENTION if method == "dense" else ATTENTION_NAME
    if model.config._attn_implementation != wanted:
        model.set_attn_implementation(wanted)
    star = StarSettings(
        attention=attention,
        block_size=block,
        reuse_anchor=method != "star_recompute_anchor",
        backend=args.backend,
        decode=args.decode,
    )
    settings = GenerationSettings(max_new_tokens=args.new_tokens)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if group is not None and group.size > 1:
        dist.barrier()
    with torch.inference_mode():
        result = generate(model, context, query, group, star, settings)
    s = result.stats
    return {
        "rank": dist.get_rank(),
        "host": group.rank,
        "query_host": group.rank == group.query_host,
        "phase1_s": s.phase1_s,
        "query_s": s.query_s,
        "ttft_s": s.ttft_s,
        "decode_s": s.decode_s,
        "decode_setup_s": s.decode_setup_s,
        "decode_mode": s.decode_mode if method != "dense" else "eager (HF)",
        "decode_ms_per_token": s.decode_ms_per_token,
        "total_s": s.total_s,
        "new_tokens": s.new_tokens,
        "local_context_tokens": s.local_context_tokens,
        "phase2_bytes": s.phase2_bytes,
        "peak_mem_gib": s.peak_mem_bytes / GIB,
        "tokens": result.token_ids[:8],
    }


DENSE_ATTENTION = "sdpa_bench"


def register_dense_attention(prefill_kernel: str) -> str:
    """HF's own sdpa attention for the dense baseline, trying ``prefill_kernel`` first for long queries (the kernel
    star and ring use in Phase 1) and PyTorch's default order for short ones (cuDNN builds a new plan for every
    new cache length, which would make each eager decode step pay for a plan)."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

    def priority(query_len: int) -> Any:
        if prefill_kernel != "cudnn" or query_len <= 16 or not torch.cuda.is_available():
            return contextlib.nullcontext()
        try:
            return sdpa_kernel(order, set_priority=True)
        except TypeError:  # an older torch without priorities
            return contextlib.nullcontext()

    def dense_attention(module: Any, query: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        with priority(query.shape[2]):
            return sdpa(module, query, *args, **kwargs)

    AttentionInterface.register(DENSE_ATTENTION, dense_attention)
    AttentionMaskInterface.register(DENSE_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return DENSE_ATTENTION


def make_record(
    method: str, hosts: int, length: int, block: int, per_rank: list[dict[str, Any]], env: dict[str, Any]
) -> dict[str, Any]:
    """Combine the hosts' stats of one request: Phase 1 ends when the slowest host ends; the rest is the query
    host's clock (every host started together, after a barrier)."""
    qh = next(r for r in per_rank if r["query_host"])
    nums, ceil = env["model"], env["ceilings"]
    flops = phase1_flops_per_host(nums, method, hosts, length, block)
    local = local_context(method, hosts, length, block)
    phase1 = max(r["phase1_s"] for r in per_rank)
    phase1_floor = max(flops) / ceil["matmul_flops"]
    extra = env["args"]["query_tokens"] + env["args"]["new_tokens"]
    decode_bytes = nums["decode_weight_bytes"] + (max(local) + extra) * nums["kv_bytes_per_token"]
    decode_floor_ms = 1e3 * decode_bytes / ceil["copy_bytes_per_s"]
    record = {
        "method": method,
        "hosts": hosts,
        "seq_len": length,
        "block_size": block if method.startswith("star") else None,
        "query_tokens": env["args"]["query_tokens"],
        "new_tokens": qh["new_tokens"],
        "phase1_s": phase1,
        "phase1_s_per_host": [r["phase1_s"] for r in sorted(per_rank, key=lambda r: r["host"])],
        "ttft_s": qh["ttft_s"],
        "decode_ms_per_token": qh["decode_ms_per_token"],
        "decode_setup_s": qh["decode_setup_s"],
        "decode_mode": qh["decode_mode"],
        "total_s": qh["total_s"],
        "peak_mem_gib": max(r["peak_mem_gib"] for r in per_rank),
        "peak_mem_gib_per_gpu": [r["peak_mem_gib"] for r in sorted(per_rank, key=lambda r: r["host"])],
        "phase2_bytes": qh["phase2_bytes"],
        "tokens": qh["tokens"],
        "phase1_flops_critical_host": max(flops),
        "phase1_floor_s": phase1_floor,
        "phase1_fraction_of_matmul": phase1_floor / phase1 if phase1 > 0 else None,
        "decode_floor_ms": decode_floor_ms,
        "decode_fraction_of_bandwidth": decode_floor_ms / qh["decode_ms_per_token"]
        if qh["decode_ms_per_token"] > 0
        else None,
        "gpu": env["gpu"],
        "versions": env["versions"],
        "backend": env["backend_used"],
    }
    return record


def versions() -> dict[str, str]:
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    out["cuda"] = str(torch.version.cuda)
    try:
        out["nccl"] = ".".join(str(x) for x in torch.cuda.nccl.version()) if torch.cuda.is_available() else "-"
    except Exception:
        out["nccl"] = "?"
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = "-"
    try:
        out["cudnn"] = str(torch.backends.cudnn.version())
    except Exception:
        out["cudnn"] = "?"
    return out


def worker(rank: int, world: int, args: argparse.Namespace) -> None:
    from star_lightning.attention import kernels
    from star_lightning.models import use_star_attention
    from star_lightning.parallel.layout import ParallelLayout
    from star_lightning.parallel.torch_group import new_context_groups

    started = time.perf_counter()
    out_dir = Path(args.out)
    log_path = out_dir / f"benchmark_rank{rank}.log"

    def log(message: str) -> None:
        line = f"[{time.perf_counter() - started:7.1f}s r{rank}] {message}"
        print(line, flush=True)
        with log_path.open("a") as handle:
            handle.write(line + "\n")

    cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=args.collective_timeout_s),
    )
    env: dict[str, Any] = {"args": vars(args), "world": world}
    env["gpu"] = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    env["versions"] = versions()
    log(f"device {env['gpu']} versions {env['versions']}")

    env["ceilings"] = measure_ceilings(device, args.tiny)
    log(f"ceilings {env['ceilings']}")
    checks, timings = [], []
    if rank == 0 and not args.skip_checks:
        checks = kernel_checks(device, log)
        timings = kernel_timings(device, env["ceilings"], log)
    # Phase 1 kernel for ``auto``: the faster correct one on the star-block shape (sdpa flash vs cuDNN).
    choice = [kernels.auto_prefill_kernel()]
    if rank == 0 and cuda and args.backend == "auto":
        ok = {c["backend"] for c in checks if c["ok"] and c["backend"] in kernels.PREFILL_KERNELS}
        bad = {c["backend"] for c in checks if not c["ok"] and c["backend"] in kernels.PREFILL_KERNELS}
        speed = {t["kernel"]: t["ms"] for t in timings if t.get("k_len") == 65536 and "ms" in t and t["q_len"] > 1}
        usable = {k: v for k, v in speed.items() if k in ok - bad}
        if usable:
            choice = [min(usable, key=usable.get)]
    # Decode kernel for ``auto``: the Triton split-KV kernel only if every one of its checks passed.
    triton_checks = [c["ok"] for c in checks if c["backend"] == "triton"]
    choice.append("triton" if (not cuda or args.skip_checks or (triton_checks and all(triton_checks))) else "math")
    dist.broadcast_object_list(choice, src=0)
    kernels.set_auto_prefill_kernel(choice[0])
    kernels.set_auto_decode_kernel(choice[1])
    register_dense_attention(choice[0])
    env["backend_used"] = {"requested": args.backend, "auto_prefill_kernel": choice[0], "auto_decode_kernel": choice[1]}
    log(f"kernels for auto: prefill {choice[0]}, decode {choice[1]}")

    dtype = torch.bfloat16 if cuda else torch.float32
    model = build_model(llama_config(args.tiny), device, dtype)
    use_star_attention(model)
    env["model"] = model_numbers(model)
    log(f"model built: {sum(p.numel() for p in model.parameters()) / 1e9:.3f} B parameters")

    host_counts = sorted({h for h in args.hosts if h <= world and world % h == 0})
    timeout = datetime.timedelta(seconds=args.collective_timeout_s)
    groups = {h: new_context_groups(ParallelLayout(world, h), rank, device, timeout)[0] for h in host_counts}
    records: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    env["native_gqa"] = {}

    def save() -> None:
        if rank != 0:
            return
        payload = {
            "records": records,
            "failures": failures,
            "kernel_checks": checks,
            "kernel_timings": timings,
            "ceilings": env["ceilings"],
            "gpu": env["gpu"],
            "world": world,
            "versions": env["versions"],
            "native_gqa": env["native_gqa"],
            "decode_fallback": env.get("decode_fallback"),
            "backend": env["backend_used"],
            "args": vars(args),
            "command": args.command_line,
        }
        (out_dir / "raw_results.json").write_text(json.dumps(payload, indent=1))

    def over_budget() -> bool:
        flag = [time.perf_counter() - started > args.time_budget_s]
        dist.broadcast_object_list(flag, src=0)
        return bool(flag[0])

    def run_jobs(jobs: list[tuple[str, int, int]], label: str) -> None:
        """Run ``(method, hosts, length)`` jobs; single-host jobs are spread over the ranks and run side by side."""
        singles = [j for j in jobs if j[1] == 1]
        multis = [j for j in jobs if j[1] > 1]
        batches = [singles[i : i + world] for i in range(0, len(singles), world)] + [[j] for j in multis]
        for batch in batches:
            if over_budget():
                if rank == 0:
                    failures.extend(
                        {"method": m, "hosts": h, "seq_len": n, "error": "skipped: time budget"} for m, h, n in batch
                    )
                continue
            mine = None
            if batch[0][1] == 1:
                if rank < len(batch):
                    mine = batch[rank]
            else:
                mine = batch[0]
            result: dict[str, Any] | None = None
            error = None
            if mine is not None:
                method, hosts, length = mine
                block = max(1, length // args.blocks)
                try:
                    result = run_request(model, method, groups[hosts], length, block, args, device)
                except Exception as exc:
                    error = f"{type(exc).__name__}: {exc}"[:400]
                    log(traceback.format_exc())
                    if cuda:
                        torch.cuda.empty_cache()
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, (mine, result, error))
            if rank != 0:
                continue
            for job in {g[0] for g in gathered if g[0] is not None}:
                method, hosts, length = job
                block = max(1, length // args.blocks)
                parts = [g for g in gathered if g[0] == job]
                errors = [g[2] for g in parts if g[2]]
                stats = [g[1] for g in parts if g[1] is not None]
                if hosts > 1:  # the first context-parallel group's ranks
                    stats = [s for s in stats if s["rank"] < hosts]
                if errors or len(stats) != hosts:
                    failures.append({"method": method, "hosts": hosts, "seq_len": length, "error": errors})
                    log(f"{label} FAILED {job}: {errors}")
                    continue
                record = make_record(method, hosts, length, block, stats, env)
                if label == "measure":
                    records.append(record)
                log(
                    f"{label} {method:<22} hosts={hosts} L={length:>7} phase1={record['phase1_s']:.3f}s "
                    f"(floor {record['phase1_floor_s']:.3f}s, {record['phase1_fraction_of_matmul']:.0%}) "
                    f"ttft={record['ttft_s']:.3f}s decode={record['decode_ms_per_token']:.2f}ms/tok "
                    f"(floor {record['decode_floor_ms']:.2f}ms, {record['decode_mode']}) "
                    f"total={record['total_s']:.3f}s "
                    f"peak={record['peak_mem_gib']:.1f}GiB tokens={record['tokens'][:4]}"
                )
            save()

    methods = [m for m in METHODS if m in args.methods]

    def jobs_for(length: int) -> list[tuple[str, int, int]]:
        jobs = []
        for hosts in host_counts:
            for method in methods:
                if method == "dense" and hosts != 1:
                    continue
                if method.startswith("star") and length // max(1, length // args.blocks) < hosts:
                    continue
                jobs.append((method, hosts, length))
        return jobs

    # Warm-up: kernel compilation, cuBLAS/NCCL initialisation, CUDA-graph capture, outside the measurements.
    # If a decode mode fails here, fall back (graph -> static -> eager) and say so in the results.
    fallbacks = {"auto": "static", "graph": "static", "static": "eager"}
    while True:
        failures.clear()
        run_jobs(jobs_for(args.warmup_length), "warmup")
        retry = [bool(failures) and args.decode in fallbacks]
        dist.broadcast_object_list(retry, src=0)
        if not retry[0]:
            break
        log(f"warm-up failed with decode={args.decode}: {failures}; falling back to {fallbacks[args.decode]}")
        env["decode_fallback"] = f"{args.decode} failed in warm-up: {failures}"[:600]
        args.decode = fallbacks[args.decode]
    failures.clear()
    env["native_gqa"] = kernels.native_gqa_status()
    for length in args.lengths:
        for _ in range(args.repeats if length <= args.repeat_below else 1):
            run_jobs(jobs_for(length), "measure")
    save()
    log(f"done in {time.perf_counter() - started:.1f}s")
    dist.barrier()
    dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------------- report


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median over repeats of each (method, hosts, seq_len)."""
    keys = sorted({(r["method"], r["hosts"], r["seq_len"]) for r in records}, key=lambda k: (k[2], k[1], k[0]))
    out = []
    for key in keys:
        runs = [r for r in records if (r["method"], r["hosts"], r["seq_len"]) == key]
        merged = dict(runs[0])
        for field in ("phase1_s", "ttft_s", "decode_ms_per_token", "total_s", "peak_mem_gib"):
            values = [r[field] for r in runs]
            merged[field] = statistics.median(values)
            if len(values) > 1:
                merged[field + "_runs"] = values
        merged["phase1_fraction_of_matmul"] = merged["phase1_floor_s"] / merged["phase1_s"]
        merged["decode_fraction_of_bandwidth"] = (
            merged["decode_floor_ms"] / merged["decode_ms_per_token"] if merged["decode_ms_per_token"] else None
        )
        merged["repeats"] = len(runs)
        out.append(merged)
    index = {(r["method"], r["hosts"], r["seq_len"]): r for r in out}
    for r in out:
        if r["method"] == "star":
            ring = index.get(("ring", r["hosts"], r["seq_len"]))
            dense = index.get(("dense", 1, r["seq_len"]))
            recompute = index.get(("star_recompute_anchor", r["hosts"], r["seq_len"]))
            if ring:
                r["speedup_vs_ring_total"] = ring["total_s"] / r["total_s"]
                r["speedup_vs_ring_phase1"] = ring["phase1_s"] / r["phase1_s"]
                r["speedup_vs_ring_ttft"] = ring["ttft_s"] / r["ttft_s"]
            if dense:
                r["speedup_vs_dense_total"] = dense["total_s"] / r["total_s"]
                r["speedup_vs_dense_ttft"] = dense["ttft_s"] / r["ttft_s"]
            if recompute:
                r["anchor_reuse_phase1_speedup"] = recompute["phase1_s"] / r["phase1_s"]
    return out


def kfmt(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens % 1024 == 0 else str(tokens)


def render(raw: dict[str, Any], out_dir: Path) -> None:
    rows = summarize(raw["records"])
    (out_dir / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    ceil = raw["ceilings"]
    v = raw["versions"]
    lines = [
        "# Star vs ring vs dense: seconds per request",
        "",
        f"GPU: {raw['gpu']} x {raw['world']}; torch {v['torch']}, transformers {v['transformers']}, CUDA {v['cuda']}, "
        f"NCCL {v.get('nccl')}, cuDNN {v.get('cudnn')}, Triton {v.get('triton')}, Python {v['python']}.",
        f"Measured ceilings (same run): bf16 matmul {ceil['matmul_flops'] / 1e12:.0f} TFLOP/s "
        f"({ceil['matmul_n']}^3, random data), device copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write).",
        f"Model: {'tiny 2-layer Llama, float32' if raw['args']['tiny'] else 'Llama-3.1-8B shape, bf16'}, random "
        f"weights. Query {raw['args']['query_tokens']} tokens, {raw['args']['new_tokens']} generated tokens (greedy), "
        f"star block = anchor = context / {raw['args']['blocks']}. "
        f"Phase 1 kernel: {raw['backend']['auto_prefill_kernel']}; decode: see the mode column.",
        f"Command: `{raw['command']}`",
        "",
        "Phase 1 floor = FLOPs of the busiest host / matmul rate; decode floor = (weights + largest local KV) bytes / "
        "copy bandwidth. `%` = floor / measured.",
        "",
        "| method | hosts | context | Phase 1 s | floor s (%) | TTFT s | decode ms/tok | floor ms (%) | decode mode "
        "| total s | peak GiB/GPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['hosts']} | {kfmt(r['seq_len'])} | {r['phase1_s']:.2f} | "
            f"{r['phase1_floor_s']:.2f} ({100 * r['phase1_fraction_of_matmul']:.0f}%) | {r['ttft_s']:.2f} | "
            f"{r['decode_ms_per_token']:.1f} | {r['decode_floor_ms']:.1f} "
            f"({100 * (r['decode_fraction_of_bandwidth'] or 0):.0f}%) | {r['decode_mode']} | {r['total_s']:.2f} | "
            f"{r['peak_mem_gib']:.1f} |"
        )
    lines += [
        "",
        "## Speedups of star (same hosts)",
        "",
        "| hosts | context | vs ring (total) | vs ring (Phase 1) | vs ring (TTFT) | vs dense 1 GPU (total) "
        "| anchor reuse vs recompute (Phase 1) |",
        "|---|---|---|---|---|---|---|",
    ]

    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}x"

    for r in rows:
        if r["method"] == "star":
            lines.append(
                f"| {r['hosts']} | {kfmt(r['seq_len'])} | {fmt(r.get('speedup_vs_ring_total'))} | "
                f"{fmt(r.get('speedup_vs_ring_phase1'))} | {fmt(r.get('speedup_vs_ring_ttft'))} | "
                f"{fmt(r.get('speedup_vs_dense_total'))} | {fmt(r.get('anchor_reuse_phase1_speedup'))} |"
            )
    if raw.get("kernel_checks"):
        lines += ["", "## Kernel checks against float64 (relative error of out; max abs error of lse)", ""]
        lines += ["| check | kernel | q x k | out rel err | lse err | ok |", "|---|---|---|---|---|---|"]
        for c in raw["kernel_checks"]:
            err = c.get("error")
            lines.append(
                f"| {c['check']} | {c['backend']} | {c['q_len']} x {c.get('valid', c['k_len'])} | "
                f"{c.get('out_rel_err', float('nan')):.2e} | {c.get('lse_max_abs_err', float('nan')):.2e} | "
                f"{'yes' if c['ok'] else 'NO: ' + str(err)} |"
            )
    if raw.get("kernel_timings"):
        lines += ["", "## Kernel timings (one layer, bf16, 32 query / 8 KV heads, d=128)", ""]
        lines += ["| kernel | q x k | time | rate | of ceiling |", "|---|---|---|---|---|"]
        for t in raw["kernel_timings"]:
            if "error" in t:
                lines.append(f"| {t['kernel']} | {t['q_len']} x {t['k_len']} | failed: {t['error'][:80]} | | |")
            elif "ms" in t:
                lines.append(
                    f"| {t['kernel']} | {t['q_len']} x {t['k_len']} causal | {t['ms']:.2f} ms | "
                    f"{t['tflops']:.0f} TFLOP/s | {100 * t['fraction_of_matmul']:.0f}% of matmul |"
                )
            else:
                lines.append(
                    f"| {t['kernel']} ({t.get('launch', 'eager')} launch) | 1 x {t['k_len']} | {t['us']:.0f} us | "
                    f"floor {t['floor_us']:.0f} us | "
                    f"{100 * t['fraction_of_bandwidth']:.0f}% of copy bandwidth |"
                )
    if raw.get("failures"):
        lines += ["", "## Not measured", ""]
        for f in raw["failures"]:
            lines.append(f"- {f['method']}, {f['hosts']} host(s), {f['seq_len']} tokens: {f['error']}")
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    plot(rows, out_dir / "results.png", raw)


def plot(rows: list[dict[str, Any]], path: Path, raw: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    series = sorted({(r["method"], r["hosts"]) for r in rows})
    for method, hosts in series:
        pts = sorted((r["seq_len"], r) for r in rows if (r["method"], r["hosts"]) == (method, hosts))
        xs = [p[0] / 1024 for p in pts]
        style = "-" if hosts > 1 else "--"
        label = f"{method} ({hosts} GPU{'s' if hosts > 1 else ''})"
        axes[0].plot(xs, [p[1]["total_s"] for p in pts], style, marker="o", label=label)
        axes[1].plot(xs, [p[1]["phase1_s"] for p in pts], style, marker="o", label=label)
        axes[2].plot(xs, [p[1]["decode_ms_per_token"] for p in pts], style, marker="o", label=label)
    titles = (
        f"seconds per request ({raw['args']['new_tokens']} new tokens)",
        "Phase 1 (context encoding) s",
        "decode ms / token",
    )
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (K tokens)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Llama-3.1-8B shape, {raw['gpu']}, torch {raw['versions']['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model and short lengths (smoke test)")
    parser.add_argument("--nprocs", type=int, default=None, help="processes (GPUs); default: all GPUs, 2 on CPU")
    parser.add_argument("--lengths", type=str, default=None, help="comma-separated context lengths")
    parser.add_argument("--hosts", type=str, default="1,2,4,8", help="hosts per request to try (those dividing nprocs)")
    parser.add_argument("--methods", type=str, default=",".join(METHODS))
    parser.add_argument("--blocks", type=int, default=4, help="star block = anchor = context / blocks")
    parser.add_argument("--query-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--backend", type=str, default="auto")
    parser.add_argument("--decode", type=str, default="auto", help="auto, eager, static or graph (star/ring)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each request up to --repeat-below tokens")
    parser.add_argument("--repeat-below", type=int, default=32768)
    parser.add_argument("--warmup-length", type=int, default=None)
    parser.add_argument("--time-budget-s", type=float, default=460.0, help="start no request after this")
    parser.add_argument("--collective-timeout-s", type=int, default=300)
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--out", type=str, default=str(ROOT / "benchmarks"))
    parser.add_argument("--report", type=str, default=None, help="re-render results.md/png from a raw JSON")
    args = parser.parse_args(argv)
    if args.lengths is None:
        args.lengths = "256,512" if args.tiny else "16384,32768,65536,131072"
    args.lengths = [int(x) for x in args.lengths.split(",") if x]
    args.hosts = [int(x) for x in args.hosts.split(",") if x]
    args.methods = [m for m in args.methods.split(",") if m]
    if args.warmup_length is None:
        args.warmup_length = 64 if args.tiny else 4096
    args.command_line = "python scripts/benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.report:
        render(json.loads(Path(args.report).read_text()), out_dir)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; use --device cpu --tiny for the smoke test")
    world = args.nprocs or (torch.cuda.device_count() if args.device == "cuda" else 2)
    for stale in out_dir.glob("benchmark_rank*.log"):
        stale.unlink()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    mp.spawn(worker, args=(world, args), nprocs=world, join=True)
    raw_path = out_dir / "raw_results.json"
    render(json.loads(raw_path.read_text()), out_dir)
    print((out_dir / "results.md").read_text())


if __name__ == "__main__":
    main()
