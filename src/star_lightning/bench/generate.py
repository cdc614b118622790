"""``star-lightning generate``: write a benchmark's prompts as a JSONL file that ``predict`` reads.

Each line: ``index``, ``input_context`` (instruction + haystack), ``input_query`` (question, chat turn end and
answer prefix), ``outputs`` (reference answers), ``task``, ``length``, ``answer_prefix``, ``max_new_tokens`` (the
generation budget reserved inside ``length``), ``num_prompt_tokens`` and ``question`` (the question alone, without
chat-template markers or answer prefix; RULER: the task template's question half, BABILong: the sample's question;
``--model.anchor_query`` puts it after the anchor, :mod:`star_lightning.anchor_text`).

With ``--queries_per_context K`` (RULER's NIAH and QA tasks) each generated context is asked K questions, one line
each with its own references: the K lines carry ``context_id`` (``{task}-{length}-{sample}``, unique in the file)
and only the first of them carries ``input_context``.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

from star_lightning.bench.babilong import check_queries_per_context as check_babilong_queries
from star_lightning.bench.ruler.tasks import PromptTooLong
from star_lightning.bench.ruler.tasks import check_queries_per_context as check_ruler_queries
from star_lightning.bench.tasks import BABILONG_TASKS, RULER_TASKS, tasks_of
from star_lightning.data.jsonl import write_jsonl_atomic
from star_lightning.errors import ConfigurationError


class _OneLineParser(argparse.ArgumentParser):
    """An argument error is one line (the command line prints it), not the usage text."""

    def error(self, message: str) -> NoReturn:
        raise ConfigurationError(f"{message} ({self.prog} --help lists every option)")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="star-lightning generate",
        description="Generate RULER or BABILong prompts (context/query split for Star Attention) as JSONL.",
    )
    parser.add_argument("--benchmark", required=True, choices=("ruler", "babilong"), help="which benchmark")
    parser.add_argument(
        "--task",
        required=True,
        help=f"RULER: {', '.join(RULER_TASKS)}; BABILong: {', '.join(BABILONG_TASKS)}. Several tasks: a comma-"
        "separated list or 'all' (one file, requests numbered in order, each line naming its task)",
    )
    parser.add_argument(
        "--tokenizer",
        help="HF tokenizer: a local folder, a .gguf file (its tokenizer) or a hub id already cached; default: the "
        "model shipped with star_lightning (the one predict uses without --model.pretrained)",
    )
    parser.add_argument(
        "--length", required=True, type=int, help="target sequence length in tokens (prompt + answer budget)"
    )
    parser.add_argument("--num_samples", type=int, default=100, help="number of samples (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (RULER; BABILong data is fixed)")
    parser.add_argument(
        "--queries_per_context",
        type=int,
        default=1,
        metavar="K",
        help="questions per generated context, one line each sharing a context_id (RULER NIAH and QA tasks; "
        "BABILong and the other RULER tasks define one); default 1",
    )
    parser.add_argument("--output", required=True, help="JSONL file to write (atomically)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --output even where it holds predictions or has a run record beside it (both are deleted)",
    )
    parser.add_argument(
        "--chat_template",
        choices=("auto", "on", "off"),
        default="auto",
        help="wrap the prompt in the tokenizer's chat template: auto = when the tokenizer has one",
    )
    parser.add_argument("--trust_remote_code", action="store_true", help="allow the tokenizer's custom code")
    ruler = parser.add_argument_group("RULER")
    ruler.add_argument("--essays", help="essay haystack (niah_single_2/3, multikey_1, multivalue, multiquery)")
    ruler.add_argument("--qa_file", help="qa_1: SQuAD v2 dev json; qa_2: HotpotQA dev distractor json")
    ruler.add_argument("--squad", help="qa_1's documents (SQuAD v2 dev json) when qa_2 is generated too")
    ruler.add_argument("--hotpotqa", help="qa_2's documents (HotpotQA dev distractor json) when qa_1 is generated too")
    ruler.add_argument(
        "--english_words",
        help="RULER's json/english_words.json: cwe's words once a length needs more than wonderwords' 8,166",
    )
    babilong = parser.add_argument_group("BABILong")
    babilong.add_argument(
        "--data_dir", help="BABILong data: a JSON/JSONL file, DIR/{task}.jsonl or DIR/{4k}/{task}.jsonl"
    )
    babilong.add_argument("--no_instruction", action="store_true", help="leave out the task instruction")
    babilong.add_argument("--no_examples", action="store_true", help="leave out the in-context examples")
    babilong.add_argument("--no_post_prompt", action="store_true", help="leave out the answer-format instruction")
    return parser


def _load_tokenizer(name: str, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    from star_lightning.models import metadata_source, unreachable_hub_error

    try:
        source, kwargs = metadata_source(name, trust_remote_code=trust_remote_code)  # a GGUF file: its tokenizer
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as error:
        offline = unreachable_hub_error(name, "--tokenizer")
        if offline is not None:
            raise offline from None
        raise ConfigurationError(
            f"--tokenizer {name}: could not load a tokenizer ({error}). Give a local folder with tokenizer files "
            "or a hub id that is already in the local cache."
        ) from error


def _placeable_positions(name: str, tokenizer: Any, trust_remote_code: bool) -> int | None:
    """The positions the tokenizer's model can place, as predict counts them (its config, beside the tokenizer);
    else the tokenizer's own ``model_max_length``; None when neither says."""
    from star_lightning.models import load_config, placeable_positions

    try:
        positions = placeable_positions(load_config(name, trust_remote_code=trust_remote_code))
    except ConfigurationError:  # a tokenizer without its model's config
        positions = None
    limit = getattr(tokenizer, "model_max_length", None)
    if positions is None and isinstance(limit, int) and 0 < limit < 2**40:  # transformers' "unset" is 1e30
        positions = limit
    return positions


def _use_chat(mode: str, tokenizer: Any) -> bool:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if mode == "on" and not has_template:
        raise ConfigurationError("--chat_template on: this tokenizer has no chat template. Use --chat_template off.")
    return has_template if mode == "auto" else mode == "on"


def parse_tasks(benchmark: str, spec: str) -> list[str]:
    """``niah_single_1``, ``qa1,qa2`` or ``all`` -> the benchmark's task names, in the order given."""
    known = tasks_of("ruler" if benchmark == "ruler" else "babilong")
    tasks = list(known) if spec == "all" else [task.strip() for task in spec.split(",") if task.strip()]
    unknown = [task for task in tasks if task not in known]
    if unknown or not tasks:
        raise ConfigurationError(
            f"--task {spec}: {', '.join(unknown) or 'no task'} is not a {benchmark} task. Choose from: "
            f"{', '.join(known)} (several: a comma-separated list, or all)."
        )
    if len(set(tasks)) != len(tasks):
        raise ConfigurationError(f"--task {spec}: a task is listed twice.")
    return tasks


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Validate the options and build the rows of every task, numbered in order across tasks."""
    if args.length <= 0 or args.num_samples <= 0 or args.queries_per_context <= 0:
        raise ConfigurationError("--length, --num_samples and --queries_per_context must be positive integers.")
    tasks = parse_tasks(args.benchmark, args.task)
    for task in tasks:  # before any work: a refused --queries_per_context fails at once
        if args.benchmark == "ruler":
            check_ruler_queries(task, args.queries_per_context)
        else:
            check_babilong_queries(args.queries_per_context)
    if args.tokenizer is None:
        from star_lightning.assets import default_model_path

        args.tokenizer = str(default_model_path())
    tokenizer = _load_tokenizer(args.tokenizer, args.trust_remote_code)
    positions = _placeable_positions(args.tokenizer, tokenizer, args.trust_remote_code)
    if positions is not None and args.length > positions:
        raise ConfigurationError(
            f"--length {args.length} is more than the {positions} positions the model of --tokenizer {args.tokenizer} "
            f"can place (prompt + answer), so predict would refuse every request; give --length {positions} or less, "
            "or the tokenizer of a model with more positions"
        )
    chat = _use_chat(args.chat_template, tokenizer)
    rows: list[dict[str, Any]] = []
    for task in tasks:
        try:
            task_rows = _task_rows(args, task, tokenizer, chat)
        except PromptTooLong as error:
            raise _beyond_the_positions(error, args, positions) from None
        for row in task_rows:
            rows.append({**row, "index": len(rows)})
    return rows


def _beyond_the_positions(error: PromptTooLong, args: argparse.Namespace, positions: int | None) -> Exception:
    """A prompt too long for ``--length``: ``--length`` is the way out only if the model can place that many
    positions; otherwise the questions per context (each adds its needle or document) are."""
    if positions is None or error.smallest <= positions:
        return error
    fewer = " Lower --queries_per_context (each question adds to the prompt)." if args.queries_per_context > 1 else ""
    return ConfigurationError(
        f"{error.task}: the smallest prompt needs {error.smallest} tokens with this tokenizer, more than the "
        f"{positions} positions the model of --tokenizer {args.tokenizer} can place.{fewer}"
    )


def _task_rows(args: argparse.Namespace, task: str, tokenizer: Any, chat: bool) -> list[dict[str, Any]]:
    if args.benchmark == "ruler":
        from star_lightning.bench.ruler import generate_samples

        return generate_samples(
            task,
            tokenizer,
            length=args.length,
            num_samples=args.num_samples,
            seed=args.seed,
            chat=chat,
            essays=args.essays,
            qa_file={"qa_1": args.squad, "qa_2": args.hotpotqa}.get(task) or args.qa_file,
            english_words=args.english_words,
            queries_per_context=args.queries_per_context,
        )
    from star_lightning.bench import babilong

    rows = babilong.generate_samples(
        task,
        tokenizer,
        data_dir=args.data_dir,
        length=args.length,
        num_samples=args.num_samples,
        chat=chat,
        instruction=not args.no_instruction,
        examples=not args.no_examples,
        post_prompt=not args.no_post_prompt,
        queries_per_context=args.queries_per_context,
    )
    too_long = [row["index"] for row in rows if row["num_prompt_tokens"] + row["max_new_tokens"] > args.length]
    if too_long:
        print(
            f"warning: {len(too_long)} BABILong {task} sample(s) exceed --length {args.length} with this tokenizer "
            f"(first: index {too_long[0]}); BABILong's splits are sized for other tokenizers.",
            file=sys.stderr,
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``star-lightning generate``; returns the exit status (2 on a usage error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        check_output(args.output, overwrite=args.overwrite)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            rows = run(args)
        count = write_output(args.output, rows)
    except ConfigurationError as error:
        print(f"star-lightning generate: error: {error}", file=sys.stderr)
        return 2
    for warning in caught:
        print(f"star-lightning generate: warning: {warning.message}", file=sys.stderr)
    shared = f" ({count // args.queries_per_context} contexts x {args.queries_per_context} queries)"
    what = f"{count} {args.benchmark} {args.task} requests" + (shared if args.queries_per_context > 1 else "")
    print(f"wrote {what} at length {args.length} to {args.output}")
    return 0


def write_output(output: str, rows: list[dict[str, Any]]) -> int:
    """The rows, written atomically; a failed write (a full disk) is one line naming the file, nothing left."""
    try:
        return write_jsonl_atomic(output, rows)
    except OSError as error:
        raise ConfigurationError(f"cannot write --output {output} ({error.strerror}); free space there") from None


def check_output(output: str, *, overwrite: bool) -> None:
    """``--output`` is a file this command may replace: not a folder, and (without ``--overwrite``) no predictions
    file, nor one with a run record beside it -- replacing it would silently destroy what a run computed."""
    from star_lightning.data.run_record import record_path

    path = Path(output)
    if path.is_dir():
        raise ConfigurationError(
            f"--output {output} is a folder; give the JSONL file's path, such as {path / 'requests.jsonl'}"
        )
    record = record_path(output)
    if overwrite:
        record.unlink(missing_ok=True)  # it described predictions that are about to be replaced
        return
    ways_out = "choose another --output, or pass --overwrite to replace it"
    if record.exists():
        raise ConfigurationError(
            f"--output {output} has a run record beside it ({record}): it holds a predict run's output; {ways_out}"
        )
    if path.is_file() and _holds_predictions(path):
        raise ConfigurationError(f"--output {output} holds predictions (lines with 'pred'); {ways_out}")


def _holds_predictions(path: Path) -> bool:
    """Whether the file's first JSON line is a prediction (every line of a predictions file has ``pred``)."""
    with path.open("rb") as handle:
        for raw in handle:
            if raw.strip():
                try:
                    first = json.loads(raw)
                except ValueError:
                    return False
                return isinstance(first, dict) and "pred" in first
    return False


if __name__ == "__main__":
    raise SystemExit(main())
