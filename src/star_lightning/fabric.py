"""The same context-parallel strategy for Lightning Fabric scripts (alias ``"star"`` in Fabric's registry).

Fabric and the Trainer have separate strategy hierarchies; both subclasses share the layout and group code in
:mod:`star_lightning.topology` and :mod:`star_lightning.collectives`.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from lightning.fabric.strategies import STRATEGY_REGISTRY, DDPStrategy
from typing_extensions import override

from star_lightning.collectives import DistributedContextGroup, new_context_group
from star_lightning.context_group import ContextGroup
from star_lightning.errors import ConfigurationError
from star_lightning.topology import ParallelLayout, make_layout


class StarFabricStrategy(DDPStrategy):
    """Context-parallel inference for Fabric: ``Fabric(strategy=StarFabricStrategy(context_parallel_size=2))``."""

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
            raise RuntimeError("StarFabricStrategy.layout is set by fabric.launch(); it was read before")
        return self._layout

    @property
    def context_group(self) -> ContextGroup:
        if self._context_group is None:
            raise RuntimeError("StarFabricStrategy.context_group exists after fabric.launch(); read it afterwards")
        return self._context_group

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        layout = self.layout
        return {"num_replicas": layout.data_parallel_size, "rank": layout.data_parallel_rank(self.global_rank)}


if "star" not in STRATEGY_REGISTRY:
    STRATEGY_REGISTRY.register("star", StarFabricStrategy, description="Star Attention context-parallel inference")
