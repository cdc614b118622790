"""Star vs dense accuracy of a model on RULER, measured through the project's own generate -> predict -> score.

Why a script: the fidelity table in the README and the model card must come from the same commands a user runs,
so every cell calls `star_lightning.cli.main` (in process, to skip a Python start per cell) and nothing is
computed on the side. Cells: dense; star with block = anchor = 1/4 and 1/8 of the sequence length; star with
block 1/4 and the anchor switched off (`--model.anchor false`). Resumable: finished cells are read back from the
JSON and skipped, and predict resumes a partial predictions file.

    python scripts/fidelity_table.py --num-samples 100 --lengths 2048 4096
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
MAX_NEW_TOKENS = {"niah_single_3": 48, "niah_multivalue": 48, "niah_multiquery": 48, "vt": 40}
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


def cell(model: Path, data: Path, out: Path, task: str, length: int, config: str) -> dict:
    attention, divisor, anchor = CONFIGS[config]
    argv = ["predict", "--model.pretrained", str(model), "--model.attention", attention,
            "--model.max_new_tokens", str(MAX_NEW_TOKENS.get(task, 16)), "--data.path", str(data),
            "--output", str(out), "--trainer.accelerator", "cpu", "--trainer.devices", "1",
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


def markdown(results: dict, lengths: list[int], tasks: list[str], n: int) -> str:
    configs = list(CONFIGS)
    head = ["task"] + [f"{L // 1024}K {c}" for L in lengths for c in configs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task in [*tasks, "mean"]:
        row = [task]
        for L in lengths:
            for c in configs:
                if task == "mean":
                    vals = [results.get(f"{L}/{t}/{c}", {}).get("score") for t in tasks]
                    vals = [v for v in vals if v is not None]
                    row.append(f"{sum(vals) / len(vals):.1f}" if len(vals) == len(tasks) else "-")
                else:
                    r = results.get(f"{L}/{task}/{c}")
                    row.append(f"{r['score']:.1f}" if r else "-")
        lines.append("| " + " | ".join(row) + " |")
    counts = sorted({r["count"] for r in results.values()})
    note = (f"RULER score (0-100, the share of reference values found in the answer), {n} requests per cell "
            f"(counts seen: {counts}), greedy, CPU float32, one process. Star: block = anchor = 1/4 or 1/8 of the "
            "sequence length; no_anchor: block 1/4 with `--model.anchor false`. Essay haystack: Python's "
            "documentation text (pydoc_data). '-' = not run.")  # fmt: skip
    return "\n".join(lines) + "\n\n" + note + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="model folder; default: the shipped tiny_lm")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--tasks", nargs="+", default=TASKS)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--num-samples", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path("outputs/fidelity"), help="requests and predictions")
    p.add_argument("--out", type=Path, default=Path("benchmarks/fidelity"), help="writes OUT.md and OUT.json")
    p.add_argument("--model-card", type=Path, default=None, help="README.md whose fidelity section to replace")
    args = p.parse_args(argv)

    model = args.model or default_model_path()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = args.out.with_suffix(".json"), args.out.with_suffix(".md")
    results: dict = json.loads(json_path.read_text())["cells"] if json_path.exists() else {}
    essays = essays_file(args.work / "pydoc_essays.txt")
    for length in args.lengths:
        for task in args.tasks:
            data = args.work / f"{task}_{length}.jsonl"
            if not data.exists():
                gen = ["generate", "--benchmark", "ruler", "--task", task, "--tokenizer", str(model), "--length",
                       str(length), "--num_samples", str(args.num_samples), "--seed", str(args.seed), "--output",
                       str(data)]  # fmt: skip
                run_cli(gen + (["--essays", str(essays)] if task in ESSAY_TASKS else []))
            for config in args.configs:
                key = f"{length}/{task}/{config}"
                if key in results:
                    continue
                out = args.work / f"pred_{task}_{length}_{config.replace('/', '')}.jsonl"
                results[key] = cell(model, data, out, task, length, config)
                print(key, results[key], file=sys.stderr, flush=True)
                meta = {"model": str(model), "num_samples": args.num_samples, "seed": args.seed,
                        "configs": {k: list(v) for k, v in CONFIGS.items()}}  # fmt: skip
                json_path.write_text(json.dumps({"meta": meta, "cells": results}, indent=2) + "\n")
                table = markdown(results, args.lengths, args.tasks, args.num_samples)
                md_path.write_text("# Star vs dense accuracy of the shipped tiny_lm\n\n" + table)
                if args.model_card:
                    card = args.model_card.read_text()
                    start, end = "<!-- fidelity:start -->", "<!-- fidelity:end -->"
                    before, rest = card.split(start, 1)
                    args.model_card.write_text(before + start + "\n" + table + end + rest.split(end, 1)[1])


if __name__ == "__main__":
    main()
