"""The predict DataModule: requests from a JSONL file, minus those the output file already holds (and those the
command line's checks excluded: too long for the model, with ``--data.on_too_long skip``).

Each item is one request (no collation): a context-parallel group works on one request at a time. Requests that
share a context run one after the other (so the group answers them over one encoded context), and the data-parallel
groups split the requests by context, never splitting one (:class:`ContextShardSampler`).
"""

from __future__ import annotations

import signal
from collections.abc import Iterable, Iterator
from typing import Any, Literal

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from star_lightning.data.jsonl import CONTEXT_ID, completed_indices, read_input, read_requests, requests_fingerprint
from star_lightning.data.run_record import read_record, record_path
from star_lightning.errors import ConfigurationError
from star_lightning.options import bad_value
from star_lightning.parallel.lifetime import STOP_SIGNALS
from star_lightning.tokens import RequestEncoder

WORKERS_ACCEPTED = "0 (tokenize in the main process) or more worker processes; leave it unset for one on a GPU"
# 0 would run nothing and a negative count is no count: both refused rather than read as Python's slice would.
LIMIT_ACCEPTED = "a positive number of requests (the file's first N); leave it unset to run every request"


class RequestDataset(Dataset[dict[str, Any]]):
    def __init__(self, requests: list[dict[str, Any]]) -> None:
        self.requests = requests

    def __len__(self) -> int:
        return len(self.requests)

    def __getitem__(self, item: int) -> dict[str, Any]:
        return self.requests[item]


def group_by_context(requests: list[dict[str, Any]]) -> list[list[int]]:
    """Positions of the requests, grouped by context (its ``context_id``, else its text), in order of first use."""
    groups: dict[object, list[int]] = {}
    for position, request in enumerate(requests):
        key = ("id", request[CONTEXT_ID]) if CONTEXT_ID in request else ("text", request["input_context"])
        groups.setdefault(key, []).append(position)
    return list(groups.values())


def shard_by_context(requests: list[dict[str, Any]], num_shards: int, shard: int) -> list[int]:
    """The positions one data-parallel group answers: whole contexts, each to the group with the fewest requests so
    far (ties: the lowest group), so the groups get about the same number of requests and every rank agrees."""
    loads = [0] * num_shards
    mine: list[int] = []
    for positions in group_by_context(requests):
        target = min(range(num_shards), key=lambda group: (loads[group], group))
        loads[target] += len(positions)
        if target == shard:
            mine.extend(positions)
    return mine


class ContextShardSampler(DistributedSampler[int]):
    """This data-parallel group's share of the requests, by context. A ``DistributedSampler`` so that Lightning
    keeps it (Lightning would otherwise split the requests line by line, separating those that share a context)."""

    def __init__(self, dataset: RequestDataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.positions = shard_by_context(dataset.requests, num_replicas, rank)

    def __iter__(self) -> Iterator[int]:
        return iter(self.positions)

    def __len__(self) -> int:
        return len(self.positions)


def leave_stop_signals_to_the_main_process(worker_id: int) -> None:
    """A tokenizing worker ignores the stop signals (SLURM signals every process of a step, Ctrl-C the terminal's
    process group): the main process stops after writing the current request and then ends its workers. A worker
    killed by the signal would make the main process fail mid-request instead (torch reports a killed worker)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class RequestDataModule(LightningDataModule):
    """Requests for ``predict``.

    Args:
        path: JSONL file, one request a line (``input_context``, ``input_query``, optional ``index``,
            ``output``/``outputs`` and other fields copied to the predictions).
        limit: only the first ``limit`` requests of the file (for a quick look); unset = all of them.
        contexts: a JSONL file of contexts, one ``{"context_id", "input_context"}`` a line, that requests name by
            ``context_id`` instead of repeating ``input_context``.
        on_too_long: a request longer than the model can place (context + query + max_new_tokens beyond its
            positions): ``error`` refuses the run before any work, naming the request; ``skip`` leaves it out (it is
            not written, and listed at the end). A resumed run checks such requests again.
        output: the predictions file (the command line links ``--output`` here); the requests it already holds are
            skipped, so a rerun resumes.
        num_workers: processes that tokenize the next requests while one runs; unset = 1 on a GPU, 0 on a CPU.
    """

    def __init__(
        self,
        *,
        path: str,
        limit: int | None = None,
        contexts: str | None = None,
        on_too_long: Literal["error", "skip"] = "error",
        output: str | None = None,
        num_workers: int | None = None,
    ) -> None:
        super().__init__()
        if num_workers is not None and (isinstance(num_workers, bool) or not isinstance(num_workers, int)
                                        or num_workers < 0):  # fmt: skip
            raise bad_value("data.num_workers", num_workers, WORKERS_ACCEPTED)
        self.num_workers = num_workers
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
            raise bad_value("data.limit", limit, LIMIT_ACCEPTED)
        self.path = path
        self.limit = limit
        self.contexts = contexts
        self.on_too_long = on_too_long
        self.output = output
        self.requests: list[dict[str, Any]] = []
        self.total_requests = 0
        # Each request's position in the file (its order among the requests run), by index.
        self.positions: dict[int, int] = {}
        self._excluded: set[int] = set()

    def exclude(self, indices: Iterable[int]) -> None:
        """Leave these requests out (set on global rank 0 before the run; every rank learns them in :meth:`setup`)."""
        self._excluded.update(indices)

    def setup(self, stage: str) -> None:
        data = read_input(self.path, "input file (--data.path)")
        contexts = None if self.contexts is None else read_input(self.contexts, "contexts file (--data.contexts)")
        self._check_inputs_unchanged(requests_fingerprint(data, contexts))
        requests = read_requests(self.path, self.contexts, data=data, contexts_data=contexts)
        if self.limit is not None:
            requests = requests[: self.limit]
        self.positions = {request["index"]: position for position, request in enumerate(requests)}
        done, excluded = self._indices_to_leave_out()
        requests = [r for r in requests if r["index"] not in excluded]
        self.total_requests = len(requests)
        remaining = [r for r in requests if r["index"] not in done]
        # Requests sharing a context one after the other, contexts in order of first use.
        self.requests = [remaining[p] for group in group_by_context(remaining) for p in group]

    def _check_inputs_unchanged(self, fingerprint: str) -> None:
        """The bytes this rank read are those the checks read (the run record holds their hash): an input replaced
        in between is refused, not run under a record of another file."""
        if self.output is None:
            return
        record = read_record(self.output)
        checked = None if record is None else record["prediction_settings"].get("requests")
        if checked is None or checked == fingerprint:
            return
        was, now = str(checked).split(" + contexts "), fingerprint.split(" + contexts ")
        changed = f"--data.path {self.path}" if was[0] != now[0] else f"--data.contexts {self.contexts}"
        raise ConfigurationError(
            f"{changed} changed after the checks read it (its bytes are not those {record_path(self.output)} was "
            "written for), so nothing was run from it; rerun the command once the file stays as it is"
        )

    def _indices_to_leave_out(self) -> tuple[set[int], set[int]]:
        """Requests an earlier run already wrote, and the excluded ones; read on global rank 0 and broadcast so
        every rank splits the same list."""
        trainer = self.trainer
        if trainer is None:
            return self._completed_indices(), set(self._excluded)
        local = (self._completed_indices(), set(self._excluded)) if trainer.is_global_zero else (set(), set())
        done, excluded = trainer.strategy.broadcast(local, src=0)
        return done, excluded

    def _completed_indices(self) -> set[int]:
        return set() if self.output is None else completed_indices(self.output)

    def predict_dataloader(self) -> DataLoader[dict[str, Any]]:
        dataset = RequestDataset(self.requests)
        trainer = self.trainer
        split = trainer.distributed_sampler_kwargs if trainer is not None else None
        replicas, rank = (split["num_replicas"], split["rank"]) if split else (1, 0)
        encoder, workers = None, 0
        if trainer is not None:
            # A data-parallel group may have nothing to do (fewer contexts than groups, or a resume of the last
            # request): it waits for the others instead of failing the job (Lightning refuses an empty loader).
            module = trainer.lightning_module
            module.allow_zero_length_dataloader_with_multiple_devices = True
            on_gpu = trainer.strategy.root_device.type == "cuda"
            workers = (1 if on_gpu else 0) if self.num_workers is None else self.num_workers
            tokenizer = getattr(module, "tokenizer", None)
            encoder = RequestEncoder(tokenizer) if workers > 0 and tokenizer is not None else None
        sampler = ContextShardSampler(dataset, replicas, rank)
        if encoder is None:
            return DataLoader(dataset, batch_size=None, sampler=sampler)
        # batch_size=None: collate_fn is applied to each request, not to a list of them
        return DataLoader(
            dataset,
            batch_size=None,
            sampler=sampler,
            collate_fn=encoder,  # type: ignore[arg-type]
            num_workers=workers,
            worker_init_fn=leave_stop_signals_to_the_main_process,
        )
