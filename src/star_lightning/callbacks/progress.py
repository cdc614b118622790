"""Shows, in Lightning's progress bar, how many requests of the whole file are done and what the last one cost.

Lightning's bar counts the batches of this run on rank 0's data-parallel group; on a resumed or data-parallel job
that is not the job's progress. This callback rewrites the bar's description after each request:
``req 37/200 | prefill 4.1s ttft 4.3s 21 tok/s``, and ``req 37/200 | 38: phase1`` (then ``phase2_query``,
``decode``) while request 38 runs, from the phase names the module announces.
Requests done by the other data-parallel groups are estimated as rank 0's group's count (the groups advance in
step, each taking every ``data_parallel_size``-th request).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, RichProgressBar, TQDMProgressBar
from typing_extensions import override

from star_lightning.callbacks.profiling import decode_tokens_per_s
from star_lightning.data.datamodule import RequestDataModule
from star_lightning.module import StarAttentionLM
from star_lightning.parallel.context import single_host


class RequestProgress(Callback):
    """Sets the predict progress bar's description to the job's request count and the last request's phases."""

    def __init__(self) -> None:
        self._resumed = 0
        self._total = 0
        self._data_parallel_size = 1
        self._trainer: pl.Trainer | None = None
        self._current = ""

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)  # a Trainer property type checkers do not see
        if isinstance(datamodule, RequestDataModule):
            self._total = datamodule.total_requests
            self._resumed = self._total - len(datamodule.requests)
        else:
            self._total, self._resumed = len(trainer.predict_dataloaders or ()), 0
        context = getattr(pl_module, "context_info", None) or single_host()
        self._data_parallel_size = context.layout.data_parallel_size
        self._trainer = trainer
        if isinstance(pl_module, StarAttentionLM) and self._on_phase not in pl_module.phase_listeners:
            pl_module.phase_listeners.append(self._on_phase)

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if isinstance(pl_module, StarAttentionLM) and self._on_phase in pl_module.phase_listeners:
            pl_module.phase_listeners.remove(self._on_phase)
        self._trainer = None

    def _on_phase(self, name: str) -> None:
        if self._trainer is not None:
            self._describe(self._trainer, f"{self._current}: {name.rsplit('/', 1)[-1]}")

    def _describe(self, trainer: pl.Trainer, text: str) -> None:
        bar = trainer.progress_bar_callback
        if isinstance(bar, RichProgressBar):
            task = getattr(bar, "predict_progress_bar_id", None)
            if bar.progress is not None and task is not None:
                bar.progress.update(task, description=text)
        elif isinstance(bar, TQDMProgressBar) and bar._predict_progress_bar is not None:
            bar._predict_progress_bar.set_description(text, refresh=True)

    def _done(self, batches: int) -> int:
        return min(self._total, self._resumed + batches * self._data_parallel_size)

    @override
    def on_predict_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        index = batch.get("index", batch_idx) if isinstance(batch, dict) else batch_idx
        self._current = f"req {self._done(batch_idx)}/{self._total} | {index}"

    @override
    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        stats = pl_module.last_stats if isinstance(pl_module, StarAttentionLM) else None
        text = f"req {self._done(batch_idx + 1)}/{self._total}"
        if stats is not None:
            prefill = "reused" if stats.context_reused else f"{stats.phase1_s:.1f}s"
            text += f" | prefill {prefill} ttft {stats.ttft_s:.1f}s {decode_tokens_per_s(stats):.0f} tok/s"
        self._describe(trainer, text)
