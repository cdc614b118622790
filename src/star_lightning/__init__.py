"""star_lightning: Star Attention inference for HuggingFace causal LMs on Lightning clusters.

The public names are imported on first use (PEP 562), so ``star-lightning --help`` and ``--version`` answer
without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from star_lightning.attention.star import register_star_attention
    from star_lightning.engine.request import generate
    from star_lightning.engine.settings import GenerationSettings, StarSettings
    from star_lightning.module import StarAttentionLM
    from star_lightning.parallel.fabric import StarFabricStrategy
    from star_lightning.parallel.strategy import StarStrategy
    from star_lightning.partition import plan_blocks

__version__ = "0.1.0"

_PUBLIC = {
    "GenerationSettings": "star_lightning.engine.settings",
    "StarAttentionLM": "star_lightning.module",
    "StarFabricStrategy": "star_lightning.parallel.fabric",
    "StarSettings": "star_lightning.engine.settings",
    "StarStrategy": "star_lightning.parallel.strategy",
    "generate": "star_lightning.engine.request",
    "plan_blocks": "star_lightning.partition",
    "register_star_attention": "star_lightning.attention.star",
}
__all__ = [
    "GenerationSettings",
    "StarAttentionLM",
    "StarFabricStrategy",
    "StarSettings",
    "StarStrategy",
    "generate",
    "plan_blocks",
    "register_star_attention",
]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'star_lightning' has no attribute {name!r}")
