"""What ``star-lightning predict`` checks before any weights load and before any process group exists.

Run by the one process that speaks for the job (Lightning's launching process before it starts the other ranks,
or global rank 0 where SLURM or torchrun started them all), so each problem is one line, printed once, found in
seconds. Cheap checks first:

1. the layout: the world size splits into context-parallel groups; ``dense`` has one host per request;
2. the output: not the request file, writable, and no other run writing it (its lock is taken here and held by
   the returned :class:`RunPlan` until the job ends);
3. the requests: UTF-8 JSONL with valid fields, every string text, no field of the prediction's own
   (:mod:`star_lightning.data.jsonl` names the line);
4. the model: its own Python code only when asked, an architecture Star Attention can serve, weight files whose
   headers and sizes are whole (:mod:`star_lightning.model_files`);
5. the run record: an existing output is resumed only by the run that made it (:mod:`~star_lightning.data.run_record`),
   read whole, holding only requests of the file; a torn last line is cut off here, before any rank starts;
6. the lengths of the requests still to run: each fits the positions the model can place
   (:func:`star_lightning.models.placeable_positions`) or is skipped (``--data.on_too_long skip``), and makes at
   least one block per host; a context far beyond the limit is counted on a prefix only.

Only then is the run record written (with ``--overwrite true``, after removing the old output).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from star_lightning.anchor_text import anchor_query_form, check_anchor_texts
from star_lightning.data.datamodule import RequestDataModule
from star_lightning.data.jsonl import (
    output_lines,
    read_input,
    read_numbered_requests,
    repair_torn_tail,
    requests_fingerprint,
    unterminated_last_line,
)
from star_lightning.data.output_lock import OutputLock, lock_path
from star_lightning.data.run_record import (
    build_record,
    differences,
    index_ranges,
    prediction_settings,
    read_record,
    record_path,
    write_record,
)
from star_lightning.engine.settings import StarSettings
from star_lightning.errors import ConfigurationError
from star_lightning.model_files import check_weight_files
from star_lightning.models import (
    check_attention_servable,
    load_config,
    load_tokenizer,
    model_fingerprint,
    placeable_positions,
    resolve_dtype,
)
from star_lightning.module import StarAttentionLM
from star_lightning.parallel.context import planned_layout
from star_lightning.partition import plan_blocks, plan_ring
from star_lightning.plan import Layout, Request, check_fits, local_gpu
from star_lightning.tokens import batch_lengths, context_tokens_beyond

# Requests tokenized per call: the fast tokenizers encode a batch on all cores; a bounded batch bounds the memory of
# the token lists (only their lengths are kept).
_TOKENIZE_BATCH = 32
_LISTED = 10  # skipped requests named in the summary line (all of them are in the run record)


@dataclass(frozen=True)
class TooLong:
    index: int
    line: int
    tokens: int
    at_least: bool = False  # ``tokens`` is a lower bound (a context counted on a prefix: it is far too long)

    def describe(self) -> str:
        return f"index {self.index} (line {self.line}, {'more than ' if self.at_least else ''}{self.tokens} tokens)"


@dataclass
class RunPlan:
    """The outcome of the checks: what the run will do, and the output's lock, held until :meth:`release`."""

    output: str
    total: int
    done: int
    positions: int | None
    lock: OutputLock
    where: str  # e.g. "2 processes (cpu), 2 hosts per request"
    skipped: list[TooLong] = field(default_factory=list)
    tokenizer: Any = None  # the one the length checks loaded: the module uses it rather than loading it again

    @property
    def todo(self) -> int:
        return self.total - self.done - len(self.skipped)

    def start_line(self) -> str:
        parts = [f"{self.todo} of {self.total} requests to run"]
        if self.done:
            parts.append(f"{self.done} already in {self.output} (resumed)")
        if self.skipped:
            parts.append(f"{len(self.skipped)} too long, skipped")
        parts.append(self.where)
        return "star-lightning predict: " + "; ".join(parts)

    def skipped_line(self) -> str | None:
        if not self.skipped:
            return None
        named = ", ".join(item.describe() for item in self.skipped[:_LISTED])
        more = f" and {len(self.skipped) - _LISTED} more" if len(self.skipped) > _LISTED else ""
        return (
            f"star-lightning predict: skipped {len(self.skipped)} request(s) longer than the {self.positions} "
            f"positions the model can place (--data.on_too_long skip), not written to {self.output}: {named}{more} "
            f"(all in {record_path(self.output)})"
        )

    def release(self) -> None:
        self.lock.release()


def speaks_for_job(trainer: pl.Trainer) -> bool:
    """True in the process that checks the run and holds the output's lock: global rank 0, computed as Lightning's
    DDP strategies do (``node_rank * processes_per_node + local_rank``), which in Lightning's own launcher is the
    launching process, before it starts the other ranks."""
    strategy = trainer.strategy
    if getattr(strategy, "cluster_environment", None) is None:
        return True  # one process, no launcher
    node_rank, local_rank = getattr(strategy, "node_rank", 0), getattr(strategy, "local_rank", 0)
    return node_rank * trainer.num_devices + local_rank == 0


def check_run(
    *, module: StarAttentionLM, datamodule: RequestDataModule, trainer: pl.Trainer, output: str, overwrite: bool
) -> RunPlan:
    """Every check of the module docstring, in order; returns the plan holding the output's lock."""
    star = _check_layout(trainer, module.star_settings)
    _refuse_writing_the_input(output, datamodule.path, datamodule.contexts)
    lock = OutputLock(output)
    lock.acquire()
    try:
        return _check_with_lock(module, datamodule, trainer, output, overwrite, lock, star)
    except BaseException:
        lock.release()
        raise


def _check_with_lock(
    module: StarAttentionLM,
    datamodule: RequestDataModule,
    trainer: pl.Trainer,
    output: str,
    overwrite: bool,
    lock: OutputLock,
    star: StarSettings,
) -> RunPlan:
    hparams, context_parallel_size = module.hparams, star.hosts
    _check_writable(output)
    data = read_input(datamodule.path, "input file (--data.path)")
    contexts_data = (
        None if datamodule.contexts is None else read_input(datamodule.contexts, "contexts file (--data.contexts)")
    )
    numbered = read_numbered_requests(datamodule.path, datamodule.contexts, data=data, contexts_data=contexts_data)
    every_index = {request["index"] for _, request in numbered}  # the file's: --data.limit may differ on resume
    form = None  # the whole file's: --data.limit may differ on resume
    if hparams["attention"] == "star" and hparams.get("anchor_query"):
        form = anchor_query_form(request for _, request in numbered)
    if datamodule.limit is not None:
        numbered = numbered[: datamodule.limit]

    source = module.resolved_pretrained()
    trust_remote_code = bool(hparams["trust_remote_code"])
    config = load_config(source, trust_remote_code=trust_remote_code)  # a folder's own code is refused here
    if Path(source).is_dir():
        check_weight_files(source)
    if hparams["attention"] != "dense" and not trust_remote_code:
        check_attention_servable(config)
    positions = placeable_positions(config)

    dtype = str(resolve_dtype(hparams["dtype"], trainer.strategy.root_device)).removeprefix("torch.")
    settings = prediction_settings(
        hparams,
        model=model_fingerprint(source),
        dtype=dtype,
        precision=str(trainer.precision),
        requests=requests_fingerprint(data, contexts_data),  # the bytes checked here: the ranks read the same
        hosts=context_parallel_size,
        anchor_query_form=form,
    )
    model_path = source if not Path(source).is_dir() else str(Path(source).resolve())
    world_size = trainer.num_nodes * trainer.num_devices
    record = build_record(
        settings,
        model_path=model_path,
        request_file=str(Path(datamodule.path).resolve()),
        contexts_file=None if datamodule.contexts is None else str(Path(datamodule.contexts).resolve()),
        run={
            "world_size": world_size,
            "context_parallel_size": context_parallel_size,
            "accelerator": trainer.strategy.root_device.type,
            "model_options": {key: _jsonable(value) for key, value in hparams.items()},
        },
    )
    done = set() if overwrite else _resumable(output, record, every_index, datamodule.path)
    if not overwrite:
        _cut_torn_tail(output)
    indices = {request["index"] for _, request in numbered}
    to_check = [(line, request) for line, request in numbered if request["index"] not in done]
    skipped: list[TooLong] = []
    tokenizer = None
    if to_check:
        tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
        if form is not None:
            check_anchor_texts((request for _, request in to_check), tokenizer)
        plan_hosts = max(context_parallel_size, int(hparams.get("simulate_hosts", 1)))  # 0: one per block, any
        skipped, longest = _check_lengths(
            to_check, tokenizer, hparams, positions, plan_hosts, datamodule.path, datamodule.on_too_long
        )
        if longest is not None:
            _check_memory(config, star, trainer, dtype, longest)
    datamodule.exclude(item.index for item in skipped)

    if overwrite and Path(output).exists():
        Path(output).unlink()
    record["skipped_too_long"] = [asdict(item) for item in skipped]
    record["request_indices"] = index_ranges(every_index)
    try:
        write_record(output, record)
    except OSError as error:
        raise ConfigurationError(
            f"cannot write the run record {record_path(output)} ({error.strerror}); free space there or choose "
            "another --output"
        ) from None
    return RunPlan(
        output=output,
        total=len(numbered),
        done=len(done & indices),
        positions=positions,
        lock=lock,
        where=f"{world_size} process(es) on {trainer.strategy.root_device.type}, "
        f"{context_parallel_size} host(s) per request",
        skipped=skipped,
        tokenizer=tokenizer,
    )


def _check_layout(trainer: pl.Trainer, settings: StarSettings) -> StarSettings:
    """The request settings on the strategy's layout, checked as the ranks would otherwise check them (the same
    settings type ``plan`` builds: what one refuses, the other refuses)."""
    layout, gpus_per_host = planned_layout(trainer.strategy, trainer.num_nodes * trainer.num_devices)
    if trainer.strategy.root_device.type != "cuda":
        for option, value in (("decode", settings.decode), ("prefill", settings.prefill)):
            if value in ("graph", "compile"):
                raise ConfigurationError(
                    f"--model.{option} {value} captures CUDA graphs, but this run's accelerator is "
                    f"{trainer.strategy.root_device.type}; use --model.{option} auto (or --trainer.accelerator gpu)"
                )
    return settings.with_hosts(layout.context_parallel_size, layout.tensor_parallel_size, gpus_per_host)


def follow_attention(strategy: Any, hparams: Any) -> None:
    """``dense`` attention runs each request in one process: where ``--trainer.strategy.context_parallel_size`` is not
    given, it follows (1: the processes split the requests) rather than being refused. Called on every rank, before
    the layout is made (a strategy without a context-parallel size has nothing to follow)."""
    if hparams["attention"] == "dense" and getattr(strategy, "_context_parallel_size", 0) is None:
        strategy._context_parallel_size = 1


def _refuse_writing_the_input(output: str, request_file: str, contexts: str | None = None) -> None:
    """The output, its run record and its lock must not be the request file or the contexts file, by any path
    (symlinks, hard links)."""
    inputs = [("the request file --data.path", request_file)]
    if contexts is not None:
        inputs.append(("the contexts file --data.contexts", contexts))
    for what, name in inputs:
        source = Path(name)
        for written in (Path(output), record_path(output), lock_path(output)):
            same = written.resolve() == source.resolve()
            if not same and written.exists() and source.exists():
                same = os.path.samefile(written, source)
            if same:
                raise ConfigurationError(
                    f"--output {output} would write to {what} {name} ({written} is that file); choose another --output"
                )


def _check_writable(output: str) -> None:
    """An existing output must take appends (its folder was proven writable by the lock)."""
    path = Path(output)
    if path.is_dir():
        raise ConfigurationError(
            f"--output {output} is a folder; give the predictions file's path, such as {path / 'predictions.jsonl'}"
        )
    if not path.exists():
        return
    links = path.stat().st_nlink
    if links > 1:
        # Another name of the file would take another lock and record: two runs could write it at once.
        raise ConfigurationError(
            f"--output {output} is one of {links} names (hard links) of one file, and a run on another name would not "
            "see this one's lock; give the output one name (copy it, or remove the other links), or choose another "
            "--output"
        )
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
    except OSError as error:
        raise ConfigurationError(
            f"--output {output} is not writable ({error.strerror}); fix its permissions or choose another --output"
        ) from None


_WAYS_OUT = "choose another --output, or pass --overwrite true to start over (its predictions are then deleted)"


def _resumable(output: str, record: dict[str, Any], requests: set[int], request_file: str) -> set[int]:
    """The indices an earlier run of the same settings wrote; refuses an output another run (or no run) made, one
    that cannot be read whole, and one holding a prediction of no request of the file (it would be counted)."""
    ways_out = _WAYS_OUT
    try:
        lines = output_lines(output)
    except ConfigurationError as error:
        raise ConfigurationError(f"--output {output} is damaged: {error}; {ways_out}") from None
    if lines.not_predictions:
        named = ", ".join(str(number) for number in lines.not_predictions[:_LISTED])
        raise ConfigurationError(
            f"--output {output} holds {len(lines.not_predictions)} line(s) with no 'pred' (line {named}): it is no "
            f"predictions file (a request file?); {ways_out}"
        )
    if lines.twice:
        index, first, second = lines.twice[0]
        raise ConfigurationError(
            f"--output {output} holds index {index} twice (lines {first} and {second}; {len(lines.twice)} such "
            f"line(s)): two runs mixed, so it cannot be resumed; {ways_out}"
        )
    done = lines.done
    if not done:
        return set()
    old = read_record(output)
    if old is None:
        raise ConfigurationError(
            f"{output} holds {len(done)} prediction(s) but no run record ({record_path(output)}; written by an "
            f"older star_lightning or by hand), so resuming it could mix two runs; {ways_out}"
        )
    changes = differences(old, record)
    if changes:
        raise ConfigurationError(
            f"{output} holds {len(done)} prediction(s) of another run: {'; '.join(changes)}; {ways_out}"
        )
    foreign = sorted(done - requests)
    if foreign:
        named = ", ".join(str(index) for index in foreign[:_LISTED]) + (" ..." if len(foreign) > _LISTED else "")
        raise ConfigurationError(
            f"{output} holds {len(foreign)} prediction(s) of indices that are no request of --data.path "
            f"{request_file} (index {named}; added by hand or by another run), so resuming would mix them in; "
            f"{ways_out}"
        )
    return done


def _cut_torn_tail(output: str) -> None:
    """A line a stopped run left half-written is cut off now, before any rank starts: the ranks append after it."""
    last = unterminated_last_line(output)
    if last is None:
        return
    try:
        repair_torn_tail(output)
    except OSError as error:
        raise ConfigurationError(
            f"--output {output} ends with line {last[0]} cut short (a run stopped while writing it), which must be "
            f"cut off before this run appends, but the file refuses it ({error.strerror}: an append-only file?); "
            f"remove that line (after chattr -a, if it is append-only), or choose another --output"
        ) from None


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def prompt_lengths(tokenizer: Any, requests: Sequence[dict[str, Any]]) -> list[tuple[int, int]]:
    """``(context tokens, query tokens)`` of each request, tokenized as ``StarAttentionLM.encode_request`` does
    (the context with the tokenizer's special tokens, the query without; a test holds the two together)."""
    lengths: list[tuple[int, int]] = []
    for batch in _batches(requests, _TOKENIZE_BATCH):
        lengths.extend(batch_lengths(tokenizer, [r["input_context"] for r in batch], [r["input_query"] for r in batch]))
    return lengths


def _check_lengths(
    numbered: list[tuple[int, dict[str, Any]]],
    tokenizer: Any,
    hparams: Any,
    positions: int | None,
    hosts: int,
    request_file: str,
    on_too_long: str,
) -> tuple[list[TooLong], Request | None]:
    """Too-long requests (skipped) or the first problem (raised); also the errors a request would hit at its turn.
    And the longest request that runs (for the memory check)."""
    skipped: list[TooLong] = []
    longest: Request | None = None
    beyond = {
        line: found
        for line, request in numbered
        if positions is not None
        and (found := context_tokens_beyond(tokenizer, request["input_context"], positions)) is not None
    }
    counted = [(line, request) for line, request in numbered if line not in beyond]
    for line, request in numbered:
        if line in beyond:
            tokens, characters = beyond[line]
            where = f"request {request['index']} ({request_file}, line {line})"
            if on_too_long == "skip":
                skipped.append(TooLong(request["index"], line, tokens, at_least=True))
                continue
            raise ConfigurationError(
                f"{where} needs more than {tokens} positions (its context alone, counted on its first {characters:,} "
                f"of {len(request['input_context']):,} characters), more than the {positions} the model can place; "
                "shorten it, or pass --data.on_too_long skip to leave such requests out"
            )
    lengths = prompt_lengths(tokenizer, [request for _, request in counted])
    for (line, request), (context, query) in zip(counted, lengths, strict=True):
        index = request["index"]
        where = f"request {index} ({request_file}, line {line})"
        if context == 0 or query == 0:
            part = "context" if context == 0 else "query"
            raise ConfigurationError(f"{where}: the {part} encodes to no tokens; give it text the tokenizer keeps")
        budget = min(hparams["max_new_tokens"], request.get("max_new_tokens") or hparams["max_new_tokens"])
        total = context + query + budget
        if positions is not None and total > positions:
            if on_too_long == "skip":
                skipped.append(TooLong(index, line, total))
                continue
            raise ConfigurationError(
                f"{where} needs {total} positions (context {context} + query {query} + max_new_tokens {budget} "
                f"tokens), more than the {positions} the model can place; shorten it, lower --model.max_new_tokens, "
                "or pass --data.on_too_long skip to leave such requests out"
            )
        if hparams["attention"] == "star":
            try:
                plan_blocks(context, hparams["block_size"], hosts, hparams["anchor_block_size"], hparams["anchor"])
            except ConfigurationError as error:
                simulated = int(hparams.get("simulate_hosts", 1))
                raise ConfigurationError(
                    f"{where}: {too_few_blocks_for_simulated_hosts(context, hparams['block_size'], simulated) or error}"
                ) from None
        elif hparams["attention"] == "ring":
            try:
                plan_ring(context, hosts, hparams["ring_layout"])
            except ConfigurationError as error:
                raise ConfigurationError(f"{where}: {error}") from None
        if longest is None or total > longest.context_tokens + longest.query_tokens + longest.max_new_tokens:
            longest = Request(context, query, budget)
    return sorted(skipped, key=lambda item: item.line), longest


def too_few_blocks_for_simulated_hosts(context: int, block_size: int, simulate_hosts: int) -> str | None:
    """The reason, naming ``--model.simulate_hosts``, where the hosts it plays in one process outnumber a context's
    blocks (None where it does not): the devices are not the cause there."""
    blocks = -(-context // block_size)
    if simulate_hosts <= 1 or simulate_hosts <= blocks:
        return None
    return (
        f"the context of {context} tokens makes {blocks} block(s) of block_size {block_size}, fewer than the "
        f"{simulate_hosts} hosts --model.simulate_hosts plays: every host needs at least one block. Lower "
        f"--model.simulate_hosts to at most {blocks} (0 plays one host per block) or --model.block_size to at most "
        f"{-(-context // simulate_hosts)}"
    )


def _check_memory(config: Any, settings: StarSettings, trainer: pl.Trainer, dtype: str, longest: Request) -> None:
    """On GPUs: every host of the layout holds the longest request in its GPU's memory (:mod:`star_lightning.plan`),
    checked before any weights load, so a layout that cannot fit fails now naming the host and its bytes, not after
    minutes of loading."""
    strategy = trainer.strategy
    if strategy.root_device.type != "cuda":
        return
    gpu = local_gpu(dtype, measure=False, device_index=strategy.root_device.index or 0)
    if gpu is None:
        return
    layout = Layout.from_settings(settings)
    check_fits(config, dtype=dtype, layout=layout, request=longest, gpu=gpu, max_tensor_parallel=8)


def _jsonable(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool, type(None), list, dict)) else str(value)
