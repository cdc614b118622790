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


def host_gpu_indices(
    *, gpus_per_host: int, local_rank: int, processes_per_node: int, visible_gpus: int, accelerator: str
) -> list[int]:
    """The CUDA device indices of one host (a process that owns ``gpus_per_host`` GPUs of its node).

    Either every process sees all GPUs of the node (``--gpus-per-node``), and process ``r`` takes GPUs
    ``r*g .. r*g+g-1``, or the job bound exactly ``g`` GPUs to each process, which then takes ``0 .. g-1``.
    """
    if accelerator != "cuda":
        raise ConfigurationError(
            f"gpus_per_host={gpus_per_host} spreads one model copy over several GPUs, but the accelerator is "
            f"{accelerator!r}; use --trainer.accelerator gpu, or gpus_per_host 1"
        )
    if visible_gpus == gpus_per_host:
        return list(range(gpus_per_host))
    needed = processes_per_node * gpus_per_host
    if visible_gpus < needed:
        raise ConfigurationError(
            f"gpus_per_host={gpus_per_host} with {processes_per_node} process(es) per node needs {needed} GPUs per "
            f"node, but {visible_gpus} are visible; run {max(1, visible_gpus // gpus_per_host)} process(es) per "
            "node (--trainer.devices, or sbatch --ntasks-per-node = GPUs per node / gpus_per_host)"
        )
    first = local_rank * gpus_per_host
    return list(range(first, first + gpus_per_host))
