"""``star-lightning export --format reference``: predictions as the reference implementation writes them.

NVIDIA/Star-Attention's ``run_star_attn_inference.py`` writes one line per request with ``index``, ``pred``,
``input_context``, ``input_query``, ``outputs``, ``others``, ``truncation`` and ``length``, and its evaluators read
them: ``ruler/eval/evaluate.py`` (``input_context + input_query``, ``pred``, ``outputs``, ``others.get('id',
index)``, one ``{task}.jsonl`` per task) and ``babilong/gather_results_babilong.py`` (``outputs[0]``, ``pred``,
``input_query`` as the question). ``predict`` keeps only ``pred`` and the references, so the inputs are taken back
from the requests file ``predict`` read (contexts given once by ``context_id`` are resolved).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Any

from star_lightning.data.jsonl import read_records, read_requests, write_jsonl_atomic
from star_lightning.errors import ConfigurationError

FORMATS = ("reference",)


def read_inputs(requests: str | pathlib.Path, contexts_path: str | pathlib.Path | None) -> dict[int, dict[str, Any]]:
    """``index -> {input_context, input_query, others}`` of every request, read as ``predict`` reads them
    (``context_id`` lines resolved)."""
    inputs: dict[int, dict[str, Any]] = {}
    for request in read_requests(requests, contexts_path):
        others = request.get("others", {})
        if not isinstance(others, dict):
            where = f"{requests}: request {request['index']}"
            raise ConfigurationError(f"{where}: 'others' must be an object (the reference reads others['id']).")
        inputs[request["index"]] = {
            "input_context": request["input_context"], "input_query": request["input_query"], "others": others
        }  # fmt: skip
    return inputs


def reference_records(
    predictions: str | pathlib.Path, inputs: dict[int, dict[str, Any]], task: str | None
) -> list[dict[str, Any]]:
    """The lines the reference would have written, in index order."""
    records = []
    tasks: set[str] = set()
    for number, prediction in read_records(predictions, what="predictions file", tolerate_torn_tail=True):
        where = f"{predictions}, line {number}"
        if task is not None and prediction.get("task") != task:
            continue
        tasks.add(str(prediction.get("task")))
        index = prediction.get("index")
        if index not in inputs:
            raise ConfigurationError(
                f"{where}: index {index!r} is not in --requests; pass the requests file this prediction came from."
            )
        if not isinstance(prediction.get("pred"), str):
            raise ConfigurationError(f"{where}: no 'pred' string (the generated text).")
        outputs = prediction.get("outputs", [prediction["output"]] if "output" in prediction else None)
        if not isinstance(outputs, list) or not outputs:
            raise ConfigurationError(f"{where}: no reference answers ('outputs' list or 'output' string).")
        records.append(
            {
                "index": index,
                "pred": prediction["pred"],
                **{key: inputs[index][key] for key in ("input_context", "input_query")},
                "outputs": outputs,
                "others": inputs[index]["others"],
                "truncation": -1,  # star_lightning never truncates a prompt
                "length": prediction.get("length", -1),
            }
        )
    if len(tasks) > 1:
        raise ConfigurationError(
            f"{predictions} holds the tasks {', '.join(sorted(tasks))}; the reference evaluates one file per task "
            "({task}.jsonl): export each with --task NAME."
        )
    if not records:
        raise ConfigurationError(f"{predictions}: no predictions" + (f" of task {task}." if task else "."))
    return sorted(records, key=lambda record: record["index"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="star-lightning export",
        description="Write predictions in another program's format. reference: the lines NVIDIA/Star-Attention's "
        "inference writes, which its evaluators read (ruler/eval/evaluate.py reads DIR/{task}.jsonl; "
        "babilong/gather_results_babilong.py reads DIR/{16k,...}/{task}.jsonl).",
    )
    parser.add_argument("predictions", help="predictions JSONL written by star-lightning predict")
    parser.add_argument("--format", required=True, choices=FORMATS, help="output format")
    parser.add_argument("--requests", required=True, help="the requests JSONL that predict read (--data.path)")
    parser.add_argument("--contexts", help="contexts file that predict read (--data.contexts), if any")
    parser.add_argument("--task", help="export only this task's lines (needed when the file holds several)")
    parser.add_argument("--output", required=True, help="JSONL file to write (atomically)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``star-lightning export``; returns the exit status (2 on a usage error)."""
    args = build_parser().parse_args(argv)
    try:
        records = reference_records(args.predictions, read_inputs(args.requests, args.contexts), args.task)
        count = write_jsonl_atomic(args.output, records)
    except ConfigurationError as error:
        print(f"star-lightning export: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {count} predictions in the {args.format} format to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
