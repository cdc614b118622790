"""What one engine (one loaded model) knows about its attention kernels: the user's choice, what it learnt while
running, and the backends the selector chose for each shape class of call."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from weakref import WeakKeyDictionary

import torch
from torch import Tensor

from star_lightning.attention import flex
from star_lightning.cache import StorePool
from star_lightning.engine.settings import BACKENDS

PREFILL_KERNELS: tuple[str, ...] = ("sdpa", "cudnn")
DECODE_KERNELS: tuple[str, ...] = ("triton", "math")

AttentionCall = Callable[..., tuple[Tensor, Tensor]]
"""A backend's entry: ``(query, key, value, *, scale, causal, softcap, valid_length, window, kernels) -> (out,
lse)`` (:mod:`star_lightning.attention.backends`)."""


@dataclass
class KernelChoice:
    """Which kernel each attention call uses: the user's ``backend``, and what ``auto`` resolves to on CUDA.

    One object per engine (per loaded model), passed with every call, so the choice is a per-call setting (two
    engines in one process may choose differently). ``auto`` takes ``prefill`` for long CUDA queries (cuDNN ran at
    578-599 TFLOP/s on an H200 against flash's 338-347 on the star-block shapes of the 128K benchmark) and
    ``decode`` for short ones. What the object learns while running is kept on it: a cuDNN refusal switches
    ``auto`` to flash (``sdpa``), whether each fused kernel takes grouped K/V heads without copies, FlexAttention's
    compiled function (or its failure). What does not change while the process runs is looked up once, here:
    whether flash-attn is installed (``find_spec`` is not free: it ran on every call before, 18,000 times a run).

    The backend of each shape class of call (:mod:`star_lightning.attention.selector`) is chosen once and kept in
    ``chosen``; ``selections`` counts the choices made. Learning something that changes a choice (:meth:`forget`)
    empties ``chosen``, so the next call of each class chooses again.
    """

    backend: str = "auto"
    prefill: str = "cudnn"
    decode: str = "triton"
    native_gqa: dict[str, bool | None] = field(default_factory=lambda: {"sdpa": None, "cudnn": None})
    flash_attn: bool = field(default_factory=lambda: flash_attn_available())
    """Whether the flash-attn package is installed (looked up once per engine)."""
    flex: flex.FlexState = field(default_factory=flex.FlexState)
    """FlexAttention's compiled function on this engine, or why it failed."""
    masked_sdpa_failure: str | None = None
    """Why the memory-efficient SDPA kernel with a bias failed on this engine (its masked calls then take ``math``)."""
    graph_failure: str | None = None
    """Why capturing a decode step as a CUDA graph failed on this engine (its decoders then run uncaptured)."""
    query_graph_failure: str | None = None
    """Why capturing a Phase 2 query forward failed on this engine (its queries then run uncaptured)."""
    prefill_failure: str | None = None
    """Why capturing a Phase 1 block as a CUDA graph failed on this engine (its blocks then run uncaptured)."""
    prefill_captures: int = 0
    prefill_replays: int = 0
    prefill_capture_s: float = 0.0
    """Phase 1 block graphs captured and replayed on this engine, and the seconds the captures took."""
    compiled: WeakKeyDictionary[Any, Callable[..., Any]] = field(default_factory=WeakKeyDictionary)
    r"""The ``torch.compile``\ d forward of each model decoded with ``--model.decode compile`` (compiled once)."""
    chosen: dict[Any, AttentionCall] = field(default_factory=dict, repr=False)
    """The backend chosen for each shape class of call (:class:`~star_lightning.attention.selector.ShapeClass`)."""
    selections: int = 0
    """How many times a backend was chosen (once per shape class, again after :meth:`forget`)."""
    stores: StorePool = field(default_factory=StorePool, repr=False)
    """The engine's KV store buffers, handed from a request's store to the next one's with the graphs captured over
    them (:mod:`star_lightning.cache`)."""

    def compiled_forward(self, model: Any) -> Callable[..., Any]:
        """``model.forward`` under ``torch.compile`` (static shapes: a decode step's are the same every token): the
        norms, rotary embedding, activations and residual adds fused; Star Attention itself stays eager (it is
        excluded from tracing) and the whole step is then captured as one CUDA graph."""
        if model not in self.compiled:
            self.compiled[model] = torch.compile(model.forward, dynamic=False)
        return self.compiled[model]

    def forget(self) -> None:
        """Drop every chosen backend: this engine learnt something that changes the choice (a fused kernel failed)."""
        self.chosen.clear()

    def __post_init__(self) -> None:
        validate_backend(self.backend)
        if self.prefill not in PREFILL_KERNELS:
            raise ValueError(f"unknown prefill kernel {self.prefill!r}; choose one of {', '.join(PREFILL_KERNELS)}")
        if self.decode not in DECODE_KERNELS:
            raise ValueError(f"unknown decode kernel {self.decode!r}; choose one of {', '.join(DECODE_KERNELS)}")


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def validate_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "flash_attn" and not flash_attn_available():
        raise ValueError(
            "attention backend 'flash_attn' was asked for but the flash-attn package is not installed; "
            "install the extra (pip install 'star-lightning[flash]') or use --model.backend auto"
        )
    if backend == "flex" and not flex.available():
        raise ValueError(
            f"attention backend 'flex' needs FlexAttention (torch >= 2.5; this is {torch.__version__}); "
            "use --model.backend auto"
        )
