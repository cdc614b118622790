"""The context-parallel strategy for Lightning Fabric scripts (alias ``"star"`` in Fabric's registry).

``Fabric(strategy=StarFabricStrategy(context_parallel_size=2))``; then ``fabric.strategy.context_group`` is what
:func:`star_lightning.engine.request.generate` takes.
"""

from __future__ import annotations

from typing import Any

from lightning.fabric.strategies import STRATEGY_REGISTRY, DDPStrategy
from typing_extensions import override

from star_lightning.parallel.mixin import ContextParallelMixin


class StarFabricStrategy(ContextParallelMixin, DDPStrategy):
    """Context-parallel inference for Fabric; the options of :class:`~star_lightning.parallel.strategy.StarStrategy`."""

    strategy_name = "star"

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(cls.strategy_name, cls, description="Star Attention context-parallel inference")


if StarFabricStrategy.strategy_name not in STRATEGY_REGISTRY:
    StarFabricStrategy.register_strategies(STRATEGY_REGISTRY)
