"""The Lightning Trainer strategy for Star Attention inference (alias ``"star"``).

Builds on Lightning's DDP strategy for launching (SLURM, torchrun, local processes) and the world process group,
then adds the layout ``world = data_parallel x context_parallel``: the ranks of one context-parallel group
cooperate on one request (the last is the query host); the data-parallel groups split the requests, which is done
by reporting ``(data_parallel_size, data_parallel_rank)`` to Lightning's sampler.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from star_lightning.parallel.mixin import ContextParallelMixin


class StarStrategy(ContextParallelMixin, DDPStrategy):
    """Context-parallel inference strategy.

    Args:
        context_parallel_size: hosts per request; unset = all ranks form one group. The world size must be a
            multiple of it; the quotient is the number of requests processed at once.
        gpus_per_host: GPUs one model copy is spread over (its layers split evenly, run one after the other: the
            memory of all of them at the speed of one), for models that do not fit one GPU. One process per host:
            run GPUs per node / gpus_per_host processes per node. Needs the ``multi-gpu`` extra (accelerate).
        tensor_parallel_size: GPUs per host with the model's attention heads and MLP split over them by its
            transformers tensor-parallel plan (one process per GPU, the host's GPUs on one node): the memory and the
            speed of all of them. world = data_parallel x context_parallel x tensor_parallel.
        timeout_s: how long a collective may wait before the job fails, so a dead rank ends the job instead of
            hanging it.
        process_group_backend: ``nccl`` on GPUs, ``gloo`` on CPUs by default.
    """

    strategy_name = "star"

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        """DDP's setup without its weight broadcast: every rank read the same weights from the same files, so
        sending them all from rank 0 (gigabytes for an 8B model, impossible for a model spread over several GPUs)
        would only cost time. Inference only: there is nothing to train."""
        if trainer.state.fn == TrainerFn.FITTING:
            raise RuntimeError("StarStrategy runs inference (predict); it cannot train a model")
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self.setup_precision_plugin()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            cls.strategy_name,
            cls,
            description="Star Attention inference: data x context parallel groups with a query host",
        )


if StarStrategy.strategy_name not in StrategyRegistry:
    StarStrategy.register_strategies(StrategyRegistry)
