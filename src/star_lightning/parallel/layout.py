"""How the world's ranks are laid out: ``world = data_parallel x context_parallel x tensor_parallel``.

Pure arithmetic (no ``torch.distributed``), checked before any weights are loaded. Tensor parallelism is the
innermost axis (a host's ``T`` GPUs are consecutive ranks, on one node, where its all-reduces are fastest), then
the hosts of a context-parallel group (consecutive hosts, on as few nodes as possible, so Phase 2's traffic stays
on the fastest links), then the data-parallel groups. Rank ``r`` is tensor shard ``r % T`` of host
``(r // T) % C`` of data-parallel group ``r // (C T)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from star_lightning.errors import ConfigurationError

AXES = ("data_parallel", "context_parallel", "tensor_parallel")


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    context_parallel_size: int
    tensor_parallel_size: int = 1

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // (self.context_parallel_size * self.tensor_parallel_size)

    @property
    def shape(self) -> tuple[int, int, int]:
        """The device mesh's shape along :data:`AXES`."""
        return self.data_parallel_size, self.context_parallel_size, self.tensor_parallel_size

    def data_parallel_rank(self, rank: int) -> int:
        return rank // (self.context_parallel_size * self.tensor_parallel_size)

    def context_parallel_rank(self, rank: int) -> int:
        return (rank // self.tensor_parallel_size) % self.context_parallel_size

    def tensor_parallel_rank(self, rank: int) -> int:
        return rank % self.tensor_parallel_size

    def context_parallel_ranks(self, data_parallel_rank: int, tensor_parallel_rank: int = 0) -> list[int]:
        """The hosts of one request, in host order, for one tensor shard."""
        first = data_parallel_rank * self.context_parallel_size * self.tensor_parallel_size + tensor_parallel_rank
        return [first + host * self.tensor_parallel_size for host in range(self.context_parallel_size)]

    def all_context_parallel_groups(self) -> list[list[int]]:
        return [
            self.context_parallel_ranks(dp, tp)
            for dp in range(self.data_parallel_size)
            for tp in range(self.tensor_parallel_size)
        ]

    def model_parallel_ranks(self, data_parallel_rank: int) -> list[int]:
        """Every rank that works on the same requests: the hosts of a context-parallel group and their shards."""
        size = self.context_parallel_size * self.tensor_parallel_size
        return list(range(data_parallel_rank * size, (data_parallel_rank + 1) * size))

    def all_model_parallel_groups(self) -> list[list[int]]:
        return [self.model_parallel_ranks(dp) for dp in range(self.data_parallel_size)]


def make_layout(world_size: int, context_parallel_size: int | None, tensor_parallel_size: int = 1) -> ParallelLayout:
    """``context_parallel_size=None`` puts every host (``world / tensor_parallel_size`` of them) in one group."""
    if world_size <= 0:
        raise ConfigurationError(f"world size must be positive, got {world_size}")
    tp = tensor_parallel_size
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ConfigurationError(
            f"tensor_parallel_size must be a positive number of GPUs per host, got {tp!r}; set "
            "--trainer.strategy.tensor_parallel_size 1 (no tensor parallelism) or the GPUs of one host"
        )
    if world_size % tp != 0:
        raise ConfigurationError(
            f"the world size {world_size} (nodes x devices) is not divisible by tensor_parallel_size {tp}; use a "
            "number of devices that is a multiple of the GPUs per host"
        )
    hosts = world_size // tp
    cp = hosts if context_parallel_size is None else context_parallel_size
    if cp <= 0:
        raise ConfigurationError(
            f"context_parallel_size must be a positive number of hosts, got {cp}; set "
            "--trainer.strategy.context_parallel_size to a divisor of the number of hosts"
        )
    if hosts % cp != 0:
        divisors = [d for d in range(1, hosts + 1) if hosts % d == 0]
        what = f"the world size {world_size} (nodes x devices)"
        if tp > 1:
            what = f"the {hosts} hosts (world size {world_size} / tensor_parallel_size {tp})"
        raise ConfigurationError(
            f"{what} is not divisible by context_parallel_size {cp}; choose context_parallel_size from {divisors}, "
            "or change the number of devices/nodes"
        )
    return ParallelLayout(world_size, cp, tp)


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
