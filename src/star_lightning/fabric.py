"""The context-parallel strategy for Lightning Fabric scripts (alias ``"star"`` in Fabric's registry).

``Fabric(strategy=StarFabricStrategy(context_parallel_size=2))``; then ``fabric.strategy.context_group`` is what
:func:`star_lightning.generation.generate` takes.
"""

from __future__ import annotations

from lightning.fabric.strategies import STRATEGY_REGISTRY, DDPStrategy

from star_lightning.context_parallel import ContextParallelMixin


class StarFabricStrategy(ContextParallelMixin, DDPStrategy):
    """Context-parallel inference for Fabric (same options as :class:`star_lightning.strategy.StarStrategy`)."""


if "star" not in STRATEGY_REGISTRY:
    STRATEGY_REGISTRY.register("star", StarFabricStrategy, description="Star Attention context-parallel inference")
