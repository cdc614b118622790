"""The context-parallel strategy for Lightning Fabric scripts (alias ``"star"`` in Fabric's registry).

``Fabric(strategy=StarFabricStrategy(context_parallel_size=2))``; then ``fabric.strategy.context_group`` is what
:func:`star_lightning.generation.generate` takes.
"""

from __future__ import annotations

from typing import Any

from lightning.fabric.strategies import STRATEGY_REGISTRY, DDPStrategy

from star_lightning.context_parallel import ContextParallelMixin


class StarFabricStrategy(ContextParallelMixin, DDPStrategy):
    """Context-parallel inference for Fabric (same options as :class:`star_lightning.strategy.StarStrategy`)."""

    def __init__(
        self,
        *,
        context_parallel_size: int | None = None,
        gpus_per_host: int = 1,
        timeout_s: float = 600.0,
        process_group_backend: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            context_parallel_size=context_parallel_size,
            gpus_per_host=gpus_per_host,
            timeout_s=timeout_s,
            process_group_backend=process_group_backend,
            **kwargs,
        )


if "star" not in STRATEGY_REGISTRY:
    STRATEGY_REGISTRY.register("star", StarFabricStrategy, description="Star Attention context-parallel inference")
