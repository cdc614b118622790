"""TensorBoard scalars per request and per host: Phase 1 time, time to first token, decode speed, memory, traffic.

After every request each rank has its figures in ``pl_module.last_stats``. The ranks of a context-parallel group
gather them (they work on the same request in lockstep); the group's first rank turns them into scalars with the
request index as the step:

- ``request/*``: one value per request -- ``phase1_s`` (the slowest host), ``query_s`` and ``ttft_s`` (query
  encoding and time to first token, on the query host), ``decode_s``, ``decode_tokens_per_s``, ``new_tokens``,
  ``context_tokens``, ``phase2_bytes`` (bytes all hosts sent in Phase 2 collectives), ``peak_mem_gib`` (the largest
  host) and ``data_parallel_group`` (which group served it);
- ``host{h}/*``: per host ``h`` of the context-parallel group -- ``phase1_s``, ``local_context_tokens``,
  ``peak_mem_gib`` and ``phase2_bytes``.

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
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from star_lightning.parallel.mixin import ContextParallelMixin

_HOST_KEYS = ("phase1_s", "local_context_tokens", "peak_mem_gib", "phase2_bytes")


def request_scalars(per_host: list[dict[str, float]], data_parallel_rank: int) -> dict[str, float]:
    """The scalars of one request from every host's ``last_stats`` (host order; the last is the query host)."""
    query = per_host[-1]
    metrics = {
        "request/phase1_s": max(stats["phase1_s"] for stats in per_host),
        "request/query_s": query["ttft_s"] - query["phase1_s"],
        "request/ttft_s": query["ttft_s"],
        "request/decode_s": query["decode_s"],
        "request/decode_tokens_per_s": query["decode_tokens_per_s"],
        "request/new_tokens": query["new_tokens"],
        "request/context_tokens": query["context_tokens"],
        "request/phase2_bytes": sum(stats["phase2_bytes"] for stats in per_host),
        "request/peak_mem_gib": max(stats["peak_mem_gib"] for stats in per_host),
        "request/data_parallel_group": float(data_parallel_rank),
    }
    for host, stats in enumerate(per_host):
        for key in _HOST_KEYS:
            metrics[f"host{host}/{key}"] = float(stats[key])
    return metrics


class PhaseProfiler(Callback):
    """Logs each request's Phase 1 / Phase 2 figures per host to the trainer's loggers (TensorBoard by default)."""

    def __init__(self) -> None:
        self._strategy: ContextParallelMixin | None = None
        self._pending: list[tuple[int, dict[str, float]]] = []
        self._enabled = True

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._enabled = bool(trainer.loggers)
        if not self._enabled:
            rank_zero_warn("PhaseProfiler: the trainer has no logger (--trainer.logger false); nothing is logged")
            return
        strategy = trainer.strategy
        self._strategy = strategy if isinstance(strategy, ContextParallelMixin) else None
        self._pending = []

    def _context_rank(self) -> tuple[int, int]:
        if self._strategy is None:
            return 0, 0
        return self._strategy.data_parallel_rank, self._strategy.context_parallel_rank

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
        stats = dict(getattr(pl_module, "last_stats", {}))
        if not stats:
            raise RuntimeError(
                f"PhaseProfiler needs {type(pl_module).__name__}.last_stats filled by predict_step (a dict of floats)"
            )
        per_host = [stats] if self._strategy is None else self._strategy.gather_in_context_group(stats)
        data_parallel_rank, context_rank = self._context_rank()
        if context_rank != 0:
            return
        metrics = request_scalars(per_host, data_parallel_rank)
        step = int(batch.get("index", batch_idx)) if isinstance(batch, dict) else batch_idx
        if trainer.is_global_zero:
            self._log(trainer, step, metrics)
        else:
            self._pending.append((step, metrics))

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._enabled or self._strategy is None:
            return
        everyone = self._strategy.gather_in_world(self._pending)
        self._pending = []
        if trainer.is_global_zero:
            for pending in everyone[1:]:
                for step, metrics in pending:
                    self._log(trainer, step, metrics)
