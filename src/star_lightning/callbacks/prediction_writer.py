"""Writes predictions to JSONL as they are made, so a killed or requeued job loses nothing.

Each record is appended as one line in a single ``write`` under an exclusive ``flock`` (data-parallel groups share
the file), then flushed and fsynced. On start, a torn last line (a job killed mid-write) is cut off, and the
indices already written are skipped by the data module: rerunning with the same output path resumes the job.

SIGTERM, SIGUSR1 (SLURM's time-limit warning, ``--signal=USR1@90``) and SIGINT (Ctrl-C) do not kill the job
mid-request: every rank only notes the signal, the ranks of each context-parallel group agree after the current
request is written, and the job stops there with exit code ``128 + signal`` (130 for Ctrl-C). A second Ctrl-C stops
at once (the request in flight is then computed again on resume), still with exit code 130. On SLURM with SIGUSR1
(and ``--requeue``) rank 0 first requeues
the job (``scontrol requeue``), which then resumes from the file. Lightning's own handlers (built for training
checkpoints, and running a collective inside the signal handler) are replaced for the predict loop. Outside it
(start-up, loading, teardown) the job's lifetime stops the job at once (:mod:`star_lightning.parallel.lifetime`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter
from typing_extensions import override

from star_lightning.data.jsonl import (
    FileIdentity,
    append_prediction,
    completed_indices,
    file_identity,
    repair_torn_tail,
)
from star_lightning.parallel.context import ContextInfo, single_host
from star_lightning.parallel.lifetime import (
    STOP_SIGNALS,
    launcher_pid,
    predict_loop_ended,
    predict_loop_started,
    requeue_slurm_job,
)


def _quiet_loading_bars() -> None:
    """No weight-loading bars in this process: transformers' own, and the GGUF reader's (a bare ``tqdm``)."""
    import functools

    import transformers.modeling_gguf_pytorch_utils as gguf_reading
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    gguf_reading.tqdm = functools.partial(gguf_reading.tqdm, disable=True)  # type: ignore[attr-defined]


class PredictionStopped(SystemExit):
    """Raised on every rank after a stop signal, once the current request is written; exits ``128 + signal``."""


class JsonlPredictionWriter(BasePredictionWriter):
    """Appends each request's record to ``output`` (the query host of each context-parallel group writes).

    Stops cleanly on SIGTERM / SIGUSR1 / SIGINT after the current request (see the module docstring);
    ``interrupted`` tells the command line that the run ended on a KeyboardInterrupt (a second Ctrl-C, or one before
    the first request).
    """

    def __init__(self, output: str | Path) -> None:
        super().__init__(write_interval="batch")
        self.output = Path(output)
        self.interrupted = False
        self._signal: int = 0
        self._is_global_zero = True
        self._context: ContextInfo = single_host()
        self._previous_handlers: dict[int, Any] = {}
        self._identity: FileIdentity | None = None  # the file the run appends to: a replaced one is not written
        self._told_launcher = False

    def resume_hint(self) -> str:
        return (
            f"the requests already written to {self.output} are kept: rerun the same command to resume the remaining "
            "requests"
        )

    def completed_indices(self) -> set[int]:
        return completed_indices(self.output)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            self.output.parent.mkdir(parents=True, exist_ok=True)
            repair_torn_tail(self.output)
            os.close(os.open(self.output, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
        if not trainer.is_global_zero:  # the weights load on every rank: one progress bar, not one per rank
            _quiet_loading_bars()
        self._context = getattr(pl_module, "context_info", None) or single_host()
        self._is_global_zero = trainer.is_global_zero
        trainer.strategy.barrier("prediction_writer_setup")
        self._identity = file_identity(self.output)

    def _note_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT:
            if self._signal == signal.SIGINT:
                raise KeyboardInterrupt  # the second Ctrl-C: stop now
            if self._is_global_zero:
                print(
                    "star-lightning predict: Ctrl-C: stopping after the current request is written (Ctrl-C again "
                    "stops at once)",
                    file=sys.stderr,
                    flush=True,
                )
        self._signal = signum
        self._tell_the_launcher(signum)

    def _tell_the_launcher(self, signum: int) -> None:
        """A rank Lightning's launcher started passes SIGTERM / SIGUSR1 on to the launcher (once): the data-parallel
        groups the signal did not reach stop too, after their current request, and the launcher speaks for the job
        (Ctrl-C reaches every process of the terminal already)."""
        launcher = launcher_pid()
        if launcher is None or signum == signal.SIGINT or self._told_launcher:
            return
        self._told_launcher = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(launcher, signum)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Installed after Lightning's own handlers (registered when the run starts), so these replace them.
        self._signal = 0
        for signum in STOP_SIGNALS:
            self._previous_handlers[signum] = signal.signal(signum, self._note_signal)
        predict_loop_started()  # outside the loop, the job's lifetime stops it at once

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}
        predict_loop_ended()

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_handlers()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.interrupted = isinstance(exception, KeyboardInterrupt)
        self._restore_handlers()

    def _agreed_signal(self) -> int:
        """The largest signal number any rank of the context-parallel group received (0 = none)."""
        return self._context.agree_max_in_context_group(self._signal)

    def _stop(self, trainer: pl.Trainer, signum: int) -> None:
        name = signal.Signals(signum).name
        if self._told_launcher and sys.platform.startswith("linux"):
            # The launcher, told, stops after its own current request, says so and gives the job's exit code; this
            # rank's end (the kernel kills it with its launcher) must not look like a crash to Lightning's observer.
            while True:
                signal.pause()
        requeued = requeue_slurm_job() if signum == signal.SIGUSR1 and trainer.is_global_zero else ""
        if self._speaks_for_group(trainer):
            print(
                f"[rank {trainer.global_rank}] received {name}: stopped after writing the current request to "
                f"{self.output}{requeued}; rerun the same command to resume the remaining requests",
                file=sys.stderr,
                flush=True,
            )
        raise PredictionStopped(128 + signum)

    def _speaks_for_group(self, trainer: pl.Trainer) -> bool:
        """The first rank of each group that agreed on the stop says so: once per group, not once per rank."""
        if not self._context.shared:
            return trainer.is_global_zero
        return self._context.context_parallel_rank == 0 and self._context.tensor_parallel_rank == 0

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
            append_prediction(self.output, prediction, self._identity)
        signum = self._agreed_signal()
        if signum:
            self._stop(trainer, signum)
