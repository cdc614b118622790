"""``star-lightning tune``: run dense and candidate Star configurations on a sample of the requests, score them, take
each one's time at the job's scale from ``plan``'s cost model, and write the fastest that keeps ``--target`` of dense's
accuracy (its share of dense's LOWER 95% bound, not its mean) as a config ``predict --config`` takes.

Everything runs through the project's own commands, in process: ``generate`` (a RULER task mix), ``plan --format
json`` (each candidate's predicted TTFT on the job's hosts and GPU: ``--gpu`` and the ``--trainer.*`` options, as
``plan`` reads them), ``predict`` (one device, the job's hosts played in it where they decide: passing tokens) and the
scorer (:mod:`star_lightning.bench.fidelity`: references, or dense's own answers when the file has none). The work
folder (``OUTPUT.work/``) keeps the sample and every candidate's predictions: a rerun resumes where it stopped
(predict's resume), and refuses work made from other inputs.

Exit codes: 0 a config was written; 3 no candidate reached the target (one line says so; the table is written,
the config is not); 2 bad input (one line); as ``predict`` otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

from star_lightning.bench.fidelity import (
    PAIRING,
    WorkManifest,
    essays_file,
    per_request_scores,
    predictions_of,
    share,
    spec_digest,
)
from star_lightning.data.jsonl import (
    read_input,
    read_requests,
    requests_fingerprint,
    write_json_atomic,
    write_jsonl_atomic,
)
from star_lightning.errors import ConfigurationError
from star_lightning.tune.candidates import (
    Candidate,
    default_candidates,
    nearest_target,
    parse_candidate,
    pick,
    qualifies,
)

NONE_QUALIFIES = 3
EPILOG = f"""exit codes: 0 a config was written; {NONE_QUALIFIES} no candidate's share of dense (lower 95% bound)
reached --target: the table OUTPUT.json is written, the config is not; 2 bad input; 1 a predict run failed.

example (Qwen2.5-Coder-0.5B, a 16K RULER mix, a job of 4 hosts of one H100 each):
  star-lightning tune --model.pretrained qwen2.5-coder-0.5b-instruct-q4_k_m.gguf \\
      --ruler niah_multikey_1,niah_multikey_2,niah_single_3 --length 16384 --target 0.98 --samples 100 \\
      --gpu H100 --trainer.devices 4 --trainer.strategy.context_parallel_size 4 --device cuda --output tuned.yaml
  star-lightning predict --config tuned.yaml --data.path requests.jsonl --output predictions.jsonl ..."""


class PredictFailed(Exception):
    """A predict run of the sample failed (it printed why); tune exits with its status."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class TuneParser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2 (as every star-lightning command)
        raise ConfigurationError(f"{message} (star-lightning tune --help lists the options)")


def build_parser() -> argparse.ArgumentParser:
    parser = TuneParser(
        prog="star-lightning tune",
        description="The fastest Star configuration whose share of dense's accuracy (lower 95% bound) is at least "
        "--target, on a sample of the requests; written as a predict config. Other --trainer.* and "
        "--trainer.strategy.* options describe the job's hosts (as plan reads them).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model.pretrained", dest="pretrained", help="model folder or .gguf; default: the shipped one")
    parser.add_argument("--data.path", dest="data", help="request file (JSONL, as predict reads)")
    parser.add_argument("--ruler", help="instead of --data.path: RULER tasks, comma-separated, generated at --length")
    parser.add_argument("--length", type=int, help="with --ruler: the sequence length of the generated requests")
    parser.add_argument("--essays", help="with --ruler: the essay haystack (default: Python's documentation text)")
    parser.add_argument("--target", type=float, default=0.98, help="share of dense to keep, in (0, 1] (default 0.98)")
    parser.add_argument("--samples", type=int, default=100, help="requests to run each configuration on (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="which requests are sampled (and RULER's seed)")
    parser.add_argument("--output", required=True, help="the config to write (YAML); its table: OUTPUT.json")
    parser.add_argument("--candidates", nargs="+", help="names like star_L/8, aq_L/8_a/4, aq+pt_L/8 (default: L/H "
                        "and L/2H for H hosts, anchor = block or block/4, with and without the question)")  # fmt: skip
    parser.add_argument("--gpu", help="the job's GPU for plan's cost model (a known name, e.g. H100)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="where the sample runs (default: cuda "
                        "when there is one)")  # fmt: skip
    parser.add_argument("--model.dtype", dest="dtype", default="auto", help="predict's --model.dtype")
    parser.add_argument("--model.max_new_tokens", dest="max_new_tokens", type=int, default=64, help="answer bound")
    parser.add_argument("--work", help="work folder (default: OUTPUT.work)")
    return parser


def _split_trainer(argv: list[str]) -> tuple[list[str], list[str]]:
    """``--trainer.*`` options (the job's hosts, for plan) apart from tune's own."""
    own, trainer, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--trainer."):
            trainer.append(arg)
            if "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                trainer.append(argv[i + 1])
                i += 1
        else:
            own.append(arg)
        i += 1
    return own, trainer


def _trainer_value(trainer: list[str], name: str) -> str | None:
    for i, arg in enumerate(trainer):
        if arg == f"--trainer.{name}" and i + 1 < len(trainer):
            return trainer[i + 1]
        if arg.startswith(f"--trainer.{name}="):
            return arg.split("=", 1)[1]
    return None


def _hosts(trainer: list[str]) -> int:
    """Hosts of one request: ``context_parallel_size``, else every process of the job (devices x nodes)."""
    try:
        value = _trainer_value(trainer, "strategy.context_parallel_size")
        if value is not None:
            return int(value)
        devices = _trainer_value(trainer, "devices") or "1"
        nodes = _trainer_value(trainer, "num_nodes") or "1"
        return int(devices) * int(nodes)
    except ValueError as error:
        raise ConfigurationError(f"the job's --trainer options: {error}; give whole numbers") from None


def _check(args: argparse.Namespace) -> None:
    if not 0.0 < args.target <= 1.0:
        raise ConfigurationError(f"--target {args.target}: give a share of dense in (0, 1], e.g. 0.98")
    if args.samples <= 0:
        raise ConfigurationError(f"--samples {args.samples}: give a positive number of requests, e.g. 100")
    if (args.data is None) == (args.ruler is None):
        raise ConfigurationError("give the requests: --data.path FILE, or --ruler TASKS --length N (one of the two)")
    if args.ruler is not None and (args.length is None or args.length <= 0):
        raise ConfigurationError("--ruler needs --length N (a positive sequence length in tokens)")
    if args.data is not None and not Path(args.data).is_file():
        raise ConfigurationError(f"--data.path {args.data}: no such file")
    if args.max_new_tokens <= 0:
        raise ConfigurationError(f"--model.max_new_tokens {args.max_new_tokens}: must be positive")
    if not str(args.output).endswith((".yaml", ".yml")):
        raise ConfigurationError(f"--output {args.output}: give a .yaml file (predict --config reads it)")


def _cli(argv: list[str]) -> tuple[int, str, str]:
    """One ``star-lightning`` command in process: its status, stdout and stderr."""
    from star_lightning.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    return status, out.getvalue(), err.getvalue()


def _say(message: str) -> None:
    print(f"tune: {message}", file=sys.stderr, flush=True)


class Tuner:
    def __init__(self, args: argparse.Namespace, trainer: list[str]) -> None:
        from star_lightning.assets import default_model_path

        self.args, self.trainer = args, trainer
        self.model = str(args.pretrained or default_model_path())
        self.output = Path(args.output)
        self.work = Path(args.work or f"{args.output}.work")
        self.work.mkdir(parents=True, exist_ok=True)
        self.manifest = WorkManifest(self.work)
        self.hosts = _hosts(trainer)
        if self.hosts < 1:
            raise ConfigurationError(f"the job's --trainer options make {self.hosts} hosts; give 1 or more")
        names = args.candidates or default_candidates(self.hosts)
        self.candidates = [parse_candidate(name) for name in dict.fromkeys(names)]
        self.device = args.device or _default_device()
        self.context = 0  # the longest context of the sample, in tokens (set once it is counted)

    # The requests ------------------------------------------------------------------------------------------------
    def sample(self) -> Path:
        """``--samples`` requests of the file (seeded, in file order) or of the RULER mix, each keeping its own index
        as ``source_index`` and a ``task`` (``request`` when it has none)."""
        if self.args.ruler is not None:
            source = self._ruler_file()
        else:
            source = Path(self.args.data)
        spec = {"kind": "sample", "source": str(source.resolve()), "sha256": requests_fingerprint(read_input(source)),
                "samples": self.args.samples, "seed": self.args.seed}  # fmt: skip
        path = self.work / f"sample_{spec_digest(spec)}.jsonl"
        if not self.manifest.check(path, spec):
            requests = read_requests(source)
            chosen = sorted(random.Random(self.args.seed).sample(range(len(requests)),
                                                                 min(self.args.samples, len(requests))))  # fmt: skip
            rows = []
            for number, i in enumerate(chosen):
                row = dict(requests[i])
                row["source_index"], row["index"] = row.get("index", i), number
                row.setdefault("task", "request")
                rows.append(row)
            write_jsonl_atomic(path, rows)
            self.manifest.record(path, spec)
        return path

    def _ruler_file(self) -> Path:
        tasks = [task.strip() for task in self.args.ruler.split(",") if task.strip()]
        per_task = -(-self.args.samples // max(1, len(tasks)))
        essays = str(self.args.essays or essays_file(self.work / "pydoc_essays.txt"))
        spec = {"kind": "generate", "tasks": tasks, "length": self.args.length, "per_task": per_task,
                "seed": self.args.seed, "model": self.model, "essays": essays}  # fmt: skip
        path = self.work / f"ruler_{spec_digest(spec)}.jsonl"
        if not self.manifest.check(path, spec):
            _say(f"generating {per_task} requests of {', '.join(tasks)} at {self.args.length} tokens")
            argv = ["generate", "--benchmark", "ruler", "--task", ",".join(tasks), "--tokenizer", self.model,
                    "--length", str(self.args.length), "--num_samples", str(per_task), "--seed", str(self.args.seed),
                    "--output", str(path), "--essays", essays]  # fmt: skip
            status, _, err = _cli(argv)
            if status:
                raise ConfigurationError(_last_line(err) or f"generate exited {status}")
            self.manifest.record(path, spec)
        return path

    def context_tokens(self, sample: Path) -> tuple[int, int]:
        """The longest context and query of the sample, in tokens (as predict counts them)."""
        from star_lightning.models import load_tokenizer
        from star_lightning.tokens import batch_lengths

        requests = read_requests(sample)
        tokenizer = load_tokenizer(self.model)
        lengths = batch_lengths(tokenizer, [r["input_context"] for r in requests], [r["input_query"] for r in requests])
        return max(c for c, _ in lengths), max(q for _, q in lengths)

    # Plan and predict ---------------------------------------------------------------------------------------------
    def options(self, candidate: Candidate | None, context: int) -> dict[str, Any]:
        return {"attention": "dense"} if candidate is None else candidate.model_options(context, self.hosts)

    def predicted_ttft(self, options: dict[str, Any], context: int, query: int) -> tuple[float | None, bool, str]:
        """``plan``'s predicted TTFT at the job's scale, whether the layout fits, and plan's complaint if any."""
        argv = ["plan", "--format", "json", "--length", str(context), "--query_tokens", str(query),
                "--model.pretrained", self.model, "--model.max_new_tokens", str(self.args.max_new_tokens)]  # fmt: skip
        argv += [f"--model.{key}={value}" for key, value in options.items()]
        argv += ["--gpu", self.args.gpu] if self.args.gpu else []
        trainer = self.trainer if options["attention"] != "dense" else _one_host(self.trainer)
        status, out, err = _cli(argv + trainer)
        if not out.strip().startswith("{"):
            raise ConfigurationError(f"plan of {options}: {_last_line(err) or f'exited {status}'}")
        record = json.loads(out)
        return record.get("predicted_ttft_s"), status == 0, _last_line(err)

    def predict(self, sample: Path, name: str, options: dict[str, Any]) -> Path:
        argv = ["predict", "--model.pretrained", self.model, "--model.dtype", self.args.dtype,
                "--model.max_new_tokens", str(self.args.max_new_tokens), "--data.path", str(sample),
                "--trainer.accelerator", self.device, "--trainer.devices", "1", "--trainer.logger", "false",
                "--trainer.enable_progress_bar", "false"]  # fmt: skip
        argv += [f"--model.{key}={_yaml_scalar(value)}" for key, value in options.items()]
        if options.get("passing_tokens"):
            argv += ["--model.simulate_hosts", str(self.hosts)]  # hosts decide which tokens pass: the job's
        spec = {"kind": "predict", "sample": sample.name, "argv": argv}
        path = self.work / f"pred_{name.replace('/', '')}_{spec_digest(spec)}.jsonl"
        self.manifest.check(path, spec)  # refuses a stale file; predict resumes a partial one
        self.manifest.record(path, spec)
        from star_lightning.cli import main

        status = main([*argv, "--output", str(path)])
        if status:
            raise PredictFailed(status)  # predict printed its one line
        return path


def _one_host(trainer: list[str]) -> list[str]:
    """Dense serves each request on one process: the job's GPU and links, one host."""
    kept, skip = [], False
    for arg in trainer:
        if skip:
            skip = False
            continue
        if arg.startswith(("--trainer.devices", "--trainer.num_nodes", "--trainer.strategy")):
            skip = "=" not in arg
            continue
        kept.append(arg)
    return [*kept, "--trainer.devices", "1"]


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _yaml_scalar(value: Any) -> str:
    return "true" if value is True else "false" if value is False else str(value)


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _scores(path: Path, dense_answers: dict | None) -> dict[str, dict[str, float]]:
    return per_request_scores(path, references=dense_answers)


def _uses_references(sample: Path) -> bool:
    from star_lightning.bench.tasks import METRIC_BY_TASK

    return all(("outputs" in r or "output" in r) and r.get("task") in METRIC_BY_TASK for r in read_requests(sample))


def tune(args: argparse.Namespace, trainer: list[str]) -> int:
    tuner = Tuner(args, trainer)
    sample = tuner.sample()
    context, query = tuner.context_tokens(sample)
    tuner.context = context
    _say(f"{sum(1 for _ in sample.open())} requests (contexts up to {context} tokens), {tuner.hosts} host(s), "
         f"{len(tuner.candidates)} candidate(s), on {tuner.device}; work in {tuner.work}")  # fmt: skip
    plans: dict[str, tuple[float | None, bool, str]] = {"dense": tuner.predicted_ttft({"attention": "dense"}, context,
                                                                                         query)}  # fmt: skip
    for candidate in tuner.candidates:  # every plan before any weights load: a bad layout fails at once
        plans[candidate.name] = tuner.predicted_ttft(tuner.options(candidate, context), context, query)
    references = _uses_references(sample)
    _say("scoring against the requests' references" if references else "no references: scoring against dense's answers")
    _say(f"[0/{len(tuner.candidates)}] dense")
    dense_file = tuner.predict(sample, "dense", {"attention": "dense"})
    dense_answers = None if references else predictions_of(dense_file)
    dense = _scores(dense_file, dense_answers)
    tasks = sorted(dense)
    table: list[dict[str, Any]] = []
    for number, candidate in enumerate(tuner.candidates, start=1):
        _say(f"[{number}/{len(tuner.candidates)}] {candidate.name}")
        options = tuner.options(candidate, context)
        scores = _scores(tuner.predict(sample, candidate.name, options), dense_answers)
        result = share(scores, dense, tasks)
        ttft, fits, why = plans[candidate.name]
        row = {
            "name": candidate.name,
            "model": options,
            "share_of_dense": result,
            "predicted_ttft_s": ttft,
            "fits": fits,
        }
        row["qualifies"] = qualifies(row, args.target)
        row["scores"] = {t: 100.0 * sum(v.values()) / len(v) for t, v in scores.items()}
        if not fits:
            row["plan"] = why
        table.append(row)
        shown = "-" if result is None else f"{result['value']:.1f}% [{result['low']:.1f}, {result['high']:.1f}]"
        _say(f"    share of dense {shown}, predicted TTFT {_fmt(ttft)}" + ("" if fits else " (does not fit)"))
    best = pick(table, args.target)
    document = {
        "target": args.target, "hosts": tuner.hosts, "gpu": args.gpu, "trainer": trainer, "model": tuner.model,
        "requests": str(sample), "context_tokens": context, "scored_against": "references" if references else "dense",
        "interval": PAIRING, "dense": {"predicted_ttft_s": plans["dense"][0], "fits": plans["dense"][1],
                                       "scores": {t: 100.0 * sum(v.values()) / len(v) for t, v in dense.items()}},
        "candidates": table, "chosen": None if best is None else best["name"],
    }  # fmt: skip
    table_path = Path(f"{args.output}.json")
    write_json_atomic(table_path, document)
    if best is None:
        near, advice = nearest_target(table), "lower --target"
        if near is not None:
            target, nearest = near
            low = nearest["share_of_dense"]["low"]
            advice = f"--target {target:g} picks {nearest['name']} (lower bound {low:.1f}%; a rerun reuses the work)"
        print(f"star-lightning tune: no candidate's share of dense reached {args.target:g} at its lower 95% bound "
              f"(table: {table_path}); {advice}, try larger blocks (--candidates), or run dense",
              file=sys.stderr)  # fmt: skip
        return NONE_QUALIFIES
    _write_config(tuner, best, args, table_path)
    print(f"wrote {args.output}: {best['name']} (share of dense {best['share_of_dense']['value']:.1f}% "
          f"[{best['share_of_dense']['low']:.1f}, {best['share_of_dense']['high']:.1f}], predicted TTFT "
          f"{_fmt(best['predicted_ttft_s'])} on {tuner.hosts} host(s)); table: {table_path}")  # fmt: skip
    return 0


def _fmt(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.3f} s"


def _write_config(tuner: Tuner, best: dict[str, Any], args: argparse.Namespace, table_path: Path) -> None:
    import yaml

    result = best["share_of_dense"]
    header = (
        f"# star-lightning tune: {best['name']}, the fastest candidate whose share of dense's accuracy keeps "
        f"{args.target:g} at its lower 95% bound\n# (share {result['value']:.1f}% [{result['low']:.1f}, "
        f"{result['high']:.1f}], {result['n']} requests, paired bootstrap; predicted TTFT "
        f"{_fmt(best['predicted_ttft_s'])} on {tuner.hosts} host(s) of {args.gpu or 'the local GPU'}).\n"
        f"# Every candidate: {table_path}. Blocks sized for contexts of up to {tuner.context} tokens; give the job's "
        "--trainer options and --data.path / --output at launch.\n"
    )
    model = {"pretrained": tuner.model, **best["model"]}
    _write_text_atomic(Path(args.output), header + yaml.safe_dump({"model": model}, sort_keys=False))


def run(argv: list[str]) -> int:
    own, trainer = _split_trainer(list(argv))
    args = build_parser().parse_args(own)
    _check(args)
    try:
        return tune(args, trainer)
    except PredictFailed as failed:
        return failed.status
