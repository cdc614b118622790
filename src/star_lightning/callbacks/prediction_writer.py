"""Writes predictions to JSONL as they are made, so a killed or requeued job loses nothing.

Each record is appended as one line in a single ``write`` under an exclusive ``flock`` (data-parallel groups share
the file), then flushed and fsynced. On start, a torn last line (a job killed mid-write) is cut off, and the
indices already written are skipped by the data module: rerunning with the same output path resumes the job.

SIGTERM and SIGUSR1 (SLURM's time-limit warning, ``--signal=USR1@90``) do not kill the job mid-request: every rank
only notes the signal, the ranks of each context-parallel group agree after the current request is written, and
the job stops there with exit code ``128 + signal``. On SLURM with SIGUSR1 (and ``--requeue``) rank 0 first requeues
the job (``scontrol requeue``), which then resumes from the file. Lightning's own handlers (built for training
checkpoints, and running a collective inside the signal handler) are replaced for the predict loop.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter
from typing_extensions import override

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def read_completed_indices(path: str | Path) -> set[int]:
    """Indices of the complete lines of a predictions file (a torn last line does not count)."""
    path = Path(path)
    if not path.exists():
        return set()
    done: set[int] = set()
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if not line.endswith("\n"):
                break
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("index"), int):
                done.add(record["index"])
    return done


def repair_torn_tail(path: str | Path) -> None:
    """Cut a partial last line left by a job that died while writing it."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("r+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        data = handle.read()
        if data.endswith(b"\n"):
            return
        handle.truncate(data.rfind(b"\n") + 1)
        handle.flush()
        os.fsync(handle.fileno())


def append_record(path: str | Path, record: dict[str, Any]) -> None:
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def context_parallel_cpu_group(trainer: pl.Trainer) -> dist.ProcessGroup | None:
    """A gloo group of this rank's context-parallel group, for small per-request agreements; None without one.

    Every rank must call it (in the same order). The ranks of a context-parallel group process the same requests in
    lockstep, so a collective per request is safe on it; on the world it is not (data-parallel groups may get
    different numbers of requests).
    """
    layout = getattr(trainer.strategy, "layout", None)
    if layout is None or not (dist.is_available() and dist.is_initialized()):
        return None
    timeout = getattr(trainer.strategy, "_timeout", None) or timedelta(minutes=10)
    mine = None
    for ranks in layout.all_context_parallel_groups():
        group = dist.new_group(ranks, backend="gloo", timeout=timeout)
        if trainer.global_rank in ranks:
            mine = group
    return mine


class PredictionStopped(SystemExit):
    """Raised on every rank after a stop signal, once the current request is written; exits ``128 + signal``."""


class JsonlPredictionWriter(BasePredictionWriter):
    """Appends each request's record to ``output`` (the query host of each context-parallel group writes).

    Stops cleanly on SIGTERM / SIGUSR1 after the current request (see the module docstring).
    """

    def __init__(self, output: str | Path) -> None:
        super().__init__(write_interval="batch")
        self.output = Path(output)
        self._signal: int = 0
        self._group: dist.ProcessGroup | None = None
        self._previous_handlers: dict[int, Any] = {}

    def completed_indices(self) -> set[int]:
        return read_completed_indices(self.output)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            self.output.parent.mkdir(parents=True, exist_ok=True)
            repair_torn_tail(self.output)
        self._group = context_parallel_cpu_group(trainer)
        trainer.strategy.barrier("prediction_writer_setup")

    def _note_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signal = signum

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Installed after Lightning's own handlers (registered when the run starts), so these replace them.
        self._signal = 0
        for signum in STOP_SIGNALS:
            self._previous_handlers[signum] = signal.signal(signum, self._note_signal)

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_handlers()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    def _agreed_signal(self) -> int:
        """The largest signal number any rank of the context-parallel group received (0 = none)."""
        if self._group is None:
            return self._signal
        flag = torch.tensor([self._signal])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return int(flag.item())

    def _stop(self, trainer: pl.Trainer, signum: int) -> None:
        name = signal.Signals(signum).name
        requeued = ""
        job_id = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
        if signum == signal.SIGUSR1 and job_id and trainer.is_global_zero:
            if os.environ.get("SLURM_ARRAY_TASK_ID") and os.environ.get("SLURM_ARRAY_JOB_ID"):
                job_id = f"{job_id}_{os.environ['SLURM_ARRAY_TASK_ID']}"
            result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, check=False)
            requeued = (
                f"; requeued SLURM job {job_id}"
                if result.returncode == 0
                else f"; requeueing SLURM job {job_id} failed ({result.stderr.strip()}): submit it with --requeue"
            )
        print(
            f"[rank {trainer.global_rank}] received {name}: stopped after writing the current request to "
            f"{self.output}{requeued}; rerun the same command to resume the remaining requests",
            file=sys.stderr,
            flush=True,
        )
        raise PredictionStopped(128 + signum)

    @override
    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if prediction is not None:
            append_record(self.output, prediction)
        signum = self._agreed_signal()
        if signum:
            self._stop(trainer, signum)
