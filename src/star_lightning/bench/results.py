"""Result tables and plots: accuracy per task x length x attention method, and star / global ratios.

Runs are prediction files; each line carries ``task`` and ``length``. The attention method of a file is given
(``--run attention=star,path=FILE``) or read from its path: a folder or file name containing ``star``, ``dense``
or ``ring`` (``runs/star/niah_4096.jsonl``, ``dense_qa_1.jsonl``). Global attention is dense, or ring where no
dense run exists: the paper's baseline.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import re
import sys
from dataclasses import dataclass
from typing import Any, cast

from star_lightning.bench.scoring import score_records
from star_lightning.bench.tasks import TASK_ORDER
from star_lightning.data.jsonl import read_predictions
from star_lightning.errors import ConfigurationError

METHODS = ("star", "dense", "ring")


@dataclass(frozen=True)
class Run:
    """One predictions file and the attention method that produced it; ``length`` fills lines without one."""

    path: pathlib.Path
    attention: str
    length: int | None = None


def parse_run(spec: str) -> Run:
    """Parse ``attention=star,path=FILE[,length=N]``."""
    fields: dict[str, str] = {}
    for item in spec.split(","):
        key, separator, value = item.partition("=")
        if not separator or key.strip() not in ("attention", "path", "length"):
            raise ConfigurationError(f"--run {spec!r}: expected attention=NAME,path=FILE[,length=N].")
        fields[key.strip()] = value.strip()
    if "path" not in fields or "attention" not in fields:
        raise ConfigurationError(f"--run {spec!r}: both attention= and path= are required.")
    if fields["attention"] not in METHODS:
        raise ConfigurationError(f"--run {spec!r}: attention must be one of {', '.join(METHODS)}.")
    length = fields.get("length")
    if length is not None and not length.isdigit():
        raise ConfigurationError(f"--run {spec!r}: length must be an integer number of tokens.")
    return Run(pathlib.Path(fields["path"]), fields["attention"], int(length) if length else None)


def method_from_path(path: pathlib.Path) -> str | None:
    """The attention method named by the innermost path component that names exactly one."""
    for part in reversed(path.parts):
        found = [method for method in METHODS if re.search(rf"(^|[^a-z]){method}([^a-z]|$)", part.lower())]
        if len(found) == 1:
            return found[0]
    return None


def discover(directory: pathlib.Path) -> list[Run]:
    """All ``*.jsonl`` prediction files under ``directory`` whose path names an attention method."""
    if not directory.is_dir():
        raise ConfigurationError(f"--dir {directory}: no such folder.")
    runs = []
    for path in sorted(directory.rglob("*.jsonl")):
        method = method_from_path(path.relative_to(directory))
        if method is not None:
            runs.append(Run(path, method))
    if not runs:
        raise ConfigurationError(f"--dir {directory}: no .jsonl file whose name or folder names star, dense or ring.")
    return runs


def collect_scores(runs: list[Run]) -> dict[tuple[str, int, str], float]:
    """Score every run; keys are (task, length, attention)."""
    records: list[dict[str, Any]] = []
    for run in runs:
        for record in read_predictions(run.path):
            if "length" not in record:
                if run.length is None:
                    raise ConfigurationError(f"{run.path}: lines have no 'length'; give it with --run ...,length=N.")
                record["length"] = run.length
            record["_attention"] = run.attention
            records.append(record)
    scores, _ = score_records(records, group=lambda r: (r["task"], int(r["length"]), r["_attention"]))
    return cast(dict[tuple[str, int, str], float], scores)


def _task_order(key: tuple[str, int]) -> tuple[int, str, int]:
    """RULER's task order, then BABILong's, then anything else by name; lengths ascending."""
    task, length = key
    return (TASK_ORDER.index(task) if task in TASK_ORDER else len(TASK_ORDER), task, length)


def global_score(row: dict[str, Any]) -> float | None:
    """Dense if measured, else ring: the exact-attention baseline."""
    return row.get("dense") if row.get("dense") is not None else row.get("ring")


def build_table(scores: dict[tuple[str, int, str], float]) -> dict[str, Any]:
    """Rows per (task, length) and per-length means over the tasks all methods ran, with star / global."""
    rows = []
    for task, length in sorted({(task, length) for task, length, _ in scores}, key=_task_order):
        row: dict[str, Any] = {"task": task, "length": length}
        for method in METHODS:
            row[method] = scores.get((task, length, method))
        rows.append(_with_ratio(row))
    means = []
    for length in sorted({length for _, length, _ in scores}):
        methods = {method for _, n, method in scores if n == length}
        tasks = {task for task, n, _ in scores if n == length}
        # Average only the tasks every method ran at this length, so the methods' means are comparable.
        common = sorted(task for task in tasks if all((task, length, method) in scores for method in methods))
        row = {"task": "mean", "length": length, "num_tasks": len(common)}
        for method in METHODS:
            values = [scores[task, length, method] for task in common if method in methods]
            row[method] = sum(values) / len(values) if values else None
        means.append(_with_ratio(row))
    return {"rows": rows, "means": means}


def _with_ratio(row: dict[str, Any]) -> dict[str, Any]:
    baseline = global_score(row)
    row["global"] = baseline
    star = row.get("star")
    row["star_over_global"] = star / baseline if star is not None and baseline else None
    return row


def _cell(value: float | None, ratio: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3f}" if ratio else f"{value:.1f}"


def to_markdown(table: dict[str, Any]) -> str:
    """A Markdown table: task, length, the three methods' scores (0-100) and star / global."""
    header = "| task | length | star | dense | ring | star / global |\n|---|---:|---:|---:|---:|---:|"
    lines = [header]
    for row in table["rows"] + table["means"]:
        name = f"**mean** ({row['num_tasks']} tasks)" if row["task"] == "mean" else row["task"]
        cells = [_cell(row[method]) for method in METHODS] + [_cell(row["star_over_global"], ratio=True)]
        lines.append(f"| {name} | {row['length']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(table: dict[str, Any], path: pathlib.Path) -> None:
    """Mean accuracy over tasks against length, one line per attention method (PNG, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for method in METHODS:
        points = [(row["length"], row[method]) for row in table["means"] if row[method] is not None]
        if points:
            lengths, values = zip(*points, strict=True)
            axes.plot(lengths, values, marker="o", label=method)
    axes.set_xscale("log", base=2)
    lengths_seen = sorted({row["length"] for row in table["means"]})
    axes.set_xticks(lengths_seen, [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths_seen])
    axes.minorticks_off()
    axes.set_xlabel("sequence length (tokens)")
    axes.set_ylabel("mean accuracy over tasks (%)")
    axes.set_ylim(-2, 102)
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="star-lightning table",
        description="Tabulate prediction files as task x length x attention (star/dense/ring) with star/global.",
    )
    parser.add_argument("--run", action="append", default=[], help="attention=star|dense|ring,path=FILE[,length=N]")
    parser.add_argument("--dir", action="append", default=[], help="folder searched for *.jsonl naming a method")
    parser.add_argument("--out", required=True, help="output prefix: writes PREFIX.md, PREFIX.json, PREFIX.png")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Write the Markdown table, the JSON and the plot; print the Markdown."""
    args = build_parser().parse_args(argv)
    try:
        runs = [parse_run(spec) for spec in args.run]
        for directory in args.dir:
            runs += discover(pathlib.Path(directory))
        if not runs:
            raise ConfigurationError("nothing to tabulate: give --run attention=...,path=... or --dir DIR.")
        table = build_table(collect_scores(runs))
    except ConfigurationError as error:
        print(f"star-lightning table: error: {error}", file=sys.stderr)
        return 2
    prefix = pathlib.Path(args.out)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(table)
    prefix.with_suffix(".md").write_text(markdown, encoding="utf-8")
    prefix.with_suffix(".json").write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    plot(table, prefix.with_suffix(".png"))
    print(markdown, end="")
    return 0
