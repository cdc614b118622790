"""Sliding-window and soft-capped attention with log-sum-exp on PyTorch's FlexAttention.

Why: the fused SDPA kernels (flash, cuDNN) take no window and no soft-cap, so such layers (Gemma-2/3, Mistral,
hybrid local/global stacks: most layers of many long-context models) ran the ``math`` kernel, the slowest path.
FlexAttention compiles one fused kernel for the mask and visits only the key tiles the mask can reach, so a window
of ``W`` costs ``L x W``, not ``L x L``.

Every masked call the engine makes is *positional*: a query at true position ``p`` sees a key at ``k`` iff
``k <= p`` (and ``p - W < k`` with a window). That is the bottom-right causality of every call (a block after its
anchor, a query after its cache, a ring hop), so one rule covers them all, the keys' positions may be any set
(a host's blocks, the ring's chunks) and a static decode step's unfilled cache slots are masked by giving them a
position no query reaches. The block-sparse mask is built from the positions with a few small tensor ops on the
device (no host sync, so a captured CUDA graph replays it; no ``Lq x Lk`` mask is ever materialised):
a ``128 x 128`` tile is skipped when no pair in it can be visible, and run without the mask when every pair is.

On CUDA the function is ``torch.compile``\\ d once per engine (:class:`FlexState`, dynamic shapes after the first
new length, so ragged last blocks and new cache lengths do not compile again); on CPU it runs eagerly (PyTorch's
unfused reference: for tests, through the same entry point). Both ``return_aux=AuxRequest(lse=True)`` (torch >= 2.9)
and the older ``return_lse=True`` are supported; the log-sum-exp is natural-log either way.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

BLOCK = 128
# A position no query reaches: unfilled cache slots and padding get it (``k <= p`` is never true).
_UNREACHABLE = 1 << 40

try:
    from torch.nn.attention import flex_attention as _flex_module
except ImportError:  # torch < 2.5
    _flex_module = None  # type: ignore[assignment]


def available() -> bool:
    """Whether this torch has FlexAttention."""
    return _flex_module is not None


@dataclass
class FlexState:
    """What one engine knows about FlexAttention: its compiled function per device type, and whether it failed.

    Kept on the engine's :class:`~star_lightning.attention.choice.KernelChoice` (no module-level state): a failure to
    compile or run switches that engine to the fallback kernel, with one warning.
    """

    compiled: dict[str, Callable[..., Any]] = field(default_factory=dict)
    failure: str | None = None

    def function(self, device: torch.device) -> Callable[..., Any]:
        """``flex_attention`` for ``device``: compiled on CUDA (once), eager elsewhere."""
        assert _flex_module is not None
        if device.type != "cuda":
            return _flex_module.flex_attention
        if "cuda" not in self.compiled:
            self.compiled["cuda"] = torch.compile(_flex_module.flex_attention)
        return self.compiled["cuda"]

    def fail(self, error: BaseException) -> None:
        self.failure = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        warnings.warn(
            f"FlexAttention failed ({self.failure}); sliding-window and soft-capped layers use the math kernel from "
            "now on (exact, slower)",
            stacklevel=3,
        )


def _padded(positions: Tensor, length: int, fill: Tensor | int) -> Tensor:
    """``positions`` ``[L]`` padded to ``length`` with ``fill`` (a value or a one-element tensor)."""
    pad = length - positions.shape[0]
    if pad == 0:
        return positions
    if isinstance(fill, Tensor):
        tail = fill.reshape(1).expand(pad)  # [pad]
    else:
        tail = positions.new_full((pad,), fill)  # [pad]
    return torch.cat([positions, tail])


def positions_for(
    q_len: int, k_len: int, causal: bool, valid_length: Tensor | None, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Positions that make the positional rule mean index causality, bottom-right aligned to the valid keys, for a
    call that has none of its own (a soft-capped layer without a window): keys ``0..Lk-1``, queries the last ``Lq``
    valid positions; non-causal queries see every valid key."""
    keys = torch.arange(k_len, device=device)  # [Lk]
    if causal:
        last = k_len if valid_length is None else valid_length.to(torch.long)  # number of valid keys
        queries = torch.arange(q_len, device=device) + (last - q_len)  # [Lq]
    else:
        queries = torch.full((q_len,), _UNREACHABLE - 1, dtype=torch.long, device=device)  # [Lq]
    return queries, keys


@dataclass(frozen=True)
class PositionalMask:
    """The positional rule of one call, its positions padded to whole tiles (``[nq * BLOCK]``, ``[nk * BLOCK]``)."""

    queries: Tensor
    keys: Tensor
    window: int | None

    def mask_mod(self) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
        queries, keys = self.queries, self.keys
        if self.window is None:

            def causal(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
                return keys[k] <= queries[q]

            return causal
        window = self.window

        def windowed(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
            query, key = queries[q], keys[k]
            return (key <= query) & (key > query - window)

        return windowed

    def tiles(self) -> tuple[Tensor, Tensor]:
        """``(visible, full)`` ``[nq, nk]`` booleans: a tile where some pair may be visible, and one where all are."""
        q_tiles = self.queries.view(-1, BLOCK)  # [nq, BLOCK]
        k_tiles = self.keys.view(-1, BLOCK)  # [nk, BLOCK]
        q_min, q_max = q_tiles.amin(-1)[:, None], q_tiles.amax(-1)[:, None]  # [nq, 1]
        k_min = k_tiles.amin(-1)[None, :]  # [1, nk]
        k_max_all = k_tiles.amax(-1)[None, :]  # [1, nk]: unreachable if any key of the tile is
        reachable = k_tiles < _UNREACHABLE
        k_max = torch.where(reachable, k_tiles, -_UNREACHABLE).amax(-1)[None, :]  # [1, nk]: of the reachable keys
        visible = k_min <= q_max
        full = k_max_all <= q_min
        if self.window is not None:
            visible = visible & (k_max > q_min - self.window)
            full = full & (k_min > q_max - self.window)
        return visible, full


def positional_mask(
    query_positions: Tensor,
    key_positions: Tensor,
    window: int | None,
    valid_length: Tensor | None,
) -> PositionalMask:
    """The call's mask; keys past ``valid_length`` (a static decode step's unfilled slots) and padding never seen."""
    q_len, k_len = query_positions.shape[0], key_positions.shape[0]
    q_tiles, k_tiles = -(-q_len // BLOCK), -(-k_len // BLOCK)
    keys = key_positions.to(torch.long)
    if valid_length is not None:
        filled = torch.arange(k_len, device=keys.device) < valid_length  # [Lk]
        keys = torch.where(filled, keys, _UNREACHABLE)
    queries = _padded(query_positions.to(torch.long), q_tiles * BLOCK, query_positions[-1:].to(torch.long))
    return PositionalMask(queries, _padded(keys, k_tiles * BLOCK, _UNREACHABLE), window)


def _order(tiles: Tensor) -> tuple[Tensor, Tensor]:
    """``(count [1, 1, nq], indices [1, 1, nq, nk])`` of the true tiles of each row, those first (int32)."""
    count = tiles.sum(-1, dtype=torch.int32)  # [nq]
    indices = torch.argsort(tiles.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)  # [nq, nk]
    return count[None, None], indices[None, None]


def _block_mask_kwargs() -> dict[str, Any]:
    """``compute_q_blocks=False`` where this torch has it (the transposed tiles serve only the backward pass)."""
    if _flex_module is None:
        return {}
    parameters = inspect.signature(_flex_module.BlockMask.from_kv_blocks).parameters
    return {"compute_q_blocks": False} if "compute_q_blocks" in parameters else {}


def _lse_request() -> dict[str, Any]:
    """How this torch's ``flex_attention`` is asked for the log-sum-exp."""
    if _flex_module is None:
        return {}
    if "return_aux" in inspect.signature(_flex_module.flex_attention).parameters:
        return {"return_aux": _flex_module.AuxRequest(lse=True)}
    return {"return_lse": True}


# Read once: the signatures do not change while the process runs.
_BLOCK_MASK_KWARGS = _block_mask_kwargs()
_LSE_REQUEST = _lse_request()


def block_mask(mask: PositionalMask, q_len: int, k_len: int) -> Any:
    """The FlexAttention ``BlockMask`` of ``mask`` for a call of ``q_len`` queries over ``k_len`` keys."""
    assert _flex_module is not None
    visible, full = mask.tiles()
    partial_count, partial = _order(visible & ~full)
    full_count, full_indices = _order(full)
    return _flex_module.BlockMask.from_kv_blocks(
        partial_count,
        partial,
        full_count,
        full_indices,
        BLOCK_SIZE=BLOCK,
        mask_mod=mask.mask_mod(),
        seq_lengths=(q_len, k_len),
        **_BLOCK_MASK_KWARGS,
    )


def _softcap_mod(softcap: float) -> Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]:
    def capped(score: Tensor, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return torch.tanh(score / softcap) * softcap

    return capped


def flex_attention_with_lse(
    state: FlexState,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: PositionalMask,
    *,
    scale: float,
    softcap: float | None,
) -> tuple[Tensor, Tensor]:
    """``query`` ``[B, Hq, Lq, D]`` over ``key``/``value`` ``[B, Hkv, Lk, D]`` under ``mask``; ``out`` ``[B, Hq, Lq,
    Dv]`` in the query's dtype and ``lse`` ``[B, Hq, Lq]`` (natural log, float32, float64 for float64). A query that
    sees no key gets ``out = 0``, ``lse = -inf``. Raises whatever FlexAttention raises (the caller falls back)."""
    q_len, k_len = query.shape[2], key.shape[2]
    function = state.function(query.device)
    with warnings.catch_warnings():  # eager (CPU) flex says it is unfused: it is meant to be, there
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        out, aux = function(
            query,
            key,
            value,
            score_mod=None if softcap is None else _softcap_mod(softcap),
            block_mask=block_mask(mask, q_len, k_len),
            scale=scale,
            enable_gqa=query.shape[1] != key.shape[1],
            **_LSE_REQUEST,
        )
    lse = aux if isinstance(aux, Tensor) else aux.lse  # [B, Hq, Lq]
    lse_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    return out, lse.to(lse_dtype)
