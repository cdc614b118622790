#!/usr/bin/env python
"""Throughput of ``star-lightning predict`` as a user runs it, on RULER files made by ``star-lightning generate``.

For every model, context length and attention: one ``generate`` (once per model and length), one ``predict`` (a
process of its own, timed from launch to exit); the per-request figures are the run's own TensorBoard scalars
(:mod:`star_lightning.bench.throughput` says how each field is made). Star runs with block = anchor = length / 4.
A model runs only the lengths it can place (its ``max_position_embeddings``, rope scaling included). Records are
written after every run, so a run stopped midway keeps what it measured.

    python scripts/cli_throughput.py --model gemma3-270m=/tmp/gemma-3-270m-q4_k_m.gguf \\
        --model smollm2-135m=/tmp/SmolLM2-135M-Instruct.Q4_1.gguf --lengths 8192 32768 --requests 100
    python scripts/cli_throughput.py --make-llama-8b /tmp/llama8b --tokenizer /tmp/SmolLM2-135M-Instruct.Q4_1.gguf
    python scripts/cli_throughput.py --model tiny= --device cpu --lengths 512 --requests 3   # the shipped model

``--make-llama-8b DIR`` writes a Llama-3.1-8B-shaped model with random weights (bf16 safetensors, on the GPU) and
the tokenizer of ``--tokenizer`` into DIR once (random weights answer nonsense: pass ``--max-new-tokens 32``, the
generated tokens of ``scripts/benchmark.py``'s records, to compare with them).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from star_lightning.bench import throughput
from star_lightning.engine.settings import ATTENTIONS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=[], help="NAME=PATH (a folder or a .gguf; PATH empty: the "
                   "shipped model); repeat for several")  # fmt: skip
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--attention", nargs="+", default=["star", "dense"], choices=ATTENTIONS)
    p.add_argument("--requests", type=int, default=100, help="requests per run")
    p.add_argument("--task", default="niah_single_1", help="the RULER task of the requests")
    p.add_argument("--max-new-tokens", type=int, default=None, help="cap on generated tokens (default: the task's)")
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    p.add_argument("--predict-args", default="", help="more predict options, one string (e.g. '--model.decode graph')")
    p.add_argument("--variant", action="append", default=[], help="LABEL='predict options': run every model, "
                   "length and attention once more with these options (repeat; the records say which)")  # fmt: skip
    p.add_argument("--work-dir", default="cli_throughput_runs", help="request files, predictions, logs")
    p.add_argument("--out", default="benchmarks/cli_throughput.json")
    p.add_argument("--append", action="store_true", help="keep the records already in --out (others replaced)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds one predict run may take")
    p.add_argument("--make-llama-8b", default=None, help="write the random-weight 8B model into this folder, then exit")
    p.add_argument("--tokenizer", default=None, help="with --make-llama-8b: whose tokenizer the model gets")
    return p.parse_args(argv)


def _key(record: dict[str, Any]) -> tuple[Any, ...]:
    return record["model"], record["attention"], record["seq_len"], record.get("variant", "")


def _variant(spec: str) -> tuple[str, str]:
    label, equals, options = spec.partition("=")
    if not equals or not label or not label.replace("-", "").replace("_", "").isalnum():
        raise SystemExit(f"--variant {spec!r}: expected LABEL='predict options', e.g. eager='--model.prefill eager'")
    return label, options


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "star_lightning", *args]


def _run(command: list[str], log: Path, timeout: float, cwd: Path) -> tuple[int, float, float]:
    """Run ``command`` with its output in ``log``: ``(exit status, launched at, ended at)`` (epoch seconds)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MASTER_", "SLURM_", "PL_"))}
    with log.open("w") as stream:
        launched = time.time()
        try:
            status = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, env=env, cwd=cwd, timeout=timeout)
            code = status.returncode
        except subprocess.TimeoutExpired:
            code = 124
        return code, launched, time.time()


def _generate(path: str, length: int, args: argparse.Namespace, folder: Path) -> Path:
    data = folder / f"ruler_{args.task}_{length}_{args.requests}.jsonl"
    if not data.is_file():
        tokenizer = ["--tokenizer", path] if path else []
        command = _cli("generate", "--benchmark", "ruler", "--task", args.task, "--length", str(length),
                       "--num_samples", str(args.requests), "--seed", "0", "--output", str(data),
                       *tokenizer)  # fmt: skip
        code, _, _ = _run(command, folder / f"generate_{length}.log", args.timeout, folder)
        if code != 0:
            raise SystemExit(f"generate failed for {path or 'the shipped model'} at {length}: see {folder}")
    return data


def _predict(
    path: str, attention: str, length: int, data: Path, args: argparse.Namespace, folder: Path, variant: tuple[str, str]
) -> tuple:
    run = folder / "_".join(part for part in (attention, str(length), variant[0]) if part)
    run.mkdir(parents=True, exist_ok=True)
    options = ["--model.attention", attention, "--model.block_size", str(max(1, length // 4))]
    if path:
        options += ["--model.pretrained", path]
    if args.max_new_tokens:
        options += ["--model.max_new_tokens", str(args.max_new_tokens)]
    devices = ["--trainer.accelerator", args.device, "--trainer.devices", "1"]
    command = _cli("predict", *options, *devices, "--data.path", str(data), "--data.on_too_long", "skip", "--output",
                   str(run / "predictions.jsonl"), "--overwrite", "true", "--trainer.enable_progress_bar", "false",
                   *args.predict_args.split(), *variant[1].split())  # fmt: skip
    code, launched, ended = _run(command, run / "predict.log", args.timeout, run)
    logs = sorted((run / "lightning_logs" / "predict").glob("version_*"))
    requests, startup = throughput.read_run(logs[-1]) if logs else ([], {})
    summary = throughput.summarize(requests, launched, ended)
    summary["startup_parts"] = startup
    return code, summary, requests


def _write(out: Path, records: list[dict[str, Any]], args: argparse.Namespace, earlier: list[dict[str, Any]]) -> None:
    """The records with every run that wrote them: ``runs`` lists each command, its date and versions (with
    ``--append`` the earlier runs' entries are kept beside this one's)."""
    run = {"command": "python scripts/cli_throughput.py " + " ".join(sys.argv[1:]),
           "date": datetime.date.today().isoformat(),
           "versions": _versions()}  # fmt: skip
    payload = {"runs": [*earlier, run], "records": records}
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_suffix(".tmp")
    temporary.write_text(json.dumps(payload, indent=1) + "\n")
    temporary.replace(out)


def _versions() -> dict[str, str]:
    from star_lightning.bench.speed import versions

    return versions()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.make_llama_8b:
        if not args.tokenizer:
            raise SystemExit("--make-llama-8b needs --tokenizer (a folder or .gguf whose tokenizer the model gets)")
        throughput.write_random_model(args.make_llama_8b, args.tokenizer)
        print(f"wrote the Llama-3.1-8B-shaped model to {args.make_llama_8b}")
        return 0
    if not args.model:
        raise SystemExit("give at least one --model NAME=PATH")
    out = Path(args.out)
    previous = json.loads(out.read_text()) if args.append and out.is_file() else {}
    records: list[dict[str, Any]] = list(previous.get("records", []))
    earlier: list[dict[str, Any]] = list(previous.get("runs", []))
    gpu = throughput.device_gpu(args.device)
    variants = [_variant(spec) for spec in args.variant] or [("", "")]
    for spec in args.model:
        name, _, path = spec.partition("=")
        config = throughput.model_config(path)
        limit = throughput.placeable_length(config)
        for length in args.lengths:
            if limit is not None and length > limit:
                print(f"{name}: {length} tokens is beyond what it can place ({limit}); skipped", flush=True)
                continue
            folder = Path(args.work_dir).resolve() / name
            folder.mkdir(parents=True, exist_ok=True)
            data = _generate(path, length, args, folder)
            for attention, variant in itertools.product(args.attention, variants):
                code, summary, requests = _predict(path, attention, length, data, args, folder, variant)
                floors: tuple[float | None, float | None] = (None, None)
                if requests:
                    context, new = throughput.median_request(requests)
                    block = max(1, length // 4)
                    floors = (throughput.compute_floor_s(config, attention, context, new, block, gpu),
                              throughput.phase1_floor_s(config, attention, context, block, gpu))  # fmt: skip
                record = throughput.record(name, attention, length, summary, floors, gpu.name, variant)
                key = (name, attention, length, variant[0])
                records = [r for r in records if _key(r) != key]
                records.append(record)
                _write(out, records, args, earlier)
                status = "" if code == 0 else f" (exit {code}: see the predict.log under {folder})"
                print(json.dumps(record) + status, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
