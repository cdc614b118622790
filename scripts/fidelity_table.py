"""Star vs dense accuracy of a model on RULER (and BABILong), with intervals, measured through the project's own
generate -> predict -> score.

Why a script: the fidelity tables in the README and the results files must come from the same commands a user runs,
so every cell calls `star_lightning.cli.main` (in process, to skip a Python start per cell) and nothing is computed on
the side. Per length: dense runs every task given; the `--hardest` (3) tasks with the lowest dense score at or above
`--dense-floor` (50) get the star cells, the others are listed apart with dense's score. Cells (`--configs`, names in
`CONFIGS`): dense; star at blocks of L/4 and L/8 (anchor = block), L/8 with anchor = block/4; at L/8 the question in
the anchor (`aq`, `--model.anchor_query true`, the request's `question`) with and without passing tokens (`aq+pt`,
block / 32 per host and layer, as many hosts as blocks played in one process: `--model.simulate_hosts 0`), and the
old form (`aq-old`: the whole `input_query`, chat turn end and answer prefix included, after the anchor: the
requests' `question` set to their `input_query`). More cells: `--configs` lists them all.

Each task's score comes with its 95% interval (Wilson for 0/1 scores, percentile bootstrap for fractions) and each
star cell's share of dense over the chosen tasks with a paired, task-stratified percentile bootstrap over the same
requests (`star_lightning.bench.intervals`, `star_lightning.bench.fidelity`). OUT.json keeps every request's score
of every cell, so the intervals can be recomputed.

Resumable: work files (requests, joined requests, predictions) are named by a digest of what they are made from and
listed in WORK/manifest.json; a rerun reuses the ones made from the same inputs (predict resumes a partial
predictions file) and refuses, in one line, a file made from other inputs (another `--tasks` or `--num-samples` over
the same `--work` writes other files; a file without a manifest entry is stale).

The shipped tiny model, on CPU:

    python scripts/fidelity_table.py --num-samples 100 --lengths 2048 4096

A real model from a GGUF file (scripts/assemble_model.py makes it), one GPU, one length at a time:

    python scripts/fidelity_table.py --model qwen2.5-coder-0.5b-instruct-q4_k_m.gguf --device cuda --decode graph \
        --lengths 16384 --num-samples 100 --out benchmarks/fidelity_qwen05b_16k
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
from star_lightning.bench.fidelity import (
    PAIRING,
    SCORE_INTERVAL,
    WorkManifest,
    essays_file,
    hardest_tasks,
    per_request_scores,
    share,
    spec_digest,
    table_paths,
    task_intervals,
)
from star_lightning.bench.tasks import BABILONG_TASKS
from star_lightning.cli import main as cli_main
from star_lightning.data.jsonl import write_json_atomic
from star_lightning.errors import ConfigurationError

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
        CONFIGS[f"aq-old_{_suffix}"] = _star(_d, _a, anchor_query=True)  # its requests: question = input_query
LABELS = {"star": "star", "aq": "star + anchor_query", "aq+pt": "star + anchor_query + passing_tokens",
          "aq-old": "star + anchor_query, old form (whole input_query)"}  # fmt: skip


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
        options += ["--model.passing_tokens", str(block // PASSING_FRACTION), "--model.simulate_hosts", "0"]
    return options


def run_cli(argv: list[str]) -> str:
    """Run one `star-lightning` command in process; return its stdout, fail loudly on a non-zero status."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        status = cli_main(argv)
    if status:
        raise RuntimeError(f"star-lightning {' '.join(argv)} exited {status}:\n{buf.getvalue()}")
    return buf.getvalue()


def generate_argv(task: str, length: int, model: Path, args: argparse.Namespace, essays: Path, out: Path) -> list[str]:
    common = ["--task", task, "--tokenizer", str(model), "--length", str(length), "--num_samples",
              str(args.num_samples), "--seed", str(args.seed), "--output", str(out)]  # fmt: skip
    if task in BABILONG_TASKS:
        return ["generate", "--benchmark", "babilong", *common, "--data_dir", str(args.babilong_dir)]
    return ["generate", "--benchmark", "ruler", *common] + (["--essays", str(essays)] if task in ESSAY_TASKS else [])


def join_requests(files: list[Path], out: Path, *, old_form: bool = False) -> None:
    """The tasks' request files as one, written atomically: indices renumbered so they stay unique (each keeps its
    task's own as ``source_index``, which pairs it across cells), each bounded by its task's answer length
    (``MAX_NEW_TOKENS``, as when each task ran alone). ``old_form``: ``question`` = the whole ``input_query``, so
    ``--model.anchor_query`` puts what it put before the question field existed after the anchor."""
    lines = []
    for path in files:
        for line in path.read_text().splitlines():
            if line.strip():
                request = json.loads(line)
                request["source_index"] = request["index"]
                request["index"] = len(lines)
                cap = MAX_NEW_TOKENS.get(request["task"], 16)  # each task's answer bound, as a predict of its own
                request["max_new_tokens"] = min(cap, request.get("max_new_tokens") or cap)
                if old_form:
                    request["question"] = request["input_query"]
                lines.append(json.dumps(request, ensure_ascii=False))
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)


def predict_argv(model: Path, data: Path, out: Path, config: str, length: int, args: argparse.Namespace) -> list[str]:
    return ["predict", "--model.pretrained", str(model), *config_options(config, length), "--model.dtype", args.dtype,
            "--model.decode", args.decode, "--model.max_new_tokens", str(max(MAX_NEW_TOKENS.values())),
            "--data.path", str(data), "--output", str(out), "--trainer.accelerator", args.device,
            "--trainer.devices", "1", "--trainer.enable_progress_bar", "false"]  # fmt: skip


class Work:
    """The work folder: request and prediction files named by what they are made from, checked by the manifest."""

    def __init__(self, args: argparse.Namespace, model: Path) -> None:
        self.args, self.model = args, model
        self.dir: Path = args.work
        self.manifest = WorkManifest(self.dir)
        self.essays = essays_file(self.dir / "pydoc_essays.txt")
        self.model_id = {"model": str(model), "bytes": model.stat().st_size if model.is_file() else None}

    def requests(self, task: str, length: int) -> Path:
        spec = {"kind": "generate", "task": task, "length": length, "num_samples": self.args.num_samples,
                "seed": self.args.seed, **self.model_id,
                "babilong_dir": str(self.args.babilong_dir) if task in BABILONG_TASKS else None}  # fmt: skip
        path = self.dir / f"{task}_{length}_{spec_digest(spec)}.jsonl"
        if not self.manifest.check(path, spec):
            run_cli(generate_argv(task, length, self.model, self.args, self.essays, path))
            self.manifest.record(path, spec)
        return path

    def joined(self, tasks: list[str], length: int, *, old_form: bool = False) -> Path:
        files = [self.requests(task, length) for task in tasks]
        spec = {"kind": "join", "files": [f.name for f in files], "old_form": old_form}
        path = self.dir / f"requests_{length}_{spec_digest(spec)}{'_old_form' if old_form else ''}.jsonl"
        if not self.manifest.check(path, spec):
            join_requests(files, path, old_form=old_form)
            self.manifest.record(path, spec)
        return path

    def predictions(self, data: Path, config: str, length: int) -> Path:
        argv = predict_argv(self.model, data, Path("OUT"), config, length, self.args)
        spec = {"kind": "predict", "requests": data.name, "argv": argv}
        path = self.dir / f"pred_{length}_{config.replace('/', '')}_{spec_digest(spec)}.jsonl"
        self.manifest.check(path, spec)  # refuses a stale one; predict resumes a partial one
        self.manifest.record(path, spec)
        t0 = time.time()
        run_cli(predict_argv(self.model, data, path, config, length, self.args))
        print(f"{length} {config}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
        return path


def measure_length(work: Work, length: int, tasks: list[str], configs: list[str], args: argparse.Namespace) -> dict:
    """Dense over every task, then the star cells over the hardest ones; each cell's intervals and share."""
    dense_file = work.predictions(work.joined(tasks, length), "dense", length)
    dense = per_request_scores(dense_file)
    missing = [task for task in tasks if task not in dense]
    if missing:
        raise ConfigurationError(f"{dense_file}: no predictions of {', '.join(missing)}; remove it and rerun")
    dense_score = {task: 100.0 * sum(v.values()) / len(v) for task, v in dense.items() if task in tasks}
    chosen, others = hardest_tasks(dense_score, args.dense_floor, args.hardest)
    cells: dict[str, dict] = {"dense": {"tasks": task_intervals({t: dense[t] for t in tasks})}}
    if chosen:
        cells["dense"]["share"] = share({t: dense[t] for t in chosen}, dense, chosen)
    for config in configs:
        if config == "dense" or not chosen:
            continue
        data = work.joined(chosen, length, old_form=config.startswith("aq-old"))
        scores = per_request_scores(work.predictions(data, config, length))
        cells[config] = {"tasks": task_intervals(scores), "share": share(scores, dense, chosen),
                         "options": config_options(config, length)}  # fmt: skip
    return {"hardest": chosen, "others_dense": others, "cells": cells}


def label(config: str) -> str:
    """``aq+pt_L/8_a/4`` -> ``star + anchor_query + passing_tokens, block L/8, anchor block/4``."""
    if config == "dense":
        return "dense"
    if config == "star_L/4_no_anchor":
        return "star, block L/4, no anchor"
    kind, rest = config.split("_", 1)
    block, _, anchor = rest.partition("_a/")
    return f"{LABELS[kind]}, block {block}, anchor " + (f"block/{anchor}" if anchor else "= block")


def _cell_text(entry: dict | None) -> str:
    if not entry:
        return "-"
    return f"{entry['value']:.1f} [{entry['low']:.1f}, {entry['high']:.1f}]"


def markdown(results: dict, args: argparse.Namespace, configs: list[str]) -> str:
    """Per length, one row per cell: each chosen task's score [95% interval] and the share of dense [paired 95%]."""
    out = []
    for length, measured in results.items():
        chosen = measured["hardest"]
        head = ["cell", *chosen, "share of dense"]
        lines = [f"**{int(length) // 1024}K**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for config in configs:
            cell = measured["cells"].get(config)
            if cell is None:
                continue
            row = [label(config), *(_cell_text(cell["tasks"].get(t)) for t in chosen), _cell_text(cell.get("share"))]
            lines.append("| " + " | ".join(row) + " |")
        others = measured["others_dense"]
        if others:
            listed = ", ".join(f"{task} {score:.1f}" for task, score in sorted(others.items()))
            lines += ["", f"Not among the {args.hardest} hardest with dense >= {args.dense_floor:g} (dense's score): "
                      f"{listed}."]  # fmt: skip
        out.append("\n".join(lines))
    counts = sorted({e["n"] for m in results.values() for c in m["cells"].values() for e in c["tasks"].values()})
    precision = args.dtype if args.dtype != "auto" else ("float32" if args.device == "cpu" else "bfloat16")
    note = (
        f"Score 0-100 [95% interval: {SCORE_INTERVAL}]; share of dense = sum of star's scores / sum of dense's over "
        f"the tasks shown [95% interval: {PAIRING}]. Requests per task and cell: {counts}; greedy, "
        f"{args.device.upper()} {precision}, one process (passing tokens: as many hosts as blocks, played in it). "
        f"Block and anchor as fractions of the sequence length L; passing tokens = block / {PASSING_FRACTION}. "
        "aq = the request's question after the anchor; aq-old = the whole input_query there (the form before the "
        "question field). Essay haystack: Python's documentation text (pydoc_data)."
    )
    return "\n\n".join(out) + "\n\n" + note + "\n"


DEFAULT_CONFIGS = ["dense", "star_L/4", "star_L/8", "star_L/8_a/4", "aq_L/8", "aq+pt_L/8", "aq-old_L/8"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="model folder or .gguf file; default: the shipped tiny_lm")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="one CPU process or one GPU")
    p.add_argument("--dtype", default="auto", help="--model.dtype of every cell (auto: float32 on CPU, bf16 on GPU)")
    p.add_argument("--decode", default="auto", help="--model.decode of every cell (graph: no compile per cell)")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--tasks", nargs="*", default=TASKS, help="RULER tasks (none: only BABILong)")
    p.add_argument("--babilong-dir", type=Path, default=None, help="BABILong data (generate --data_dir): its tasks too")
    p.add_argument("--babilong-tasks", nargs="+", default=list(BABILONG_TASKS), choices=list(BABILONG_TASKS))
    p.add_argument("--dense-floor", type=float, default=50.0, help="star cells only where dense scores this or more")
    p.add_argument("--hardest", type=int, default=3, help="star cells on this many tasks: dense's lowest >= the floor")
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=list(CONFIGS))
    p.add_argument("--num-samples", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path("outputs/fidelity"), help="requests and predictions")
    p.add_argument("--out", type=Path, default=Path("benchmarks/fidelity"), help="writes OUT.md and OUT.json")
    p.add_argument("--model-card", type=Path, default=None, help="README.md whose fidelity section to replace")
    args = p.parse_args(argv)
    if args.num_samples <= 0 or args.hardest <= 0 or any(length <= 0 for length in args.lengths):
        print("fidelity_table: error: --num-samples, --hardest and --lengths must be positive", file=sys.stderr)
        return 2

    model = args.model or default_model_path()
    tasks = list(args.tasks) + (list(args.babilong_tasks) if args.babilong_dir is not None else [])
    title = f"# Star vs dense accuracy of {'the shipped tiny_lm' if args.model is None else model.name}\n\n"
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = table_paths(args.out)
    meta = {"model": str(model), "device": args.device, "dtype": args.dtype, "num_samples": args.num_samples,
            "seed": args.seed, "dense_floor": args.dense_floor, "hardest": args.hardest, "tasks": tasks,
            "score_interval": SCORE_INTERVAL, "share_interval": PAIRING}  # fmt: skip
    saved = json.loads(json_path.read_text()) if json_path.exists() else {}
    results: dict = saved.get("lengths", {})
    configs = ["dense", *(c for c in args.configs if c != "dense")]
    try:
        decided = ("model", "device", "dtype", "num_samples", "seed", "dense_floor", "hardest")
        changed = [f"{k} {saved['meta'].get(k)!r} -> {meta[k]!r}" for k in decided
                   if "meta" in saved and saved["meta"].get(k) != meta[k]]  # fmt: skip
        if changed:  # another run's table: not mixed in (its predictions stay in --work, named by what made them)
            print(f"fidelity_table: {json_path} held another run's table ({'; '.join(changed)}); starting it afresh",
                  file=sys.stderr)  # fmt: skip
            results = {}
        work = Work(args, model)
        for length in args.lengths:
            results[str(length)] = measure_length(work, length, tasks, configs, args)
            write_json_atomic(json_path, {"meta": meta, "lengths": results})
            table = markdown(results, args, [c for c in CONFIGS if c in configs])
            md_path.write_text(title + table)
            if args.model_card:
                card = args.model_card.read_text()
                start, end = "<!-- fidelity:start -->", "<!-- fidelity:end -->"
                before, rest = card.split(start, 1)
                args.model_card.write_text(before + start + "\n" + table + end + rest.split(end, 1)[1])
    except ConfigurationError as error:
        print(f"fidelity_table: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
