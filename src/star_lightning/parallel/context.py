"""What a request's ranks know of their layout, handed to the module once by the strategy.

Lightning's ``ModelParallelStrategy`` pushes its device mesh into the module in ``setup``; here the context-parallel
strategy hands the module a :class:`ContextInfo` (:meth:`StarAttentionLM.configure_context`) once its groups exist.
The module and the callbacks read it and never test the strategy's type; under a plain Lightning strategy they
read :func:`single_host`'s: every process one host of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch.distributed.device_mesh import DeviceMesh

from star_lightning.parallel.group import ContextGroup, SingleHostGroup, is_query_host
from star_lightning.parallel.layout import ParallelLayout, make_layout


class ContextCollectives(Protocol):
    """The small agreements of a request's ranks over CPU groups (the strategy's)."""

    def gather_in_context_group(self, obj: Any) -> list[Any]: ...

    def agree_max_in_context_group(self, value: int) -> int: ...

    def gather_in_world(self, obj: Any) -> list[Any]: ...


class _OneProcess:
    """A process that is its own group: every agreement is its own value."""

    def gather_in_context_group(self, obj: Any) -> list[Any]:
        return [obj]

    def agree_max_in_context_group(self, value: int) -> int:
        return value

    def gather_in_world(self, obj: Any) -> list[Any]:
        return [obj]


@dataclass(frozen=True)
class ContextInfo:
    """This rank's context-parallel group, the devices its model copy lives on, and where it sits in the layout."""

    group: ContextGroup
    layout: ParallelLayout
    global_rank: int = 0
    devices: tuple[torch.device, ...] = ()
    """The devices one copy of the model is spread over; empty: the strategy's root device."""
    gpus_per_host: int = 1
    tensor_parallel_mesh: DeviceMesh | None = None
    collectives: ContextCollectives = field(default_factory=_OneProcess)
    shared: bool = True
    """Whether the ranks of a group work on the same requests (False under a plain strategy: each rank its own)."""

    @property
    def data_parallel_rank(self) -> int:
        return self.layout.data_parallel_rank(self.global_rank)

    @property
    def context_parallel_rank(self) -> int:
        return self.layout.context_parallel_rank(self.global_rank)

    @property
    def tensor_parallel_rank(self) -> int:
        return self.layout.tensor_parallel_rank(self.global_rank)

    @property
    def writes_predictions(self) -> bool:
        """The one rank of a request's ranks that writes its prediction: the query host's first tensor shard."""
        return is_query_host(self.group) and self.tensor_parallel_rank == 0

    def gather_in_context_group(self, obj: Any) -> list[Any]:
        return self.collectives.gather_in_context_group(obj)

    def agree_max_in_context_group(self, value: int) -> int:
        return self.collectives.agree_max_in_context_group(value)

    def gather_in_world(self, obj: Any) -> list[Any]:
        return self.collectives.gather_in_world(obj)


def single_host() -> ContextInfo:
    """A plain Lightning strategy's process: a host of its own, its agreements its own."""
    return ContextInfo(SingleHostGroup(), make_layout(1, 1, 1), shared=False)


def planned_layout(strategy: object, world_size: int) -> tuple[ParallelLayout, int]:
    """The layout a strategy will build for ``world_size`` processes, checked before any process starts, and its
    GPUs per host: the context-parallel strategy's own validator, or every process a host of its own."""
    validate = getattr(strategy, "validate_layout", None)
    if validate is None:
        return make_layout(world_size, 1, 1), 1
    return validate(world_size), int(getattr(strategy, "gpus_per_host", 1))
