"""How the world's ranks are laid out: ``world = data_parallel x context_parallel``.

Pure arithmetic (no ``torch.distributed``), checked before any weights are loaded. Context-parallel groups are
runs of consecutive ranks, so with one task per GPU a group sits on as few nodes as possible and its Phase 2
traffic stays on the fastest links.
"""

from __future__ import annotations

from dataclasses import dataclass

from star_lightning.errors import ConfigurationError


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    context_parallel_size: int

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // self.context_parallel_size

    def data_parallel_rank(self, rank: int) -> int:
        return rank // self.context_parallel_size

    def context_parallel_rank(self, rank: int) -> int:
        return rank % self.context_parallel_size

    def context_parallel_ranks(self, data_parallel_rank: int) -> list[int]:
        first = data_parallel_rank * self.context_parallel_size
        return list(range(first, first + self.context_parallel_size))

    def all_context_parallel_groups(self) -> list[list[int]]:
        return [self.context_parallel_ranks(i) for i in range(self.data_parallel_size)]


def make_layout(world_size: int, context_parallel_size: int | None) -> ParallelLayout:
    """``context_parallel_size=None`` puts every rank in one context-parallel group."""
    if world_size <= 0:
        raise ConfigurationError(f"world size must be positive, got {world_size}")
    cp = world_size if context_parallel_size is None else context_parallel_size
    if cp <= 0:
        raise ConfigurationError(
            f"context_parallel_size must be a positive number of hosts, got {cp}; set "
            "--trainer.strategy.context_parallel_size to a divisor of the world size"
        )
    if world_size % cp != 0:
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise ConfigurationError(
            f"the world size {world_size} (nodes x devices) is not divisible by context_parallel_size {cp}; "
            f"choose context_parallel_size from {divisors}, or change the number of devices/nodes"
        )
    return ParallelLayout(world_size, cp)
