"""Local attention that also returns the log-sum-exp, which the exact merges need: :func:`attention_with_lse`.

The backends live one to a file in :mod:`star_lightning.attention.backends` (``math``, ``banded``, ``sdpa``/``cudnn``,
``flash_attn``, ``flex``, ``triton``); :mod:`star_lightning.attention.selector` chooses one per shape class of call
and keeps it on the engine's :class:`KernelChoice`, so a call only computes its class, looks its backend up and
calls it. A fused kernel that fails to compile or run gives way to ``math``, with one warning, and the engine
chooses again.

Causality is always *bottom-right aligned*: query ``i`` of ``Lq`` sees keys ``0 .. Lk - Lq + i``. That is what a
block preceded by an anchor prefix, and a query following a cached context, both need.

A call may give a *sliding window* (:class:`SlidingWindow`): the true positions of its queries and keys and the
window size; a query at position ``p`` then sees a key at ``k`` only if ``p - size < k <= p`` (transformers'
``sliding_window_overlay`` with causality). The callers pass a window only where it cuts something, so requests
shorter than the window keep their kernels.

A call may give a *valid length*: a one-element device tensor saying how many of the keys are real. A static-shape
decode step (one captured CUDA graph replayed as the cache grows) passes the whole preallocated cache buffer with
it; only the first ``valid`` keys are attended to.

The names other modules use (:class:`KernelChoice`, :class:`SlidingWindow`, :func:`validate_backend`,
:func:`sdpa_priority`, :func:`resolve_backend`, :func:`resolve_masked_backend`) are importable from here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from star_lightning.attention.backends import lse_dtype
from star_lightning.attention.backends.sdpa import sdpa_priority
from star_lightning.attention.choice import (
    BACKENDS,
    DECODE_KERNELS,
    PREFILL_KERNELS,
    KernelChoice,
    flash_attn_available,
    validate_backend,
)
from star_lightning.attention.selector import resolve_backend, resolve_masked_backend, select, shape_class
from star_lightning.attention.window import SlidingWindow

__all__ = [
    "BACKENDS",
    "DECODE_KERNELS",
    "PREFILL_KERNELS",
    "KernelChoice",
    "SlidingWindow",
    "attention_with_lse",
    "flash_attn_available",
    "resolve_backend",
    "resolve_masked_backend",
    "sdpa_priority",
    "validate_backend",
]


def attention_with_lse(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    scale: float,
    causal: bool,
    softcap: float | None = None,
    kernels: KernelChoice | None = None,
    valid_length: Tensor | None = None,
    window: SlidingWindow | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention of ``query`` ``[B, Hq, Lq, D]`` over ``key``/``value`` ``[B, Hkv, Lk, D]``.

    Returns ``out`` ``[B, Hq, Lq, Dv]`` in the query's dtype and ``lse`` ``[B, Hq, Lq]`` (natural log, float32 or
    float64). With ``causal`` the mask is bottom-right aligned (needs ``Lk >= Lq``). A query with no visible key
    (``Lk == 0``) gets ``out = 0`` and ``lse = -inf``, which the merge ignores. With ``valid_length`` (a device
    tensor ``[1]``) only the first ``valid_length`` keys are attended to. With ``window`` the sliding-window mask
    applies too; a query that sees no key gets ``out = 0``, ``lse = -inf``.
    """
    if query.shape[1] % key.shape[1] != 0:
        raise ValueError(f"query heads ({query.shape[1]}) must be a multiple of key/value heads ({key.shape[1]})")
    if causal and key.shape[2] < query.shape[2]:
        raise ValueError(f"causal attention needs at least as many keys ({key.shape[2]}) as queries ({query.shape[2]})")
    if key.shape[2] == 0:
        out = query.new_zeros(*query.shape[:-1], value.shape[-1])
        lse = torch.full(query.shape[:-1], float("-inf"), device=query.device, dtype=lse_dtype(query))
        return out, lse
    kernels = KernelChoice() if kernels is None else kernels
    if causal and query.shape[2] == 1:  # one query, bottom-right aligned, sees every (valid) key: no causal split
        causal = False
    shape = shape_class(kernels, query, key, value, softcap, valid_length, window)
    backend = kernels.chosen.get(shape) or select(kernels, shape, query, key, value, softcap, valid_length, window)
    return backend(
        query, key, value, scale=scale, causal=causal, softcap=softcap, valid_length=valid_length, window=window,
        kernels=kernels,
    )  # fmt: skip
