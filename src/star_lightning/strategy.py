"""The Lightning strategy for Star Attention inference: process groups, query hosts, request split.

Builds on Lightning's DDP strategy for launching (SLURM, torchrun, local processes) and the world process group,
then adds the layout ``world = data_parallel x context_parallel``: the ranks of one context-parallel group
cooperate on one request (the last is the query host); the data-parallel groups split the requests, which is done
by reporting ``(data_parallel_size, data_parallel_rank)`` to Lightning's sampler so that all ranks of a group see
the same requests.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from typing_extensions import override

from star_lightning.collectives import DistributedContextGroup, new_context_group
from star_lightning.context_group import ContextGroup
from star_lightning.errors import ConfigurationError
from star_lightning.topology import ParallelLayout, make_layout


class StarStrategy(DDPStrategy):
    """Context-parallel inference strategy (alias ``"star"``).

    Args:
        context_parallel_size: hosts per request; ``None`` = all ranks form one group. The world size must be a
            multiple of it; the quotient is the number of requests processed at once.
        timeout_s: how long a collective may wait before the job fails, so a dead rank ends the job instead of
            hanging it.
        process_group_backend: ``nccl`` on GPUs, ``gloo`` on CPUs by default.
    """

    strategy_name = "star"

    def __init__(
        self,
        *,
        context_parallel_size: int | None = None,
        timeout_s: float = 600.0,
        process_group_backend: str | None = None,
        **kwargs: Any,
    ) -> None:
        if timeout_s <= 0:
            raise ConfigurationError(f"timeout_s must be positive, got {timeout_s}")
        super().__init__(timeout=timedelta(seconds=timeout_s), process_group_backend=process_group_backend, **kwargs)
        self._context_parallel_size = context_parallel_size
        self._layout: ParallelLayout | None = None
        self._context_group: DistributedContextGroup | None = None

    @override
    def setup_environment(self) -> None:
        # Validate the layout before the process group exists, so a bad size fails fast on every rank.
        self._layout = make_layout(self.world_size, self._context_parallel_size)
        super().setup_environment()
        self._context_group = new_context_group(self._layout, self.global_rank)

    @override
    def teardown(self) -> None:
        if self._context_group is not None:
            self._context_group.close()
            self._context_group = None
        super().teardown()

    @property
    def layout(self) -> ParallelLayout:
        if self._layout is None:
            raise RuntimeError("StarStrategy.layout is set in setup_environment(); it was read before the trainer ran")
        return self._layout

    @property
    def context_group(self) -> ContextGroup:
        if self._context_group is None:
            raise RuntimeError("StarStrategy.context_group exists after setup_environment(); read it in a hook")
        return self._context_group

    @property
    def is_query_host(self) -> bool:
        group = self.context_group
        return group.rank == group.query_host

    @property
    def data_parallel_rank(self) -> int:
        return self.layout.data_parallel_rank(self.global_rank)

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        layout = self.layout
        return {"num_replicas": layout.data_parallel_size, "rank": layout.data_parallel_rank(self.global_rank)}


if StarStrategy.strategy_name not in StrategyRegistry:
    StrategyRegistry.register(
        StarStrategy.strategy_name,
        StarStrategy,
        description="Star Attention inference: data x context parallel groups with a query host",
    )
