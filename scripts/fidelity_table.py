"""Star vs dense accuracy of a model on RULER (and BABILong), measured through the project's own generate -> predict
-> score.

Why a script: the fidelity tables in the README and the model card must come from the same commands a user runs,
so every cell calls `star_lightning.cli.main` (in process, to skip a Python start per cell) and nothing is
computed on the side. Cells (`--configs`, names in `CONFIGS`): dense; at blocks of 1/4 and 1/8 of the sequence
length and anchors of the whole block or a quarter of it (`_a/4`): star, star with the query in the anchor (`aq`,
`--model.anchor_query true`) and star with the query in the anchor and passing tokens (`aq+pt`,
`--model.passing_tokens` = block / 32, on as many hosts as blocks: `--model.simulate_hosts`, so one process predicts
what that many hosts predict); and star at block 1/4 without the anchor (`--model.anchor false`). One predict per
length and cell runs every task's requests (one file: the tasks' files joined), then `score` splits them by task.
Resumable: finished cells are read back from the JSON and skipped, and predict resumes a partial predictions file.

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
# name: --model.* options of the cell, given the sequence length (block sizes are fractions of it).
PASSING_FRACTION = 32  # aq+pt: passing tokens per host and layer = block / 32


def _star(divisor: int, anchor_divisor: int = 1, *, anchor_query: bool = False, passing: bool = False) -> dict:
    return {"divisor": divisor, "anchor_divisor": anchor_divisor, "anchor_query": anchor_query, "passing": passing}


CONFIGS: dict[str, dict] = {"dense": {}, "star_L/4_no_anchor": {"divisor": 4, "anchor": False}}
for _d in (4, 8):
    for _a in (1, 4):
        _suffix = f"L/{_d}" + ("" if _a == 1 else f"_a/{_a}")
        CONFIGS[f"star_{_suffix}"] = _star(_d, _a)
        CONFIGS[f"aq_{_suffix}"] = _star(_d, _a, anchor_query=True)
        CONFIGS[f"aq+pt_{_suffix}"] = _star(_d, _a, anchor_query=True, passing=True)
LABELS = {"star": "star", "aq": "star + anchor_query", "aq+pt": "star + anchor_query + passing_tokens"}


def config_options(config: str, length: int) -> list[str]:
    """The cell's ``--model.*`` options at this sequence length."""
    spec = CONFIGS[config]
    if not spec:
        return ["--model.attention", "dense"]
    block = length // spec["divisor"]
    options = ["--model.attention", "star", "--model.block_size", str(block)]
    if spec.get("anchor") is False:
        return [*options, "--model.anchor", "false"]
    options += ["--model.anchor_block_size", str(block // spec["anchor_divisor"])]
    if spec["anchor_query"]:
        options += ["--model.anchor_query", "true"]
    if spec["passing"]:
        options += ["--model.passing_tokens", str(block // PASSING_FRACTION), "--model.simulate_hosts",
                    str(spec["divisor"])]  # fmt: skip
    return options


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


def cell(model: Path, data: Path, out: Path, tasks: list[str], length: int, config: str, args) -> dict[str, dict]:
    """One predict of ``config`` over the joined requests of ``tasks``; each task's score."""
    argv = ["predict", "--model.pretrained", str(model), *config_options(config, length), "--model.dtype", args.dtype,
            "--model.decode", args.decode, "--model.max_new_tokens", str(max(MAX_NEW_TOKENS.values())),
            "--data.path", str(data), "--output", str(out), "--trainer.accelerator", args.device,
            "--trainer.devices", "1", "--trainer.enable_progress_bar", "false"]  # fmt: skip
    t0 = time.time()
    run_cli(argv)
    seconds = round(time.time() - t0, 1)
    scores = json.loads(run_cli(["score", str(out)]))
    return {task: {"score": scores["tasks"][task], "count": scores["counts"][task], "predict_seconds": seconds}
            for task in tasks}  # fmt: skip


def join_requests(files: list[Path], out: Path) -> None:
    """The tasks' request files as one, written once: indices renumbered so they stay unique, each line bounded by its
    task's answer length (``MAX_NEW_TOKENS``, as when each task ran alone)."""
    if out.exists():
        return
    lines = []
    for path in files:
        for line in path.read_text().splitlines():
            if line.strip():
                request = json.loads(line)
                request["index"] = len(lines)
                cap = MAX_NEW_TOKENS.get(request["task"], 16)  # each task's answer bound, as a predict of its own
                request["max_new_tokens"] = min(cap, request.get("max_new_tokens") or cap)
                lines.append(json.dumps(request, ensure_ascii=False))
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)


def below_floor(results: dict, length: int, task: str, floor: float) -> bool:
    dense = results.get(f"{length}/{task}/dense")
    return dense is not None and dense["score"] < floor


def label(config: str) -> str:
    """``aq+pt_L/8_a/4`` -> ``star + anchor_query + passing_tokens, block L/8, anchor block/4``."""
    if config == "dense":
        return "dense"
    if config == "star_L/4_no_anchor":
        return "star, block L/4, no anchor"
    kind, rest = config.split("_", 1)
    block, _, anchor = rest.partition("_a/")
    return f"{LABELS[kind]}, block {block}, anchor " + (f"block/{anchor}" if anchor else "= block")


NIAH = [task for task in TASKS if task.startswith("niah")]


def markdown(results: dict, lengths: list[int], tasks: list[str], n: int, device: str, floor: float, dtype: str,
             configs: list[str]) -> str:  # fmt: skip
    """Per length, one row per cell: each task's score, the mean over the NIAH tasks dense can do and its share of
    dense's."""
    out = []
    for length in lengths:
        shown = [t for t in tasks if not below_floor(results, length, t, floor)]
        niah = [t for t in shown if t in NIAH]
        head = ["cell", *shown, "NIAH mean", "share of dense (NIAH)"]
        lines = [f"**{length // 1024}K**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        dense = [results.get(f"{length}/{t}/dense", {}).get("score") for t in niah]
        dense_mean = sum(dense) / len(dense) if dense and None not in dense else None
        for config in configs:
            cells = [results.get(f"{length}/{t}/{config}") for t in shown]
            if not any(cells):
                continue
            row = [label(config), *(f"{c['score']:.1f}" if c else "-" for c in cells)]
            niah_scores = [results.get(f"{length}/{t}/{config}", {}).get("score") for t in niah]
            mean = sum(niah_scores) / len(niah_scores) if niah_scores and None not in niah_scores else None
            row.append("-" if mean is None else f"{mean:.1f}")
            share = None if mean is None or not dense_mean else 100 * mean / dense_mean
            row.append("-" if share is None else f"{share:.1f}%")
            lines.append("| " + " | ".join(row) + " |")
        out.append("\n".join(lines))
    counts = sorted({r["count"] for r in results.values()})
    precision = dtype if dtype != "auto" else ("float32" if device == "cpu" else "bfloat16")
    note = (
        f"Score 0-100 (RULER: the share of reference values found in the answer; BABILong: its "
        f"compare_answers), {n} requests per cell (counts seen: {counts}), greedy, {device.upper()} {precision}, "
        "one process (passing tokens: as many hosts as blocks, played in it with `--model.simulate_hosts`). Block "
        f"and anchor as fractions of the sequence length L; passing tokens = block / {PASSING_FRACTION} per host and "
        "layer. "
        "Essay haystack: Python's documentation text (pydoc_data). '-' = not run."
    )
    dropped = [(L, t, results[f"{L}/{t}/dense"]["score"]) for L in lengths for t in tasks
               if below_floor(results, L, t, floor)]  # fmt: skip
    if dropped:
        listed = ", ".join(f"{t} at {L // 1024}K ({score:.1f})" for L, t, score in dropped)
        note += f" Dense below {floor:g}, so no star cells (and not in the means): {listed}."
    return "\n\n".join(out) + "\n\n" + note + "\n"


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
    saved = json.loads(json_path.read_text()) if json_path.exists() else {}
    results: dict = saved.get("cells", {})
    essays = essays_file(args.work / "pydoc_essays.txt")
    configs = ["dense", *(c for c in args.configs if c != "dense")]  # dense first: it decides the floor
    for length in args.lengths:
        files = []
        for task in tasks:
            data = args.work / f"{task}_{length}.jsonl"
            if not data.exists():
                run_cli(generate_argv(task, length, model, args, essays, data))
            files.append(data)
        for config in configs:
            todo = [t for t in tasks if f"{length}/{t}/{config}" not in results
                    and (config == "dense" or not below_floor(results, length, t, args.dense_floor))]  # fmt: skip
            if not todo:
                continue
            name = "_".join(todo) if len(todo) < len(tasks) else "all"
            joined = args.work / f"requests_{length}_{name}.jsonl"
            join_requests([args.work / f"{t}_{length}.jsonl" for t in todo], joined)
            out = args.work / f"pred_{length}_{name}_{config.replace('/', '')}.jsonl"
            for task, result in cell(model, joined, out, todo, length, config, args).items():
                results[f"{length}/{task}/{config}"] = result
                print(f"{length}/{task}/{config}", result, file=sys.stderr, flush=True)
            meta = {**saved.get("meta", {}), "model": str(model), "device": args.device, "dtype": args.dtype,
                    "num_samples": args.num_samples, "seed": args.seed, "dense_floor": args.dense_floor,
                    "configs_at_4k": {k: config_options(k, 4096) for k in CONFIGS}}  # fmt: skip
            json_path.write_text(json.dumps({"meta": meta, "cells": results}, indent=2) + "\n")
            table = markdown(results, args.lengths, tasks, args.num_samples, args.device, args.dense_floor,
                             args.dtype, [c for c in CONFIGS if c in configs])  # fmt: skip
            md_path.write_text(title + table)
            if args.model_card:
                card = args.model_card.read_text()
                start, end = "<!-- fidelity:start -->", "<!-- fidelity:end -->"
                before, rest = card.split(start, 1)
                args.model_card.write_text(before + start + "\n" + table + end + rest.split(end, 1)[1])


if __name__ == "__main__":
    main()
