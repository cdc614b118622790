"""Star Attention as a transformers attention function (registered as ``"star_lightning"``).

The engine calls the model with ``use_cache=False`` and a :class:`~star_lightning.attention.step.ForwardStep` in the
forward kwargs (``star_step=...``); every attention layer gets its freshly projected, rotated q/k/v and the step,
and does the rest here: store what the step says into the host's KV store, compose the anchor prefix with the block
(Phase 1), attend over the store and merge every host's partial exactly (Phase 2), or run the ring (baseline).

Masks are built here, not by transformers: requests are processed one at a time and blocks ragged, so there is
no padding; causality is the only mask, applied bottom-right aligned by the kernels, and for a sliding-window layer
the window, applied by the tokens' true positions (block and anchor positions in Phase 1, the store's positions in
Phase 2, the source host's chunk spans in the ring), so star and ring keep the model's own window semantics. A
window that cuts nothing in a forward (the request is shorter than it) is no mask at all. This function is
therefore deliberately not registered in ``AttentionMaskInterface`` (transformers then passes
``attention_mask=None``, and a mask that does reach us is rejected rather than silently ignored).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import AttentionInterface

from star_lightning.attention.kernels import attention_with_lse
from star_lightning.attention.merge import merge_pair, merge_partials
from star_lightning.attention.ring import ring_attention
from star_lightning.attention.step import ForwardStep

ATTENTION_NAME = "star_lightning"


def star_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    sliding_window: int | None = None,
    star_step: ForwardStep | None = None,
    **kwargs: object,
) -> tuple[Tensor, None]:
    """q ``[B, Hq, Lq, D]``, k/v ``[B, Hkv, Lk, D]`` -> ``([B, Lq, Hq, D], None)`` as transformers expects."""
    if star_step is None:
        raise RuntimeError(
            f"the '{ATTENTION_NAME}' attention implementation runs only inside star_lightning's engine, which "
            "passes star_step=...; load the model again with attn_implementation='sdpa' for plain use"
        )
    if attention_mask is not None:
        raise RuntimeError(
            "star_lightning builds its own causal masks; got an attention_mask (padding is not supported)"
        )
    layer = getattr(module, "layer_idx", None)
    if not isinstance(layer, int):
        raise RuntimeError(f"{type(module).__name__} has no integer layer_idx; star_lightning cannot store its KV")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    step = star_step
    window = step.window(sliding_window)
    if step.phase == "block":
        out = _block(step, layer, query, key, value, scale, softcap, window)
    elif step.phase == "ring":
        if step.store is None or step.ring is None:
            raise RuntimeError("a ring step needs the host's KV store and the ring plan")
        step.store.append(layer, key, value, step.token_positions())
        out, _ = ring_attention(
            query, key, value, step.group, step.ring, scale=scale, softcap=softcap, kernels=step.kernels, window=window
        )
    else:
        out = _query(step, layer, query, key, value, scale, softcap, window)
    return out.transpose(1, 2).contiguous(), None  # [B, Lq, Hq, D]


def _block(
    step: ForwardStep,
    layer: int,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    scale: float,
    softcap: float | None,
    window: int | None,
) -> Tensor:
    """Phase 1: store the block's K/V, hand the anchor on where asked, attend causally after the anchor prefix.

    With a sliding window a block token sees the anchor's keys (positions ``0..a-1``) only where the window allows:
    for a block far from the start, none of them, as in the model itself, and that call is skipped."""
    positions = step.token_positions()  # [L]
    if step.keep_new:
        if step.store is None:
            raise RuntimeError("a block step that keeps its K/V needs the host's KV store")
        step.store.append(layer, key[:, :, step.skip :], value[:, :, step.skip :], positions[step.skip :])
    if step.share_anchor is not None:
        # From the store where the forward stored (no second reference to the whole block's K/V), else the input.
        keys, values = step.store.view(layer) if step.keep_new and step.store is not None else (key, value)
        length = step.share_anchor.length
        step.share_anchor.put(layer, keys[:, :, :length], values[:, :, :length])  # [B, Hkv, a, D]
    own = step.own_window(window)
    out, lse = attention_with_lse(
        query, key, value, scale=scale, causal=True, softcap=softcap, kernels=step.kernels, window=own
    )
    if step.anchor is not None and step.sees_anchor(window):
        anchor_keys, anchor_values = step.anchor.kv(layer, key)  # [B, Hkv, a, D]: all of it seen, but for a window
        anchor_out, anchor_lse = attention_with_lse(
            query, anchor_keys, anchor_values, scale=scale, causal=False, softcap=softcap, kernels=step.kernels,
            window=step.anchor_window(window, anchor_keys.shape[2]),
        )  # fmt: skip
        out, lse = merge_pair(anchor_out, anchor_lse, out, lse)
    return out


def _query(
    step: ForwardStep,
    layer: int,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    scale: float,
    softcap: float | None,
    window: int | None,
) -> Tensor:
    """Phase 2: attention over this host's store (the query host first appends the new tokens), then the exact merge
    of every host's partial (each host merges the same gathered partials, so all continue with identical bits)."""
    store = step.store
    if store is None:
        raise RuntimeError("a query step needs the host's KV store")
    positions = step.token_positions()  # [Lq]
    valid = None
    if step.static is not None:
        if step.keep_new:
            store.write_at(layer, step.static.write_slot, key, value, positions)
        keys, values, key_positions = store.buffers(layer)  # [B, Hkv, C, D], [C]: the valid length marks the real
        valid = step.static.valid_length
    else:
        if step.keep_new:
            store.append(layer, key, value, positions)
        keys, values = store.view(layer)  # [B, Hkv, len, D]
        key_positions = store.positions(layer)  # [len]
    out, lse = attention_with_lse(
        query, keys, values, scale=scale, causal=step.keep_new, softcap=softcap, kernels=step.kernels,
        valid_length=valid, window=step.store_window(window, key_positions),
    )  # fmt: skip
    outs, lses = step.group.gather_partials(out, lse)  # [N, B, Hq, Lq, D], [N, B, Hq, Lq]
    out, _ = merge_partials(outs, lses)
    return out


def register_star_attention() -> str:
    """Make ``attn_implementation="star_lightning"`` available to every transformers model; idempotent.

    Registered excluded from ``torch.compile``'s tracing: a compiled decode step fuses the model's own work around it,
    while this function (its KV store writes, collectives and kernels) runs as it is, inside the step's CUDA graph."""
    AttentionInterface.register(ATTENTION_NAME, torch.compiler.disable(star_attention_forward))
    return ATTENTION_NAME
