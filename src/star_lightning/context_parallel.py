"""The context-parallel part shared by the Trainer strategy and the Fabric strategy.

Lightning's Trainer and Fabric have separate strategy class trees; this mixin, placed before their DDP strategy
in the bases, adds the layout ``world = data_parallel x context_parallel``, the process groups and the sampler
split to either of them.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from star_lightning.collectives import DistributedContextGroup, new_context_group
from star_lightning.context_group import ContextGroup
from star_lightning.errors import ConfigurationError
from star_lightning.topology import ParallelLayout, make_layout


class ContextParallelMixin:
    """Stores the settings in ``__init__``; builds the topology in ``setup_environment``."""

    world_size: int
    global_rank: int

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
        super().__init__(  # type: ignore[call-arg]
            timeout=timedelta(seconds=timeout_s), process_group_backend=process_group_backend, **kwargs
        )
        self._context_parallel_size = context_parallel_size
        self._layout: ParallelLayout | None = None
        self._context_group: DistributedContextGroup | None = None

    def setup_environment(self) -> None:
        # The layout is validated before the process group exists, so a bad size fails fast on every rank.
        self._layout = make_layout(self.world_size, self._context_parallel_size)
        super().setup_environment()  # type: ignore[misc]
        self._context_group = new_context_group(self._layout, self.global_rank)

    def teardown(self) -> None:
        if self._context_group is not None:
            self._context_group.close()
            self._context_group = None
        super().teardown()  # type: ignore[misc]

    @property
    def layout(self) -> ParallelLayout:
        if self._layout is None:
            raise RuntimeError(f"{type(self).__name__}.layout is built when the processes start; it was read before")
        return self._layout

    @property
    def context_group(self) -> ContextGroup:
        if self._context_group is None:
            raise RuntimeError(f"{type(self).__name__}.context_group exists once the processes started; read it later")
        return self._context_group

    @property
    def is_query_host(self) -> bool:
        group = self.context_group
        return group.rank == group.query_host

    @property
    def data_parallel_rank(self) -> int:
        return self.layout.data_parallel_rank(self.global_rank)

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """All ranks of a context-parallel group get the same requests; the data-parallel groups split them."""
        return {"num_replicas": self.layout.data_parallel_size, "rank": self.data_parallel_rank}
