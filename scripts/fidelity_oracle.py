"""Star's accuracy frontier: how much of dense's accuracy making part of Phase 1 exact can recover, at what cost.

Each cell (``star_lightning.bench.oracle_cells``: dense, star, K/V replacement of r% of each block's tokens chosen by
deviation from dense / the question's attention / at random / by position, Delta rows, the question's rows exact,
a wider local context) runs every request through one masked forward of the model (star's Phase 1 as a mask, the
hosts played in one process; checked against the engine in tests/test_oracle.py) and the engine's own Phase 2, on
RULER requests from the project's generator, scored with RULER's metric. Each cell's extra Phase 1 FLOPs and bytes
per host come from the cost model at the Llama-3.1-8B shape, 128K on 4 hosts (``bench/oracle_costs.py``).

Resumable: every (cell, task, request) answer is appended to ``WORK/results.jsonl`` as it is made, and a rerun skips
what is there; ``WORK/meta.json`` pins the model, length, blocks and request files, and a rerun with other settings
over the same ``--work`` is refused (exit 2). Writes ``OUT.json`` and ``OUT.md``: per task the score with its 95%
interval, the share of dense with its paired bootstrap interval over the requests both cells answered, the extra
cost, and the Pareto frontier (cells no other cell beats on both share and extra Phase 1).

The shipped tiny model on CPU (2K, 3 tasks; dense and star on 100 requests a task, the other cells on fewer):

    nice -n 10 python scripts/fidelity_oracle.py --length 2048 --num-samples 100 --cells dense star
    nice -n 10 python scripts/fidelity_oracle.py --length 2048 --num-samples 100 --requests 30

A GGUF on one GPU (see benchmarks/frontier/README.md for the cells and the time per request):

    python scripts/fidelity_oracle.py --model qwen2.5-coder-0.5b-instruct-q4_k_m.gguf --device cuda --length 16384 \
        --threads 8 --time-limit 500 --work outputs/oracle/qwen05_16k --out benchmarks/frontier/qwen05_16384
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fidelity_table import MAX_NEW_TOKENS, essays_file, generate_argv, run_cli
from star_lightning.assets import default_model_path
from star_lightning.bench.fidelity import table_paths
from star_lightning.bench.intervals import score_interval, share_of_dense
from star_lightning.bench.metrics import string_match_all, string_match_part
from star_lightning.bench.oracle import GenerationSettings, register_oracle_attention
from star_lightning.bench.oracle_cells import DEFAULT_CELLS, Cell, Request, parse_cell, run_request
from star_lightning.bench.oracle_costs import extra_cost, llama_8b_scale
from star_lightning.bench.scoring import metric_for
from star_lightning.bench.throughput import window_layers
from star_lightning.models import load_config, load_model, load_tokenizer, model_fingerprint, resolve_dtype
from star_lightning.partition import plan_blocks
from star_lightning.tokens import context_ids, query_ids

TASKS = ["niah_single_3", "niah_multikey_1", "niah_multikey_2"]
# Item 3 of the issue: a cell becomes a star option when it keeps >= 95% of dense at L/8 on both Qwen models with
# <= 50% extra Phase 1 time.
QUALIFY_SHARE, QUALIFY_EXTRA, QUALIFY_N = 0.95, 0.50, 100


def fail(message: str) -> None:
    print(f"fidelity_oracle: {message}", file=sys.stderr)
    raise SystemExit(2)


def masked_attention(config: Any) -> str | None:
    """What of the model's attention the oracle cannot replay (sliding windows, soft-capped logits), or None."""
    windowed, window = window_layers(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if windowed:
        return f"sliding-window attention ({windowed} layers of window {window})"
    if getattr(text, "attn_logit_softcapping", None):
        return f"soft-capped attention logits ({text.attn_logit_softcapping})"
    return None


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_results(path: Path) -> dict[tuple[str, str, int], dict[str, Any]]:
    """Done answers by (cell, task, index); a torn last line (a killed run) is dropped, so its request is redone."""
    done: dict[tuple[str, str, int], dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[(row["cell"], row["task"], row["index"])] = row
    return done


def check_meta(work: Path, meta: dict[str, Any]) -> None:
    """Refuse (exit 2) a work folder holding a run of other settings: its answers would be mixed into this one."""
    path = work / "meta.json"
    if path.exists():
        saved = json.loads(path.read_text())
        changed = sorted(k for k in set(saved) | set(meta) if saved.get(k) != meta.get(k))
        if changed:
            fail(f"--work {work} holds a run with other {', '.join(changed)}; use another --work or delete it")
    else:
        write_atomic(path, json.dumps(meta, indent=1) + "\n")


def answer_budget(request: dict[str, Any]) -> int:
    """The fidelity table's answer bound for the task (``MAX_NEW_TOKENS``, 16 by default), within the request's."""
    return min(MAX_NEW_TOKENS.get(request["task"], 16), request.get("max_new_tokens") or 16)


def score(task: str, prediction: str, references: list[str]) -> float:
    metric = metric_for(task)
    return (string_match_all if metric == "match_all" else string_match_part)(prediction, references)


def summarize(
    done: dict, cells: list[Cell], tasks: list[str], scale_text: str, costs: dict, min_n: int = 30
) -> dict[str, Any]:
    """Per cell: each task's score (95% interval), the share of dense (paired interval over the requests both
    answered), the extra cost; then the Pareto frontier of share against extra Phase 1 among the cells whose share
    rests on at least ``min_n`` requests (a share of 2 requests would be on it by luck)."""
    by_cell: dict[str, dict[str, dict[int, float]]] = {}
    for (cell, task, index), row in done.items():
        by_cell.setdefault(cell, {}).setdefault(task, {})[index] = row["score"]
    rows: dict[str, Any] = {}
    dense = by_cell.get("dense", {})
    for cell in cells:
        scores = by_cell.get(cell.name, {})
        if not any(scores.get(t) for t in tasks):
            continue
        row: dict[str, Any] = {"cost": costs[cell.name], "tasks": {}}
        for task in tasks:
            values = [scores[task][i] for i in sorted(scores.get(task, {}))]
            if values:
                row["tasks"][task] = score_interval(values).as_dict(scale=100)
        paired_star = {t: [scores[t][i] for i in sorted(scores.get(t, {})) if i in dense.get(t, {})] for t in tasks}
        paired_dense = {t: [dense[t][i] for i in sorted(scores.get(t, {})) if i in dense.get(t, {})] for t in tasks}
        paired = [t for t in tasks if paired_star[t]]
        if paired and any(sum(paired_dense[t]) for t in paired):
            share = share_of_dense({t: paired_star[t] for t in paired}, {t: paired_dense[t] for t in paired})
            row["share_of_dense"] = share.as_dict()
            star = by_cell.get("star", {})
            same = {t: [i for i in sorted(scores.get(t, {})) if i in dense.get(t, {}) and i in star.get(t, {})]
                    for t in paired}  # fmt: skip
            if all(same[t] for t in paired) and sum(dense[t][i] for t in paired for i in same[t]):
                # Star's share over the same requests: a cell of few requests is read against it, not star's 100s.
                row["star_on_same_requests"] = share_of_dense(
                    {t: [star[t][i] for i in same[t]] for t in paired},
                    {t: [dense[t][i] for i in same[t]] for t in paired},
                ).as_dict()
        rows[cell.name] = row
    shared = {
        name: r for name, r in rows.items()
        if "share_of_dense" in r and name != "dense" and r["share_of_dense"]["n"] >= min_n
    }  # fmt: skip
    frontier = [
        name for name, r in shared.items()
        if not any(o["share_of_dense"]["value"] >= r["share_of_dense"]["value"]
                   and o["cost"]["extra_phase1"] <= r["cost"]["extra_phase1"]
                   and (o["share_of_dense"]["value"], o["cost"]["extra_phase1"])
                   != (r["share_of_dense"]["value"], r["cost"]["extra_phase1"]) for o in shared.values())
    ]  # fmt: skip
    frontier.sort(key=lambda name: shared[name]["cost"]["extra_phase1"])
    qualify = [
        name for name in frontier if shared[name]["cost"]["realizable"]
        and shared[name]["share_of_dense"]["value"] >= QUALIFY_SHARE
        and shared[name]["cost"]["extra_phase1"] <= QUALIFY_EXTRA
        and min(task["n"] for task in shared[name]["tasks"].values()) >= QUALIFY_N
    ]  # fmt: skip
    return {"cost_scale": scale_text, "cells": rows, "frontier": frontier, "frontier_min_n": min_n,
            "qualifying_here": qualify}  # fmt: skip


def _share_text(share: dict[str, Any] | None) -> str:
    return f"{100 * share['value']:.1f}% [{100 * share['low']:.1f}, {100 * share['high']:.1f}]" if share else "-"


def markdown(summary: dict[str, Any], tasks: list[str], title: str) -> str:
    head = ["cell", *tasks, "share of dense [95% CI]", "star on the same requests", "n / task", "extra Phase 1",
            "extra TFLOP / host", "extra MB sent / host"]  # fmt: skip
    lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    few = []
    for name, row in summary["cells"].items():
        if row.get("share_of_dense", {}).get("n", 0) < summary["frontier_min_n"]:
            few.append(f"{name} ({row.get('share_of_dense', {}).get('n', 0)})")
            continue
        cost = row["cost"]
        task_cells = [f"{row['tasks'][t]['value']:.1f}" if t in row["tasks"] else "-" for t in tasks]
        counts = "/".join(map(str, sorted({row["tasks"][t]["n"] for t in row["tasks"]})))
        mark = " **(frontier)**" if name in summary["frontier"] else ""
        flag = "" if cost["realizable"] else " (oracle)"
        shares = [_share_text(row.get("share_of_dense")), _share_text(row.get("star_on_same_requests"))]
        figures = [f"{100 * cost['extra_phase1']:+.1f}%", f"{cost['extra_flops'] / 1e12:.1f}",
                   f"{cost['extra_bytes'] / 1e6:.0f}"]  # fmt: skip
        lines.append("| " + " | ".join([f"{name}{mark}{flag}", *task_cells, *shares, counts, *figures]) + " |")
    lines += [
        "",
        f"Cells on fewer than {summary['frontier_min_n']} requests (in the JSON only): {', '.join(few) or 'none'}.",
        f"Scores 0-100 (RULER's string match), 95% intervals in the JSON (Wilson; bootstrap for fractional scores). "
        f"Share of dense: paired task-stratified bootstrap over the requests both cells answered. Costs at "
        f"{summary['cost_scale']}: extra Phase 1 = the slowest host's Phase 1 FLOPs against star's. (oracle): the "
        "choice needs dense's K/V, which no mechanism has; its cost is that of recomputing the rows.",
        f"Frontier (among cells whose share rests on >= {summary['frontier_min_n']} requests, none keeps more of "
        f"dense for less extra Phase 1): {', '.join(summary['frontier']) or '-'}. Shares of cells with different n "
        "rest on different requests: compare cells at the same n.",
        f"Decision rule (issue 29 item 3): a realizable cell on the frontier with share >= {QUALIFY_SHARE:.0%} on "
        f">= {QUALIFY_N} requests a task and extra Phase 1 <= {QUALIFY_EXTRA:.0%}, on both Qwen models at L/8, "
        f"becomes `--model.exact_rule`; here: {', '.join(summary['qualifying_here']) or 'none'}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="model folder or .gguf file; default: the shipped tiny_lm")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", default="auto", help="auto: float32 on CPU, bfloat16 on a GPU")
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--tasks", nargs="+", default=TASKS)
    p.add_argument("--num-samples", type=int, default=100, help="requests generated per task")
    p.add_argument("--requests", type=int, default=None, help="of those, how many per task these cells run")
    p.add_argument("--cells", nargs="+", default=list(DEFAULT_CELLS))
    p.add_argument("--block-divisor", type=int, default=8, help="blocks of L / this")
    p.add_argument("--anchor-divisor", type=int, default=1, help="anchor = block / this")
    p.add_argument("--frontier-min-n", type=int, default=30, help="requests a cell's share needs to enter the frontier")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reverse", action="store_true", help="take the requests last first (a second process's share)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the CPU run shares its cores)")
    p.add_argument("--time-limit", type=float, default=None, help="seconds; no new request starts after it")
    p.add_argument("--work", type=Path, default=None, help="requests and answers (default outputs/oracle/MODEL_LEN)")
    p.add_argument("--out", type=Path, default=None, help="writes OUT.json and OUT.md (default benchmarks/frontier/..)")
    args = p.parse_args(argv)
    args.babilong_dir = None
    try:
        cells = [parse_cell(name) for name in args.cells]
    except ValueError as error:
        fail(f"--cells: {error}")
    if args.model is not None and not args.model.exists():
        fail(f"--model {args.model} does not exist; pass a model folder or a .gguf file")
    if args.length < 2 * args.block_divisor:
        fail(f"--length {args.length} is too short for blocks of L/{args.block_divisor}")
    model_path = args.model or default_model_path()
    masked = masked_attention(load_config(str(model_path)))
    if masked:
        fail(f"{model_path} has {masked}, which the oracle's masked forward does not model; run it on a model with "
             "global attention only (Qwen2.5, Llama, SmolLM2)")  # fmt: skip
    name = "tiny_lm" if args.model is None else model_path.stem
    work = args.work or Path("outputs/oracle") / f"{name}_{args.length}"
    out = args.out or Path("benchmarks/frontier") / f"{name}_{args.length}"
    work.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    essays = essays_file(work / "pydoc_essays.txt")
    files = {}
    for task in args.tasks:
        files[task] = work / f"{task}_{args.length}_n{args.num_samples}_s{args.seed}.jsonl"
        if not files[task].exists():
            run_cli(generate_argv(task, args.length, model_path, args, essays, files[task]))
    dtype_name = args.dtype if args.dtype != "auto" else ("float32" if args.device == "cpu" else "bfloat16")
    meta = {"model": model_fingerprint(str(model_path)), "length": args.length, "dtype": dtype_name,
            "block_divisor": args.block_divisor, "anchor_divisor": args.anchor_divisor,
            "requests": {t: sha256(f) for t, f in files.items()}}  # fmt: skip
    check_meta(work, meta)
    results = work / "results.jsonl"
    done = read_results(results)
    if results.exists() and not results.read_bytes().endswith(b"\n") and results.stat().st_size:
        with results.open("a") as torn:  # a killed run's torn last line stays apart (unread); its answer is redone
            torn.write("\n")

    device = torch.device(args.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    torch.set_num_threads(args.threads)
    model = load_model(str(model_path), dtype=resolve_dtype(args.dtype, device), devices=[device], attention="star")
    register_oracle_attention(model)
    tokenizer = load_tokenizer(str(model_path))
    eos_ids: set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        eos_ids |= {value} if isinstance(value, int) else set(value or [])
    requests = {t: [json.loads(line) for line in f.read_text().splitlines() if line.strip()] for t, f in files.items()}
    count = min(args.requests or args.num_samples, *(len(r) for r in requests.values()))
    start, answered = time.time(), 0
    with results.open("a") as sink:
        for i in reversed(range(count)) if args.reverse else range(count):
            for task in args.tasks:
                todo = [c for c in cells if (c.name, task, i) not in done]
                if not todo:
                    continue
                if args.time_limit is not None and time.time() - start > args.time_limit:
                    print(f"time limit reached after {answered} requests", file=sys.stderr)
                    count = -1
                    break
                row = requests[task][i]
                context = context_ids(tokenizer, row["input_context"])
                plan = plan_blocks(len(context), args.length // args.block_divisor, 1,
                                   args.length // args.block_divisor // args.anchor_divisor)  # fmt: skip
                ids = lambda tokens: torch.tensor([tokens], device=device)  # noqa: E731 -- [1, n]
                question = query_ids(tokenizer, row.get("question") or row["input_query"])
                settings = GenerationSettings(max_new_tokens=answer_budget(row), eos_token_ids=frozenset(eos_ids))
                query = ids(query_ids(tokenizer, row["input_query"]))
                request = Request(f"{task}/{row['index']}", ids(context), ids(question), query, settings)
                for cell, tokens in run_request(model, request, plan, todo).items():
                    prediction = tokenizer.decode(tokens, skip_special_tokens=True)
                    line = {"cell": cell, "task": task, "index": i, "score": score(task, prediction, row["outputs"]),
                            "prediction": prediction, "device": device_name}  # fmt: skip
                    sink.write(json.dumps(line) + "\n")
                    done[(cell, task, i)] = line
                sink.flush()
                answered += 1
                print(f"{task} {i}: {len(todo)} cells, {time.time() - start:.0f} s", file=sys.stderr, flush=True)
            if count < 0:
                break

    all_cells = [parse_cell(n) for n in dict.fromkeys([*DEFAULT_CELLS, *args.cells])]
    scale = llama_8b_scale()
    costs = {c.name: extra_cost(c, scale) for c in all_cells}
    summary = summarize(done, all_cells, args.tasks, scale.describe(), costs, args.frontier_min_n)
    answered_on = ", ".join(sorted({str(row.get("device", "device unrecorded")) for row in done.values()}))
    summary.update(model=name, length=args.length, block=f"L/{args.block_divisor}",
                   anchor=f"block/{args.anchor_divisor}", dtype=dtype_name, device=answered_on)  # fmt: skip
    title = (f"# Star's frontier: {name}, {args.length // 1024}K, blocks of L/{args.block_divisor}, anchor = "
             f"block/{args.anchor_divisor} ({answered_on}, {dtype_name}, greedy)")  # fmt: skip
    json_path, md_path = table_paths(out)
    write_atomic(json_path, json.dumps(summary, indent=1) + "\n")
    write_atomic(md_path, markdown(summary, args.tasks, title))
    print(md_path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
