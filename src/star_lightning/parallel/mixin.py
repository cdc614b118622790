"""The context-parallel part shared by the Trainer strategy and the Fabric strategy.

Lightning's Trainer and Fabric have separate strategy class trees; this mixin, placed before their DDP strategy
in the bases, adds the layout ``world = data_parallel x context_parallel x tensor_parallel`` as a device mesh with
named axes, every process group the job uses, the sampler split, and hosts of several GPUs (tensor parallel, or
layers spread over them) to either of them. Callbacks never build groups: they ask the strategy
(:meth:`gather_in_context_group`, :meth:`agree_max_in_context_group`, :meth:`gather_in_world`).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from star_lightning.errors import ConfigurationError
from star_lightning.parallel.context import ContextInfo
from star_lightning.parallel.group import ContextGroup
from star_lightning.parallel.layout import AXES, ParallelLayout, host_gpu_indices, make_layout
from star_lightning.parallel.torch_group import DistributedContextGroup


class ContextParallelMixin:
    """Stores the settings in ``__init__``; builds the layout and the process groups in ``setup_environment``."""

    world_size: int
    global_rank: int
    local_rank: int
    num_processes: int

    def __init__(
        self,
        *,
        context_parallel_size: int | None = None,
        gpus_per_host: int = 1,
        tensor_parallel_size: int = 1,
        timeout_s: float = 600.0,
        process_group_backend: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(  # type: ignore[call-arg]
            timeout=timedelta(seconds=timeout_s), process_group_backend=process_group_backend, **kwargs
        )
        self._timeout_s = timeout_s
        self._context_parallel_size = context_parallel_size
        self._gpus_per_host = gpus_per_host
        self._tensor_parallel_size = tensor_parallel_size
        self._host_gpus: list[int] | None = None
        self._layout: ParallelLayout | None = None
        self._mesh: DeviceMesh | None = None
        self._context_group: DistributedContextGroup | None = None
        # CPU (gloo) groups for small per-request agreements (stop signals, profiler figures) that must not wait
        # behind the accelerator's queue: the ranks working on the same requests (hosts and their tensor shards),
        # and the world.
        self._model_cpu_group: dist.ProcessGroup | None = None
        self._world_cpu_group: dist.ProcessGroup | None = None
        # Phase 1's passing tokens: the hosts of this rank's context-parallel group, a communicator of their own.
        self._exchange_group: dist.ProcessGroup | None = None

    def _validate_settings(self) -> None:
        # Here rather than in __init__: the command line reports these errors itself (jsonargparse would wrap them).
        if self._timeout_s <= 0:
            raise ConfigurationError(
                f"timeout_s must be a positive number of seconds, got {self._timeout_s}; set "
                "--trainer.strategy.timeout_s to how long a collective may wait for a peer"
            )
        gpus = self._gpus_per_host
        if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
            raise ConfigurationError(
                f"gpus_per_host must be a positive number of GPUs, got {gpus!r}; set "
                "--trainer.strategy.gpus_per_host 1 (one GPU per process) or the GPUs one model copy needs"
            )
        if gpus > 1 and self._tensor_parallel_size != 1:
            raise ConfigurationError(
                f"gpus_per_host={gpus} (layers spread over one process's GPUs) and tensor_parallel_size="
                f"{self._tensor_parallel_size} (one process per GPU, heads split) are two ways to use a host of "
                "several GPUs; choose one (tensor parallelism is faster where the model has a plan)"
            )

    def validate_layout(self, world_size: int) -> ParallelLayout:
        """The layout for ``world_size`` processes, or a :class:`ConfigurationError` naming every value and the fix.

        Callable before any process starts (the command line checks the layout before weights load)."""
        self._validate_settings()
        layout = make_layout(world_size, self._context_parallel_size, self._tensor_parallel_size)
        devices = getattr(self, "parallel_devices", None)  # known once Lightning set the strategy up
        per_node = len(devices) if devices else world_size
        if layout.tensor_parallel_size > 1 and per_node % layout.tensor_parallel_size:
            raise ConfigurationError(
                f"tensor_parallel_size {layout.tensor_parallel_size} must divide the {per_node} processes per node: "
                "a host's GPUs are on one node (--trainer.devices / sbatch --ntasks-per-node)"
            )
        return layout

    def setup_environment(self) -> None:
        # The settings, the layout and the GPUs are validated before the process group exists, so a bad value fails
        # fast on every rank and before any weights are read.
        self._layout = self.validate_layout(self.world_size)
        if self._gpus_per_host > 1:
            self._host_gpus = host_gpu_indices(
                gpus_per_host=self._gpus_per_host,
                local_rank=self.local_rank,
                processes_per_node=self.num_processes,
                visible_gpus=torch.cuda.device_count(),
                accelerator=super().root_device.type,  # type: ignore[misc]
            )
        super().setup_environment()  # type: ignore[misc]
        self._create_groups()
        # Handed to the module once, as Lightning's ModelParallelStrategy hands its mesh: the module and the callbacks
        # read it and never ask which strategy runs them.
        configure = getattr(getattr(self, "lightning_module", None), "configure_context", None)
        if configure is not None and self._context_group is not None:
            configure(self.context_info())

    def context_info(self) -> ContextInfo:
        """This rank's group, devices and place in the layout, as the module reads it."""
        return ContextInfo(
            group=self.context_group,
            layout=self.layout,
            global_rank=self.global_rank,
            devices=tuple(self.host_devices),
            gpus_per_host=self._gpus_per_host,
            tensor_parallel_mesh=self.tensor_parallel_mesh if self._mesh is not None else None,
            collectives=self,
        )

    def _create_groups(self) -> None:
        """The device mesh (its axes' groups) and the CPU groups; every rank creates every group in the same order
        (group creation is collective over the world)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        layout = self.layout
        timeout = timedelta(seconds=self._timeout_s)
        self._mesh = init_device_mesh(self.root_device.type, layout.shape, mesh_dim_names=AXES)
        dp, tp = layout.data_parallel_rank(self.global_rank), layout.tensor_parallel_rank(self.global_rank)
        ranks = layout.context_parallel_ranks(dp, tp)
        group = self._mesh["context_parallel"].get_group() if layout.context_parallel_size > 1 else None
        exchange = None  # Phase 1's passing tokens: each context-parallel group's hosts, a communicator of their own
        if layout.context_parallel_size > 1:
            for members in layout.all_context_parallel_groups():
                made = dist.new_group(members, timeout=timeout)
                if self.global_rank in members:
                    exchange = self._exchange_group = made
        self._context_group = DistributedContextGroup(group, ranks, self.root_device, exchange)
        gloo_world = dist.get_backend() == dist.Backend.GLOO
        for members in layout.all_model_parallel_groups():
            cpu_group = None
            if len(members) > 1:
                whole = len(members) == layout.world_size
                cpu_group = (
                    dist.group.WORLD
                    if (whole and gloo_world)
                    else dist.new_group(members, backend="gloo", timeout=timeout)
                )
            if self.global_rank in members:
                self._model_cpu_group = cpu_group
        self._world_cpu_group = None if gloo_world else dist.new_group(backend="gloo", timeout=timeout)

    def teardown(self) -> None:
        # The world group belongs to Lightning and the mesh's groups to the mesh; only the CPU groups made here are
        # destroyed here, so no communicator outlives the job.
        for group in (self._model_cpu_group, self._world_cpu_group, self._exchange_group):
            if group is not None and dist.is_initialized() and group is not dist.group.WORLD:
                dist.destroy_process_group(group)
        self._model_cpu_group = self._world_cpu_group = self._exchange_group = None
        self._context_group = None
        self._mesh = None
        super().teardown()  # type: ignore[misc]

    @property
    def root_device(self) -> torch.device:
        """The first GPU of this process's host (with one GPU per host: Lightning's own choice)."""
        if self._host_gpus is None:
            return super().root_device  # type: ignore[misc,no-any-return]
        return torch.device("cuda", self._host_gpus[0])

    @property
    def host_devices(self) -> list[torch.device]:
        """The devices one copy of the model is spread over: ``gpus_per_host`` GPUs, or the root device."""
        if self._host_gpus is None:
            return [self.root_device]
        return [torch.device("cuda", index) for index in self._host_gpus]

    def model_to_device(self) -> None:
        # A model spread over the host's GPUs was placed when it was loaded; moving it would undo the split.
        if self._host_gpus is None:
            super().model_to_device()  # type: ignore[misc]

    @property
    def gpus_per_host(self) -> int:
        """GPUs one process spreads its model's layers over (1: one GPU per process)."""
        return self._gpus_per_host

    @property
    def timeout(self) -> timedelta:
        """How long a collective may wait for a peer before the job fails."""
        return timedelta(seconds=self._timeout_s)

    @property
    def layout(self) -> ParallelLayout:
        if self._layout is None:
            raise RuntimeError(f"{type(self).__name__}.layout is built when the processes start; it was read before")
        return self._layout

    @property
    def device_mesh(self) -> DeviceMesh:
        """The world as a mesh with the named axes ``data_parallel``, ``context_parallel``, ``tensor_parallel``."""
        if self._mesh is None:
            raise RuntimeError(f"{type(self).__name__}.device_mesh exists once the processes started; read it later")
        return self._mesh

    @property
    def tensor_parallel_mesh(self) -> DeviceMesh | None:
        """This host's GPUs (the mesh's ``tensor_parallel`` axis), or None without tensor parallelism."""
        return self.device_mesh["tensor_parallel"] if self.layout.tensor_parallel_size > 1 else None

    @property
    def context_group(self) -> ContextGroup:
        if self._context_group is None:
            raise RuntimeError(f"{type(self).__name__}.context_group exists once the processes started; read it later")
        return self._context_group

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """All ranks of a context-parallel group get the same requests; the data-parallel groups split them."""
        return {
            "num_replicas": self.layout.data_parallel_size,
            "rank": self.layout.data_parallel_rank(self.global_rank),
        }

    def gather_in_context_group(self, obj: Any) -> list[Any]:
        """Every host's ``obj``, in host order (from each host's first tensor shard). Safe per request: these ranks
        work on the same requests."""
        if self._model_cpu_group is None:
            return [obj]
        gathered: list[Any] = [None] * (self.layout.context_parallel_size * self.layout.tensor_parallel_size)
        dist.all_gather_object(gathered, obj, group=self._model_cpu_group)
        return gathered[:: self.layout.tensor_parallel_size]

    def agree_max_in_context_group(self, value: int) -> int:
        """The largest ``value`` any rank working on the same requests holds (e.g. a received stop signal)."""
        if self._model_cpu_group is None:
            return value
        flag = torch.tensor([value])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._model_cpu_group)
        return int(flag.item())

    def gather_in_world(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` in rank order; only where all ranks get there (not per request: groups may get
        different numbers of requests)."""
        if not (dist.is_available() and dist.is_initialized()):
            return [obj]
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, obj, group=self._world_cpu_group)
        return gathered
