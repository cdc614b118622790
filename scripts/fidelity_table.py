"""Star vs dense accuracy of a model on RULER (and BABILong), measured through the project's own generate -> predict
-> score.

Why a script: the fidelity tables in the README and the model card must come from the same commands a user runs,
so every cell calls `star_lightning.cli.main` (in process, to skip a Python start per cell) and nothing is
computed on the side. Cells: dense; star with block = anchor = 1/4 and 1/8 of the sequence length; star with
block 1/4 and the anchor switched off (`--model.anchor false`). Resumable: finished cells are read back from the
JSON and skipped, and predict resumes a partial predictions file.

A task whose dense score at a length is below `--dense-floor` gets no star cells there (the model cannot do it at
all, so star has nothing to keep); the table lists it apart with its dense score.

The shipped tiny model, on CPU:

    python scripts/fidelity_table.py --num-samples 100 --lengths 2048 4096

A real third-party model from a GGUF file (SmolLM2-135M-Instruct, trained to 8K), on one GPU:

    python scripts/fidelity_table.py --model SmolLM2-135M-Instruct.Q4_1.gguf --device cuda --lengths 4096 8192 \
        --tasks niah_single_1 niah_single_2 niah_single_3 --num-samples 100 --out benchmarks/fidelity_smollm2 \
        [--babilong-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

from star_lightning.assets import default_model_path
from star_lightning.bench.tasks import BABILONG_TASKS
from star_lightning.cli import main as cli_main

TASKS = [
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multikey_2",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
]
ESSAY_TASKS = {"niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue", "niah_multiquery"}
# Answers are short and the model ends them with </s>; these caps only bound a runaway answer.
# cwe and fwe list several words: their bounds are RULER's own tokens_to_generate.
MAX_NEW_TOKENS = {"niah_single_3": 48, "niah_multivalue": 48, "niah_multiquery": 48, "vt": 40, "cwe": 120, "fwe": 50}
CONFIGS = {  # name: (attention, block = length // divisor, anchor on)
    "dense": ("dense", 0, True),
    "star_L/4": ("star", 4, True),
    "star_L/8": ("star", 8, True),
    "star_L/4_no_anchor": ("star", 4, False),
}
ASCII_FIXES = {"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "\u2026": "...", "\u2014": "--",
               "\u2013": "-"}  # fmt: skip


def essays_file(path: Path) -> Path:
    """Python's documentation text as the essay haystack (RULER's Paul Graham essays need a download)."""
    if not path.exists():
        import pydoc_data.topics as topics

        text = "\n".join(topics.topics[k] for k in sorted(topics.topics))
        for bad, good in ASCII_FIXES.items():
            text = text.replace(bad, good)
        path.write_text(text)
    return path


def run_cli(argv: list[str]) -> str:
    """Run one `star-lightning` command in process; return its stdout, fail loudly on a non-zero status."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        status = cli_main(argv)
    if status:
        raise RuntimeError(f"star-lightning {' '.join(argv)} exited {status}:\n{buf.getvalue()}")
    return buf.getvalue()


def cell(model: Path, data: Path, out: Path, task: str, length: int, config: str, args: argparse.Namespace) -> dict:
    attention, divisor, anchor = CONFIGS[config]
    device = args.device
    argv = ["predict", "--model.pretrained", str(model), "--model.attention", attention, "--model.dtype", args.dtype,
            "--model.decode", args.decode,
            "--model.max_new_tokens", str(MAX_NEW_TOKENS.get(task, 16)), "--data.path", str(data),
            "--output", str(out), "--trainer.accelerator", device, "--trainer.devices", "1",
            "--trainer.enable_progress_bar", "false"]  # fmt: skip
    if attention == "star":
        block = length // divisor
        argv += ["--model.block_size", str(block), "--model.anchor", str(anchor).lower()]
        if anchor:
            argv += ["--model.anchor_block_size", str(block)]
    t0 = time.time()
    run_cli(argv)
    seconds = time.time() - t0
    scores = json.loads(run_cli(["score", str(out)]))
    return {"score": scores["tasks"][task], "count": scores["counts"][task], "predict_seconds": round(seconds, 1)}


def below_floor(results: dict, length: int, task: str, floor: float) -> bool:
    dense = results.get(f"{length}/{task}/dense")
    return dense is not None and dense["score"] < floor


def markdown(results: dict, lengths: list[int], tasks: list[str], n: int, device: str, floor: float, dtype: str) -> str:
    configs = list(CONFIGS)
    head = ["task"] + [f"{L // 1024}K {c}" for L in lengths for c in configs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    shown = [t for t in tasks if not all(below_floor(results, L, t, floor) for L in lengths)]
    for task in [*shown, "mean"]:
        row = [task]
        for L in lengths:
            counted = [t for t in shown if not below_floor(results, L, t, floor)]
            for c in configs:
                if task == "mean":
                    vals = [results.get(f"{L}/{t}/{c}", {}).get("score") for t in counted]
                    vals = [v for v in vals if v is not None]
                    row.append(f"{sum(vals) / len(vals):.1f}" if vals and len(vals) == len(counted) else "-")
                else:
                    r = results.get(f"{L}/{task}/{c}")
                    row.append(f"{r['score']:.1f}" if r else "-")
        lines.append("| " + " | ".join(row) + " |")
    counts = sorted({r["count"] for r in results.values()})
    precision = dtype if dtype != "auto" else ("float32" if device == "cpu" else "bfloat16")
    note = (
        f"Score 0-100 (RULER: the share of reference values found in the answer; BABILong: its "
        f"compare_answers), {n} requests per cell (counts seen: {counts}), greedy, {device.upper()} {precision}, "
        "one process. Star: block = anchor = 1/4 or 1/8 of the sequence length; no_anchor: block 1/4 with "
        "`--model.anchor false`. Essay haystack: Python's documentation text (pydoc_data). '-' = not run."
    )
    dropped = [(L, t, results[f"{L}/{t}/dense"]["score"]) for L in lengths for t in tasks
               if below_floor(results, L, t, floor)]  # fmt: skip
    if dropped:
        listed = ", ".join(f"{t} at {L // 1024}K ({score:.1f})" for L, t, score in dropped)
        note += f" Dense below {floor:g}, so no star cells (and not in the mean): {listed}."
    return "\n".join(lines) + "\n\n" + note + "\n"


def generate_argv(task: str, length: int, model: Path, args: argparse.Namespace, essays: Path, out: Path) -> list[str]:
    common = ["--task", task, "--tokenizer", str(model), "--length", str(length), "--num_samples",
              str(args.num_samples), "--seed", str(args.seed), "--output", str(out)]  # fmt: skip
    if task in BABILONG_TASKS:
        return ["generate", "--benchmark", "babilong", *common, "--data_dir", str(args.babilong_dir)]
    return ["generate", "--benchmark", "ruler", *common] + (["--essays", str(essays)] if task in ESSAY_TASKS else [])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="model folder or .gguf file; default: the shipped tiny_lm")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="one CPU process or one GPU")
    p.add_argument("--dtype", default="auto", help="--model.dtype of every cell (auto: float32 on CPU, bf16 on GPU)")
    p.add_argument("--decode", default="auto", help="--model.decode of every cell (graph: no compile per cell)")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--tasks", nargs="*", default=TASKS, help="RULER tasks (none: only BABILong)")
    p.add_argument("--babilong-dir", type=Path, default=None, help="BABILong data (generate --data_dir): its tasks too")
    p.add_argument("--babilong-tasks", nargs="+", default=list(BABILONG_TASKS), choices=list(BABILONG_TASKS))
    p.add_argument("--dense-floor", type=float, default=20.0, help="no star cells where dense scores below this")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--num-samples", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path("outputs/fidelity"), help="requests and predictions")
    p.add_argument("--out", type=Path, default=Path("benchmarks/fidelity"), help="writes OUT.md and OUT.json")
    p.add_argument("--model-card", type=Path, default=None, help="README.md whose fidelity section to replace")
    args = p.parse_args(argv)

    model = args.model or default_model_path()
    tasks = list(args.tasks) + (list(args.babilong_tasks) if args.babilong_dir is not None else [])
    title = f"# Star vs dense accuracy of {'the shipped tiny_lm' if args.model is None else model.name}\n\n"
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = args.out.with_suffix(".json"), args.out.with_suffix(".md")
    results: dict = json.loads(json_path.read_text())["cells"] if json_path.exists() else {}
    essays = essays_file(args.work / "pydoc_essays.txt")
    configs = ["dense", *(c for c in args.configs if c != "dense")]  # dense first: it decides the floor
    for length in args.lengths:
        for task in tasks:
            data = args.work / f"{task}_{length}.jsonl"
            if not data.exists():
                run_cli(generate_argv(task, length, model, args, essays, data))
            for config in configs:
                key = f"{length}/{task}/{config}"
                if key in results or (config != "dense" and below_floor(results, length, task, args.dense_floor)):
                    continue
                out = args.work / f"pred_{task}_{length}_{config.replace('/', '')}.jsonl"
                results[key] = cell(model, data, out, task, length, config, args)
                print(key, results[key], file=sys.stderr, flush=True)
                meta = {"model": str(model), "device": args.device, "dtype": args.dtype,
                        "num_samples": args.num_samples, "seed": args.seed, "dense_floor": args.dense_floor,
                        "configs": {k: list(v) for k, v in CONFIGS.items()}}  # fmt: skip
                json_path.write_text(json.dumps({"meta": meta, "cells": results}, indent=2) + "\n")
                table = markdown(
                    results, args.lengths, tasks, args.num_samples, args.device, args.dense_floor, args.dtype
                )
                md_path.write_text(title + table)
                if args.model_card:
                    card = args.model_card.read_text()
                    start, end = "<!-- fidelity:start -->", "<!-- fidelity:end -->"
                    before, rest = card.split(start, 1)
                    args.model_card.write_text(before + start + "\n" + table + end + rest.split(end, 1)[1])


if __name__ == "__main__":
    main()
