"""``star-lightning score PREDICTIONS.jsonl``: benchmark scores (0-100) of a predictions file.

Each line needs ``pred`` (the generated text), ``task`` (or ``--task``) and the references as ``outputs`` (a list)
or ``output`` (a string); BABILong lines also need ``question``. Each line is scored on its own, also where several
lines share one context (``context_id``). The metric follows the task: RULER's string-match-part for
qa_1/qa_2, string-match-all for the other RULER tasks, BABILong's rule for qa1-qa5.

Printed JSON: ``{"tasks": {task: score}, "counts": {task: n}, "mean": mean of the task scores}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
from collections.abc import Callable, Iterable
from typing import Any

from star_lightning.bench.metrics import BABILONG_LABELS, BabilongAccuracy, StringMatchAll, StringMatchPart
from star_lightning.bench.tasks import METRIC_BY_TASK
from star_lightning.data.jsonl import read_predictions as read_prediction_file
from star_lightning.data.jsonl import torn_last_line
from star_lightning.data.run_record import in_ranges, load_record, record_path
from star_lightning.errors import ConfigurationError

METRICS = ("auto", "match_all", "match_part", "babilong")


def metric_for(task: str, override: str = "auto") -> str:
    """The metric name for ``task``: ``match_all``, ``match_part`` or ``babilong``."""
    if override != "auto":
        return override
    if task in METRIC_BY_TASK:
        return METRIC_BY_TASK[task]
    raise ConfigurationError(f"No known metric for task {task!r}; pass --metric match_all|match_part|babilong.")


def references_of(record: dict[str, Any], where: str) -> list[str]:
    """The reference answers: ``outputs`` (list of strings) or ``output`` (one string)."""
    if "outputs" in record:
        outputs = record["outputs"]
        if isinstance(outputs, str):
            return [outputs]
        if isinstance(outputs, list) and outputs and all(isinstance(item, str) for item in outputs):
            return outputs
        raise ConfigurationError(f"{where}: 'outputs' must be a non-empty list of strings.")
    if isinstance(record.get("output"), str):
        return [record["output"]]
    raise ConfigurationError(f"{where}: no reference answers; expected 'outputs' (list) or 'output' (string).")


Located = tuple[str, dict[str, Any]]  # ("FILE, line N", record)


def read_predictions(paths: Iterable[str | pathlib.Path]) -> list[Located]:
    """Every record of the files, each with where it was read (for error messages); a file holding one request
    twice is refused."""
    return [located for path in paths for located in read_prediction_file(path)]


def _babilong_question(record: dict[str, Any], where: str) -> str:
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ConfigurationError(
            f"{where}: no 'question'; BABILong's rule needs it (answer labels the question names do not count). "
            "Add the sample's question to the line as 'question' (star-lightning generate --benchmark babilong "
            "writes it into the requests and predict copies it into the predictions)."
        )
    return question


def score_records(
    records: Iterable[Located],
    *,
    group: Callable[[dict[str, Any]], Any] = lambda record: record["task"],
    metric: str = "auto",
    default_task: str | None = None,
) -> tuple[dict[Any, float], dict[Any, int]]:
    """Score ``(where, record)`` pairs grouped by ``group(record)``; returns (score 0-100, count) per group.

    Every line is scored on its own: lines that share a context (``context_id``) count once each.
    """
    metrics: dict[Any, Any] = {}
    for where, record in records:
        if default_task is not None:
            record.setdefault("task", default_task)
        if "task" not in record:
            raise ConfigurationError(
                f"{where}: no 'task' field, so the metric is unknown; pass --task NAME (e.g. --task niah_single_1 "
                "or --task qa1) to score lines without one."
            )
        if not isinstance(record.get("pred"), str):
            raise ConfigurationError(f"{where}: no 'pred' string (the generated text).")
        key = group(record)
        name = metric_for(record["task"], metric)
        if name == "babilong" and record["task"] not in BABILONG_LABELS:
            raise ConfigurationError(
                f"{where}: BABILong scoring covers {', '.join(BABILONG_LABELS)}, not {record['task']!r}."
            )
        if key not in metrics:
            # These records are all there is (one file, read whole): never sum them with another process's, which
            # torchmetrics would do wherever torch.distributed is up (a Python session that ran predict first).
            local = {"sync_on_compute": False}
            if name == "babilong":
                metrics[key] = BabilongAccuracy(record["task"], **local)
            else:
                metrics[key] = StringMatchAll(**local) if name == "match_all" else StringMatchPart(**local)
        references = references_of(record, where)
        if name == "babilong":
            metrics[key].update([record["pred"]], [references[0]], [_babilong_question(record, where)])
        else:
            metrics[key].update([record["pred"]], [references])
    scores = {key: float(value.compute()) for key, value in metrics.items()}
    counts = {key: int(value.count) for key, value in metrics.items()}
    return scores, counts


def summarize(scores: dict[Any, float], counts: dict[Any, int]) -> dict[str, Any]:
    """The printed summary: per-task scores, counts and their unweighted mean (RULER averages over tasks)."""
    ordered = sorted(scores)
    mean = sum(scores[task] for task in ordered) / len(ordered) if ordered else math.nan
    return {
        "tasks": {str(task): round(scores[task], 4) for task in ordered},
        "counts": {str(task): counts[task] for task in ordered},
        "mean": round(mean, 4),
    }


def _run_record(path: str) -> dict[str, Any] | None:
    """The run record beside a predictions file (None without one), its fields checked for what score reads: a
    damaged one is one line with score's way out, not predict's advice or a traceback."""
    try:
        record = load_record(path)
        if record is None:
            return None
        skipped, indices = record.get("skipped_too_long"), record.get("request_indices")
        if skipped is not None and not (isinstance(skipped, list) and all(isinstance(s, dict) for s in skipped)):
            raise ValueError("'skipped_too_long' is not a list of objects")
        if indices is not None and not (
            isinstance(indices, list)
            and all(
                isinstance(pair, list) and len(pair) == 2 and all(type(end) is int for end in pair) for pair in indices
            )
        ):
            raise ValueError("'request_indices' is not a list of [first, last] index pairs")
    except ValueError as error:
        raise ConfigurationError(
            f"the run record {record_path(path)} beside {path} is damaged ({error}), so it cannot vouch for the "
            "file; rerun the predict command with --overwrite true to make both again, or move the record away to "
            "score the file without its checks"
        ) from None
    return record


def _note_skipped(path: str) -> None:
    """Requests ``predict --data.on_too_long skip`` left out are not in the file, so not in its scores: say so."""
    record = _run_record(path)
    skipped = (record or {}).get("skipped_too_long") or []
    if skipped:
        print(
            f"star-lightning score: note: {path} leaves out {len(skipped)} request(s) too long for the model "
            f"(predict --data.on_too_long skip; listed in {record_path(path)}); the scores cover the others",
            file=sys.stderr,
        )


def _refuse_the_same_file_twice(paths: list[str]) -> None:
    """One file given twice (by two paths, or a link) would count each of its requests twice."""
    seen: dict[tuple[int, int], str] = {}
    for path in paths:
        try:
            status = os.stat(path)
        except OSError:
            continue  # reading it names the problem
        key = (status.st_dev, status.st_ino)
        if key in seen:
            raise ConfigurationError(
                f"{path} and {seen[key]} are the same file, so each of its requests would count twice; give each "
                "predictions file once"
            )
        seen[key] = path


def _refuse_two_runs_of_one_request_set(paths: list[str], files: list[list[Located]]) -> None:
    """Two predictions files of one request file (their run records hold the same input bytes) that both hold a
    request would count it twice: refused, naming the files and the request."""
    seen: dict[tuple[str, int], str] = {}
    for path, located in zip(paths, files, strict=True):
        record = _run_record(path)
        if record is None or not isinstance(requests := record["prediction_settings"].get("requests"), str):
            continue
        for _, prediction in located:
            index = prediction.get("index")
            if not isinstance(index, int):
                continue
            other = seen.setdefault((requests, index), path)
            if other != path:
                raise ConfigurationError(
                    f"{other} and {path} are two runs over the same requests ({record.get('request_file')}; both "
                    f"hold index {index}), so each request would count twice; score each run on its own"
                )


def _read_file(path: str) -> list[Located]:
    """A predictions file's records: a torn last line (a run stopped while writing it) is left out, with a warning;
    a line whose index is no request of the run that wrote the file (its run record lists them) is refused."""
    located = read_prediction_file(path)
    torn = torn_last_line(path)
    if torn is not None:
        print(
            f"star-lightning score: warning: {path}, line {torn} is cut short (a run stopped while writing it) and is "
            "not scored; rerun the same predict command to complete the file",
            file=sys.stderr,
        )
    requests = (_run_record(path) or {}).get("request_indices")
    if requests is not None:
        for where, record in located:
            index = record.get("index")
            if isinstance(index, int) and not in_ranges(index, requests):
                raise ConfigurationError(
                    f"{where}: index {index} is no request of the run that wrote this file (its run record "
                    f"{record_path(path)} lists them), so it would be counted; remove the line (added by hand or by "
                    "another run), or score a file one run wrote"
                )
    return located


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="star-lightning score",
        description='Score prediction JSONL files; prints {"tasks": {...}, "counts": {...}, "mean": x} (0-100).',
    )
    parser.add_argument("predictions", nargs="+", help="predictions JSONL file(s) written by star-lightning predict")
    parser.add_argument("--metric", choices=METRICS, default="auto", help="override the per-task metric")
    parser.add_argument("--task", help="task name for lines without a 'task' field")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``star-lightning score``; returns the exit status (2 on a usage error)."""
    args = build_parser().parse_args(argv)
    try:
        _refuse_the_same_file_twice(args.predictions)
        for path in args.predictions:
            _note_skipped(path)
        files = [_read_file(path) for path in args.predictions]
        _refuse_two_runs_of_one_request_set(args.predictions, files)
        records = [located for located_file in files for located in located_file]
        if not records:
            raise ConfigurationError(f"no predictions in {', '.join(args.predictions)}.")
        scores, counts = score_records(records, metric=args.metric, default_task=args.task)
    except ConfigurationError as error:
        print(f"star-lightning score: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summarize(scores, counts), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
