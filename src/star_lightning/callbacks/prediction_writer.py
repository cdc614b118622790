"""Writes predictions to JSONL as they are made, so a killed or requeued job loses nothing.

Each record is appended as one line in a single ``write`` under an exclusive ``flock`` (data-parallel groups share
the file), then flushed and fsynced. On start, a torn last line (a job killed mid-write) is cut off, and the
indices already written are skipped by the data module: rerunning with the same output path resumes the job.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter
from typing_extensions import override


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


class JsonlPredictionWriter(BasePredictionWriter):
    """Appends each request's record to ``output`` (the query host of each context-parallel group writes)."""

    def __init__(self, output: str | Path) -> None:
        super().__init__(write_interval="batch")
        self.output = Path(output)

    def completed_indices(self) -> set[int]:
        return read_completed_indices(self.output)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            self.output.parent.mkdir(parents=True, exist_ok=True)
            repair_torn_tail(self.output)
        trainer.strategy.barrier("prediction_writer_setup")

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
