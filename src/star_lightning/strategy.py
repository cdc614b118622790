"""The Lightning Trainer strategy for Star Attention inference (alias ``"star"``).

Builds on Lightning's DDP strategy for launching (SLURM, torchrun, local processes) and the world process group,
then adds the layout ``world = data_parallel x context_parallel``: the ranks of one context-parallel group
cooperate on one request (the last is the query host); the data-parallel groups split the requests, which is done
by reporting ``(data_parallel_size, data_parallel_rank)`` to Lightning's sampler.
"""

from __future__ import annotations

from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

from star_lightning.context_parallel import ContextParallelMixin


class StarStrategy(ContextParallelMixin, DDPStrategy):
    """Context-parallel inference strategy.

    Args:
        context_parallel_size: hosts per request; unset = all ranks form one group. The world size must be a
            multiple of it; the quotient is the number of requests processed at once.
        gpus_per_host: GPUs one model copy is spread over (its layers split evenly, run one after the other: the
            memory of all of them at the speed of one), for models that do not fit one GPU. One process per host:
            run GPUs per node / gpus_per_host processes per node. Needs the ``multi-gpu`` extra (accelerate).
        timeout_s: how long a collective may wait before the job fails, so a dead rank ends the job instead of
            hanging it.
        process_group_backend: ``nccl`` on GPUs, ``gloo`` on CPUs by default.
    """

    strategy_name = "star"


if StarStrategy.strategy_name not in StrategyRegistry:
    StrategyRegistry.register(
        StarStrategy.strategy_name,
        StarStrategy,
        description="Star Attention inference: data x context parallel groups with a query host",
    )
