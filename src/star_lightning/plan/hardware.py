"""The GPU's memory and rates, and the links between hosts: a table of known GPUs, measured rates cached per GPU.

Rates are what the cost model divides by: the dense matmul rate in the model's dtype (FLOP/s) and the device copy
bandwidth (bytes read + written per second, as a ``dst.copy_(src)`` moves them). The table's H200 and H100 figures
were measured on this project's machines (:func:`measure_rates`); the A100 figures are NVIDIA's datasheet numbers,
marked as such. A GPU's rates are measured once and cached in ``$XDG_CACHE_HOME/star_lightning/gpu_rates.json``
(``~/.cache`` by default), keyed by the GPU's name and the dtype.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from star_lightning.errors import ConfigurationError

MIB = 1024**2

NVLINK_BYTES_PER_S = 450e9  # NVLink 4 (H100/H200), one direction per GPU
INFINIBAND_BYTES_PER_S = 50e9  # 400 Gb/s InfiniBand (NDR), one port per GPU
COLLECTIVE_LATENCY_S = 42e-6  # NCCL all-gather of 16 KB over 4 H200s, measured on this project's machines
GPUS_PER_NODE = 8


@dataclass(frozen=True)
class GpuSpec:
    """One GPU: its name, memory and rates (None where unknown: the plan then predicts no times)."""

    name: str
    memory_bytes: int
    matmul_flops: float | None
    copy_bytes_per_s: float | None
    source: str

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / 1024**3

    @property
    def has_rates(self) -> bool:
        return self.matmul_flops is not None and self.copy_bytes_per_s is not None


@dataclass(frozen=True)
class _KnownGpu:
    name: str  # as torch.cuda.get_device_name() reports it
    aliases: tuple[str, ...]
    memory_mib: int  # as nvidia-smi reports it
    matmul_flops: dict[str, float]  # by dtype
    copy_bytes_per_s: float
    source: str


_MEASURED = "measured on star_lightning's machines"
_DATASHEET = "NVIDIA datasheet (dense bf16 tensor core; peak memory bandwidth)"
KNOWN_GPUS: tuple[_KnownGpu, ...] = (
    _KnownGpu(
        "NVIDIA H200",
        ("H200",),
        143771,
        {"bfloat16": 792e12, "float16": 792e12, "float32": 67e12},
        4.19e12,
        _MEASURED + "; float32: datasheet",
    ),
    _KnownGpu(
        "NVIDIA H100 80GB HBM3",
        ("H100", "H100-SXM", "H100-80GB"),
        81559,
        {"bfloat16": 798e12, "float16": 798e12, "float32": 67e12},
        3.0e12,
        _MEASURED + "; float32: datasheet",
    ),
    _KnownGpu(
        "NVIDIA A100-SXM4-80GB",
        ("A100-80GB", "A100 80GB", "NVIDIA A100 80GB PCIe"),
        81920,
        {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12},
        2.0e12,
        _DATASHEET,
    ),
    _KnownGpu(
        "NVIDIA A100-SXM4-40GB",
        ("A100-40GB", "A100 40GB", "A100", "NVIDIA A100-PCIE-40GB"),
        40960,
        {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12},
        1.55e12,
        _DATASHEET,
    ),
)


def known_gpu_names() -> list[str]:
    return [gpu.aliases[0] for gpu in KNOWN_GPUS]


def _find_known(name: str) -> _KnownGpu | None:
    wanted = name.strip().lower()
    for gpu in KNOWN_GPUS:
        if wanted in (n.lower() for n in (gpu.name, *gpu.aliases)):
            return gpu
    return None


def known_gpu(name: str, dtype: str = "bfloat16") -> GpuSpec:
    """The table's entry for ``name`` (``H200``, ``H100``, ``A100-80GB``, ``A100-40GB`` or the full device name)."""
    gpu = _find_known(name)
    if gpu is None:
        raise ConfigurationError(
            f"unknown GPU {name!r}; name one of {', '.join(known_gpu_names())}, or give --gpu_memory_gib, "
            "--matmul_flops and --copy_bytes_per_s"
        )
    return GpuSpec(gpu.name, gpu.memory_mib * MIB, gpu.matmul_flops.get(dtype), gpu.copy_bytes_per_s, gpu.source)


def with_overrides(
    gpu: GpuSpec,
    *,
    memory_bytes: int | None = None,
    matmul_flops: float | None = None,
    copy_bytes_per_s: float | None = None,
) -> GpuSpec:
    """``gpu`` with the figures given explicitly in place of its own."""
    given = [name for name, v in (("memory", memory_bytes), ("matmul", matmul_flops), ("copy", copy_bytes_per_s)) if v]
    if not given:
        return gpu
    return replace(
        gpu,
        memory_bytes=memory_bytes or gpu.memory_bytes,
        matmul_flops=matmul_flops or gpu.matmul_flops,
        copy_bytes_per_s=copy_bytes_per_s or gpu.copy_bytes_per_s,
        source=f"{gpu.source}; given: {', '.join(given)}",
    )


@dataclass(frozen=True)
class Interconnect:
    """Links between hosts: bandwidth (bytes/s, one direction) and the latency of one small collective."""

    intra_node_bytes_per_s: float = NVLINK_BYTES_PER_S
    inter_node_bytes_per_s: float = INFINIBAND_BYTES_PER_S
    collective_latency_s: float = COLLECTIVE_LATENCY_S
    gpus_per_node: int = GPUS_PER_NODE

    def link_bytes_per_s(self, gpus_per_group: int) -> float:
        """The slowest link a group of ``gpus_per_group`` consecutive GPUs uses (groups are consecutive ranks)."""
        within = gpus_per_group <= self.gpus_per_node and self.gpus_per_node % gpus_per_group == 0
        return self.intra_node_bytes_per_s if within else self.inter_node_bytes_per_s


# --------------------------------------------------------------------------------------------- measured rates, cached


def rates_cache_path() -> Path:
    """``$XDG_CACHE_HOME/star_lightning/gpu_rates.json`` (``~/.cache/...`` when XDG_CACHE_HOME is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "star_lightning" / "gpu_rates.json"


def read_cached_rates(gpu_name: str, dtype: str = "bfloat16") -> dict[str, Any] | None:
    """The cached measurement of ``gpu_name`` in ``dtype``, or None (no cache, or an unreadable one)."""
    path = rates_cache_path()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    entry = cache.get(gpu_name, {}).get(dtype) if isinstance(cache, dict) else None
    if not isinstance(entry, dict) or not {"matmul_flops", "copy_bytes_per_s"} <= entry.keys():
        return None
    return entry


def write_cached_rates(gpu_name: str, dtype: str, entry: dict[str, Any]) -> Path:
    """Add one measurement to the cache file (written atomically: a reader never sees half a file)."""
    path = rates_cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        cache = json.loads(path.read_text())
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    cache.setdefault(gpu_name, {})[dtype] = entry
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".gpu_rates.", suffix=".json")
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(cache, stream, indent=1, sort_keys=True)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def measure_rates(device: Any = None, dtype: str = "bfloat16", *, use_cache: bool = True) -> GpuSpec:
    """Measure (or read from the cache) the matmul rate and copy bandwidth of a CUDA ``device``.

    An 8192^3 matmul and a 2 GiB device-to-device copy, each timed with CUDA events (median of 10, after warm-up).
    The result is cached per GPU name and dtype, so the measurement runs once per machine type.
    """
    import torch

    if not torch.cuda.is_available():
        raise ConfigurationError(
            "measuring GPU rates needs a CUDA GPU; on this machine name the GPU instead (--gpu "
            f"{'/'.join(known_gpu_names())}) or give --matmul_flops and --copy_bytes_per_s"
        )
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    properties = torch.cuda.get_device_properties(device)
    name = str(properties.name)
    cached = read_cached_rates(name, dtype) if use_cache else None
    if cached is None:
        try:
            cached = _measure(device, getattr(torch, dtype))
        except torch.OutOfMemoryError:
            raise ConfigurationError(
                f"measuring the rates of {name} needs ~4.5 GiB of free GPU memory; free the GPU, or name it (--gpu) "
                "or give --matmul_flops and --copy_bytes_per_s"
            ) from None
        write_cached_rates(name, dtype, cached)
    return GpuSpec(
        name,
        int(properties.total_memory),
        float(cached["matmul_flops"]),
        float(cached["copy_bytes_per_s"]),
        f"measured here {cached.get('measured_at', '')} (cached in {rates_cache_path()})",
    )


def _measure(device: Any, torch_dtype: Any) -> dict[str, Any]:
    """An 8192^3 matmul in ``torch_dtype`` and a 2 GiB device copy, timed by CUDA events; buffers freed after."""
    import torch

    n, elements = 8192, 1024**3  # the copy: 2 GiB of bf16 per buffer
    rates = {
        "matmul_flops": 2 * n**3 / _matmul_seconds(device, torch_dtype, n),
        "copy_bytes_per_s": 2 * elements * 2 / _copy_seconds(device, elements),  # bytes read + written
        "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
    }
    torch.cuda.empty_cache()
    return rates


def _matmul_seconds(device: Any, torch_dtype: Any, n: int) -> float:
    import torch

    a = torch.randn(n, n, device=device, dtype=torch_dtype)
    b = torch.randn(n, n, device=device, dtype=torch_dtype)
    out = torch.empty(n, n, device=device, dtype=torch_dtype)
    return _time_cuda(lambda: torch.matmul(a, b, out=out), device)


def _copy_seconds(device: Any, elements: int) -> float:
    import torch

    source = torch.empty(elements, device=device, dtype=torch.bfloat16)
    target = torch.empty_like(source)
    return _time_cuda(lambda: target.copy_(source), device)


def _time_cuda(fn: Any, device: Any, warmup: int = 3, repeats: int = 10) -> float:
    """Median seconds of ``fn`` by CUDA events, after ``warmup`` calls."""
    import torch

    with torch.cuda.device(device):
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize(device)
        times = []
        for _ in range(repeats):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1000.0)
    return statistics.median(times)


def local_gpu(dtype: str = "bfloat16", *, measure: bool = True, device_index: int = 0) -> GpuSpec | None:
    """This machine's GPU ``device_index``: name and memory from the driver; rates cached, else measured (with
    ``measure``), else the table's; None without a CUDA GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    properties = torch.cuda.get_device_properties(device_index)
    name, memory = str(properties.name), int(properties.total_memory)
    cached = read_cached_rates(name, dtype)
    if cached is not None or measure:
        return measure_rates(torch.device("cuda", device_index), dtype)
    known = _find_known(name)
    if known is not None:
        return GpuSpec(name, memory, known.matmul_flops.get(dtype), known.copy_bytes_per_s, known.source)
    return GpuSpec(name, memory, None, None, "memory from the driver; rates unknown (not measured)")
