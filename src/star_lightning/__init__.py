"""star_lightning: Star Attention inference for HuggingFace causal LMs on Lightning clusters."""

from star_lightning.attention.star import register_star_attention
from star_lightning.generation import GenerationSettings, StarSettings, generate
from star_lightning.module import StarAttentionLM
from star_lightning.parallel.fabric import StarFabricStrategy
from star_lightning.parallel.strategy import StarStrategy
from star_lightning.partition import plan_blocks

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
__version__ = "0.1.0"
