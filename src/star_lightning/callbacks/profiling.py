"""TensorBoard scalars per request and per host: Phase 1 time, time to first token, decode speed, memory, traffic.

After every request each rank has its figures in ``pl_module.last_stats`` (a
:class:`~star_lightning.engine.request.RequestStats`). The ranks of a context-parallel group gather them (they work on
the same request in lockstep); the group's first rank turns them into scalars whose step is the request's position in
the request file (its line order: the index of a generated file's requests; never the index itself, which may be
any integer, far beyond TensorBoard's 64-bit steps):

- ``request/*``: one value per request -- ``phase1_s`` (the slowest host; 0 for a reused context),
  ``context_reused`` (1 when the request was answered over the previous request's kept context, else 0),
  ``query_s`` and ``ttft_s`` (query encoding and time to first token, on the query host), ``decode_s``,
  ``decode_setup_s`` (capturing, and compiling, the static decode step: 0 when a captured step is replayed),
  ``decode_tokens_per_s``, ``new_tokens``, ``context_tokens``, ``phase1_bytes`` (bytes all hosts sent in Phase 1:
  the anchor broadcast, the ring's K/V), ``phase2_bytes`` (bytes all hosts sent in Phase 2 collectives),
  ``peak_mem_gib`` (the largest host) and ``data_parallel_group`` (which group served it);
- ``host{h}/*``: per host ``h`` of the context-parallel group -- ``phase1_s``, ``local_context_tokens``,
  ``peak_mem_gib``, ``phase1_bytes`` and ``phase2_bytes``;
- ``startup/*``: once, at step 0 with the first request -- where the process's start-up went
  (:mod:`star_lightning.startup`: ``interpreter_s``, ``imports_s``, ``parse_s``, ``checks_s``, ``model_load_s``,
  ``to_first_request_s``, ``total_s``), global rank 0's.

Only rank 0 writes (Lightning's loggers are rank-zero only): its own group's scalars are logged and flushed after
each request; the other data-parallel groups' are sent to rank 0 when the predict loop ends (a collective over the
world per request would deadlock when groups get different numbers of requests), so a job killed midway keeps only
rank 0's group in TensorBoard -- the predictions file keeps everything.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from typing_extensions import override

from star_lightning import startup
from star_lightning.data.datamodule import RequestDataModule
from star_lightning.engine.request import RequestStats
from star_lightning.module import StarAttentionLM
from star_lightning.parallel.context import ContextInfo, single_host


def decode_tokens_per_s(stats: RequestStats) -> float:
    return (stats.new_tokens - 1) / stats.decode_s if stats.decode_s > 0 else 0.0


def request_scalars(per_host: list[RequestStats], data_parallel_rank: int) -> dict[str, float]:
    """The scalars of one request from every host's stats (host order; the last is the query host)."""
    query = per_host[-1]
    gib = 2**30
    metrics = {
        "request/phase1_s": max(stats.phase1_s for stats in per_host),
        "request/context_reused": float(query.context_reused),
        "request/query_s": query.query_s,
        "request/ttft_s": query.ttft_s,
        "request/decode_s": query.decode_s,
        "request/decode_setup_s": query.decode_setup_s,
        "request/decode_tokens_per_s": decode_tokens_per_s(query),
        "request/new_tokens": float(query.new_tokens),
        "request/context_tokens": float(query.context_tokens),
        "request/phase1_bytes": float(sum(stats.phase1_bytes for stats in per_host)),
        "request/phase2_bytes": float(sum(stats.phase2_bytes for stats in per_host)),
        "request/peak_mem_gib": max(stats.peak_mem_bytes for stats in per_host) / gib,
        "request/data_parallel_group": float(data_parallel_rank),
    }
    for host, stats in enumerate(per_host):
        metrics[f"host{host}/phase1_s"] = stats.phase1_s
        metrics[f"host{host}/local_context_tokens"] = float(stats.local_context_tokens)
        metrics[f"host{host}/peak_mem_gib"] = stats.peak_mem_bytes / gib
        metrics[f"host{host}/phase1_bytes"] = float(stats.phase1_bytes)
        metrics[f"host{host}/phase2_bytes"] = float(stats.phase2_bytes)
    return metrics


def _position(trainer: pl.Trainer, batch: Any, batch_idx: int) -> int:
    """The request's position in the request file; without the request data module, its position in this run."""
    datamodule = getattr(trainer, "datamodule", None)  # a Trainer property type checkers do not see
    index = batch.get("index") if isinstance(batch, dict) else None
    if isinstance(datamodule, RequestDataModule) and index in datamodule.positions:
        return datamodule.positions[index]
    return batch_idx


class PhaseProfiler(Callback):
    """Logs each request's Phase 1 / Phase 2 figures per host to the trainer's loggers (TensorBoard by default)."""

    def __init__(self) -> None:
        self._context: ContextInfo = single_host()
        self._pending: list[tuple[int, dict[str, float]]] = []
        self._enabled = True
        self._startup_logged = False

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._enabled = bool(trainer.loggers)
        if not self._enabled:  # --trainer.logger false: the user asked for no log, so nothing to warn of
            return
        self._context = getattr(pl_module, "context_info", None) or single_host()
        self._pending = []

    def _context_rank(self) -> tuple[int, int]:
        return self._context.data_parallel_rank, self._context.context_parallel_rank

    def _log(self, trainer: pl.Trainer, step: int, metrics: dict[str, float]) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.flush()

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
        if not self._enabled:
            return
        stats = pl_module.last_stats if isinstance(pl_module, StarAttentionLM) else None
        if stats is None:
            name = type(pl_module).__name__
            raise RuntimeError(f"PhaseProfiler needs a StarAttentionLM whose predict_step fills last_stats, not {name}")
        per_host = self._context.gather_in_context_group(stats)
        data_parallel_rank, context_rank = self._context_rank()
        if context_rank != 0:
            return
        metrics = request_scalars(per_host, data_parallel_rank)
        step = _position(trainer, batch, batch_idx)
        if trainer.is_global_zero:
            if not self._startup_logged:
                self._startup_logged = True
                self._log(trainer, 0, startup.scalars())
            self._log(trainer, step, metrics)
        else:
            self._pending.append((step, metrics))

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._enabled:
            return
        everyone = self._context.gather_in_world(self._pending)
        self._pending = []
        if trainer.is_global_zero:
            for pending in everyone[1:]:
                for step, metrics in pending:
                    self._log(trainer, step, metrics)
