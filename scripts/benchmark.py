#!/usr/bin/env python
"""Star vs ring vs dense, seconds per request, through the product's own paths, on the GPUs you have.

Real hosts: ``--nprocs N`` launches N processes through the project's Fabric strategy (``StarFabricStrategy``,
NCCL on GPUs, gloo on CPU); every request goes through ``star_lightning.engine.request.generate`` over the strategy's
context-parallel group. Simulated hosts: ``--simulate-hosts 4,8,32`` runs each host's Phase 1 share of an H-host
plan in turn on one GPU (``star_lightning.engine.simulate``), with the bytes each host sends and their time modelled at
stated link speeds (``star_lightning.plan``); such records say ``"simulated": true``. Dense is the model exactly as
``--model.attention dense`` sets it up. The model is a Llama-3.1-8B-shaped model with random weights
(``--tiny``: 2 layers, for a CPU smoke test).

    python scripts/benchmark.py --simulate-hosts 4,8,32 --block-size 32768     # one GPU: 128K, 256K, 1M tokens
    python scripts/benchmark.py --nprocs 2 --lengths 65536,131072              # real hosts, NCCL
    python scripts/benchmark.py --device cpu --tiny --simulate-hosts 2,4        # smoke test (the suite runs it)
    python scripts/benchmark.py --report benchmarks/results.json                # re-render results.md / .png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

for _name, _value in (
    ("NCCL_NVLS_ENABLE", "0"),
    ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
    ("NVSHMEM_DISABLE_NVLS", "1"),
):
    os.environ.setdefault(_name, _value)  # NVLink multicast stays off on the lent machines (KINDS.md)

from star_lightning.bench import speed  # noqa: E402
from star_lightning.engine.request import answer  # noqa: E402
from star_lightning.engine.settings import ATTENTIONS, GenerationSettings, StarSettings  # noqa: E402
from star_lightning.engine.simulate import simulate_request  # noqa: E402
from star_lightning.models import build_model, set_attention  # noqa: E402
from star_lightning.parallel.group import SingleHostGroup  # noqa: E402

METHODS = ATTENTIONS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model (smoke test)")
    p.add_argument("--nprocs", type=int, default=1, help="real hosts: processes launched through StarFabricStrategy")
    p.add_argument("--simulate-hosts", default="", help="host counts simulated on one device, e.g. 4,8,32")
    p.add_argument("--lengths", default="", help="context lengths; default: hosts x block size (simulated) ")
    p.add_argument("--block-size", type=int, default=32768, help="star block (and default anchor) size")
    p.add_argument("--anchor-sizes", default="", help="star anchor sizes to run (default: the block size)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--anchor-sources", default="broadcast,host", help="star: broadcast, host, block")
    p.add_argument("--query-aware", default="star", help="star variants: star, aq (anchor_query), aq+pt (and passing)")
    p.add_argument("--passing-tokens", default="32", help="aq+pt: passing tokens per host and layer, e.g. 32,1024")
    p.add_argument("--ring-layouts", default="zigzag,contiguous")
    p.add_argument("--ring-sample-hosts", type=int, default=0, help="simulated ring: run only this many hosts (>=2)")
    p.add_argument("--star-sample-hosts", type=int, default=0,
                   help="simulated star: run only this many hosts (>=2; host 0 and the last always); with passing "
                        "tokens the hosts left out pass zeros of the real shapes (timing only)")  # fmt: skip
    p.add_argument("--queries-per-context", default="", help="K queries on one context (the first plan), e.g. 1,4,16")
    p.add_argument("--query-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--max-dense-length", type=int, default=262144, help="longest context dense runs (memory)")
    p.add_argument("--gpu-rates", default="measure", help="'measure' (in this run) or 'table' (plan's table)")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed run of each variant's shapes")
    p.add_argument("--append", action="store_true", help="add the records to the run already in --out")
    p.add_argument("--out", default="benchmarks")
    p.add_argument("--report", default=None, help="re-render results.md/png from a results.json")
    args = p.parse_args(argv)
    split = lambda text: [x for x in text.split(",") if x]  # noqa: E731
    args.simulate_hosts, args.methods = [int(x) for x in split(args.simulate_hosts)], split(args.methods)
    args.lengths, args.anchor_sizes = [int(x) for x in split(args.lengths)], [int(x) for x in split(args.anchor_sizes)]
    args.anchor_sources, args.ring_layouts = split(args.anchor_sources), split(args.ring_layouts)
    args.query_aware, args.passing_tokens = split(args.query_aware), [int(x) for x in split(args.passing_tokens)]
    args.queries_per_context = [int(x) for x in split(args.queries_per_context)]
    args.command = "python scripts/benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv)
    return args


def variants(args: argparse.Namespace, length: int) -> list[StarSettings]:
    """Every method setting to run at one length (the block size capped at the length)."""
    block = min(args.block_size, length)
    out = []
    if "star" in args.methods:
        for anchor in args.anchor_sizes or [block]:
            for source in args.anchor_sources:
                for variant in args.query_aware:
                    query = variant in ("aq", "aq+pt")
                    for passing in args.passing_tokens if variant == "aq+pt" else [0]:
                        out.append(StarSettings("star", block, min(anchor, block), anchor_source=source,  # type: ignore[arg-type]
                                                anchor_query=query, passing_tokens=passing))  # fmt: skip
    if "ring" in args.methods:
        out += [StarSettings("ring", block, ring_layout=layout) for layout in args.ring_layouts]  # type: ignore[arg-type]
    if "dense" in args.methods and length <= args.max_dense_length:
        out.append(StarSettings("dense", block))
    return out


def request_ids(model: Any, length: int, tokens: int, seed: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (1, tokens), generator=generator).to(device)  # [1, tokens]


def run_simulated(model: Any, args: argparse.Namespace, env: dict[str, Any], log: Any, records: list) -> list[dict]:
    settings = GenerationSettings(max_new_tokens=args.new_tokens)
    for hosts in args.simulate_hosts:
        for length in args.lengths or [hosts * args.block_size]:
            context = request_ids(model, length, length, 1, env["device"])
            query = request_ids(model, length, args.query_tokens, 2, env["device"])
            for star in variants(args, length):
                if star.attention == "dense":
                    continue
                set_attention(model, star.attention)
                sample = {"ring": args.ring_sample_hosts, "star": args.star_sample_hosts}.get(star.attention) or hosts
                run_hosts = sorted({round(i * (hosts - 1) / max(1, sample - 1)) for i in range(sample)})
                try:
                    with torch.inference_mode():
                        if not args.no_warmup:  # kernel plans and the compiled decode step for these shapes, untimed
                            simulate_request(
                                model, context, query, hosts, star, settings, run_hosts=[0, min(1, hosts - 1)]
                            )
                        sim = simulate_request(model, context, query, hosts, star, settings, run_hosts=run_hosts)
                except torch.OutOfMemoryError as error:
                    log(f"OOM {star} hosts={hosts} L={length}: {str(error)[:200]}")
                    records.append(speed.make_record(env, star, hosts, length, None, failure="out of memory"))
                    continue
                records.append(speed.make_record(env, star, hosts, length, sim))
                log(records[-1]["summary"])
    return records


def run_dense(model: Any, args: argparse.Namespace, env: dict[str, Any], log: Any, records: list) -> list[dict]:
    lengths = sorted({*(args.lengths or []), *(h * args.block_size for h in args.simulate_hosts)})
    for length in lengths:
        if "dense" not in args.methods or length > args.max_dense_length:
            continue
        star = StarSettings("dense", min(args.block_size, length))
        set_attention(model, "dense")
        context = request_ids(model, length, length, 1, env["device"])
        query = request_ids(model, length, args.query_tokens, 2, env["device"])
        try:
            with torch.inference_mode():
                records.append(speed.make_record(env, star, 1, length, _one_request(model, context, query, star, args)))
        except torch.OutOfMemoryError as error:
            log(f"OOM dense L={length}: {str(error)[:200]}")
            records.append(speed.make_record(env, star, 1, length, None, failure="out of memory"))
            continue
        log(records[-1]["summary"])
    return records


def _one_request(model: Any, context: torch.Tensor, query: torch.Tensor, star: StarSettings, args: Any) -> Any:
    from star_lightning.engine.request import generate

    return generate(model, context, query, SingleHostGroup(), star, GenerationSettings(args.new_tokens))


def run_reuse(model: Any, args: argparse.Namespace, env: dict[str, Any], log: Any) -> list[dict[str, Any]]:
    """K queries on one context of the first simulated plan: Phase 1 once (every host, simulated), then K answers
    on the query host over its kept context, rolled back before each query (what predict does for shared contexts)."""
    hosts = args.simulate_hosts[0]
    length = (args.lengths or [hosts * args.block_size])[0]
    star = StarSettings("star", min(args.block_size, length), anchor_source="broadcast")
    set_attention(model, "star")
    settings = GenerationSettings(max_new_tokens=args.new_tokens)
    context = request_ids(model, length, length, 1, env["device"])
    first = request_ids(model, 0, args.query_tokens, 2, env["device"])
    with torch.inference_mode():
        sim = simulate_request(model, context, first, hosts, star, settings, keep_context=True)
    assert sim.context is not None and sim.query_group is not None
    records = []
    for k in args.queries_per_context:
        answers = []
        with torch.inference_mode():
            for i in range(k):
                sim.context.rollback()
                query = request_ids(model, 0, args.query_tokens, 100 + i, env["device"])
                answers.append(answer(model, sim.context, query, sim.query_group, star, settings)[1])
        records.append(speed.make_record(env, star, hosts, length, sim, queries=answers))
        log(records[-1]["summary"])
    return records


def run_real(fabric: Any, model: Any, args: argparse.Namespace, env: dict[str, Any], log: Any) -> list[dict]:
    """Every host a real process: the strategy's context group, one request per (method, length)."""
    from star_lightning.engine.request import generate

    group = fabric.strategy.context_group
    records = []
    for length in args.lengths:
        context = request_ids(model, length, length, 1, env["device"])
        query = request_ids(model, length, args.query_tokens, 2, env["device"])
        for star in variants(args, length):
            if star.attention == "dense":
                continue
            set_attention(model, star.attention)
            fabric.barrier()
            with torch.inference_mode():
                result = generate(model, context, query, group, star, GenerationSettings(args.new_tokens))
            per_host = fabric.strategy.gather_in_context_group(result.stats)
            if fabric.global_rank == 0:
                records.append(speed.make_record(env, star, group.size, length, per_host, tokens=result.token_ids))
                log(records[-1]["summary"])
    return records


class Saved(list):
    """The run's records, written to ``OUT/results.json`` whenever one is added."""

    def __init__(self, out: Path, env: dict[str, Any], records: list[dict[str, Any]]) -> None:
        super().__init__(records)
        self.out, self.env = out, env
        self._write()

    def _write(self) -> None:
        payload = {"environment": speed.jsonable(self.env), "records": list(self)}
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(payload, indent=1) + "\n")
        tmp.replace(self.out / "results.json")

    def append(self, record: dict[str, Any]) -> None:  # type: ignore[override]
        super().append(record)
        self._write()

    def extend(self, records: Any) -> None:  # type: ignore[override]
        super().extend(records)
        self._write()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    if args.report:
        speed.render(json.loads(Path(args.report).read_text()), out)
        return
    from lightning.fabric import Fabric

    from star_lightning.parallel.fabric import StarFabricStrategy

    accelerator = "cuda" if args.device == "cuda" else "cpu"
    strategy = StarFabricStrategy(context_parallel_size=args.nprocs, timeout_s=600)
    fabric = Fabric(accelerator=accelerator, devices=args.nprocs, strategy=strategy)
    fabric.launch()
    started = time.perf_counter()

    def log(message: str) -> None:
        if fabric.global_rank == 0:
            print(f"[{time.perf_counter() - started:7.1f}s] {message}", flush=True)

    env = speed.environment(
        fabric.device, tiny=args.tiny, rates=args.gpu_rates, nprocs=args.nprocs, command=args.command
    )
    log(f"{env['gpu']} x {args.nprocs}, {env['versions']}, rates {env['rates']}")
    config = speed.tiny_config() if args.tiny else speed.llama_8b_config()
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    speed.with_model(env, config, dtype, args.query_tokens, args.new_tokens)
    model = build_model(config, dtype=dtype, device=fabric.device, attention="star")
    records: list[dict[str, Any]] = []
    if args.nprocs > 1:
        records += run_real(fabric, model, args, env, log)
    if fabric.global_rank == 0:  # one GPU's work: the others wait at the barrier below
        out.mkdir(parents=True, exist_ok=True)
        if args.append and (out / "results.json").exists():
            earlier = json.loads((out / "results.json").read_text())
            records = earlier["records"] + records
            env["command"] = earlier["environment"]["command"] + " && " + env["command"]
        saved = Saved(out, env, records)  # results.json after every record: a run stopped midway keeps them
        run_simulated(model, args, env, log, saved)
        run_dense(model, args, env, log, saved)
        if args.queries_per_context and args.simulate_hosts:
            saved.extend(run_reuse(model, args, env, log))
        speed.render(json.loads((out / "results.json").read_text()), out)
        log(f"done: {len(saved)} records in {out}")
    fabric.barrier()


if __name__ == "__main__":
    main()
