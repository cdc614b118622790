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

from star_lightning.attention.kernels import SlidingWindow, attention_with_lse
from star_lightning.attention.merge import merge_pair, merge_partials
from star_lightning.attention.passing import PassedTokens, select_passing
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
    """Phase 1: store the block's K/V, hand the prefix on where asked, send this host's passing tokens, attend
    causally after the prefix (and to the passing tokens of the hosts before this one).

    With a sliding window a block token sees the prefix's keys (the anchor at positions ``0..a-1``, the query at the
    positions it is given) only where the window allows: for a block far from the start, none of them, as in the
    model itself, and that call is skipped."""
    positions = step.token_positions()  # [L]
    rows = step.rows
    end = key.shape[2] - rows.tail_query  # rows [skip, end) are the block's own tokens
    if step.keep_new:
        if step.store is None:
            raise RuntimeError("a block step that keeps its K/V needs the host's KV store")
        step.store.append(layer, key[:, :, step.skip : end], value[:, :, step.skip : end], positions[step.skip : end])
    if step.share_anchor is not None:
        _share_prefix(step, layer, query, key, value, end)
    # Passing tokens leave as soon as their selection queries are at hand: now where this forward computes them, else
    # after the block's own attention, when the prefix's K/V (received meanwhile) are waited for anyway.
    if step.passing is not None and rows.selection is not None:
        _send_passing(step, layer, query, key, value, end, scale, softcap)
    passed = False  # the passing tokens of the hosts before this one attended to already
    if rows.tail_query:
        out, lse = _block_and_query(step, query, key, value, end, scale, softcap, window)
    else:
        own = step.own_window(window)
        out, lse = attention_with_lse(
            query, key, value, scale=scale, causal=True, softcap=softcap, kernels=step.kernels, window=own
        )
        if step.anchor is not None:
            if step.passing is not None and rows.selection is None:
                _send_passing(step, layer, query, key, value, end, scale, softcap)
            if step.sees_anchor(window):
                anchor_keys, anchor_values = step.anchor.kv(layer, key)  # [B, Hkv, P, D]: all seen, but for a window
                if step.passing is not None and window is None and step.skip == 0:
                    # Without a window every block token sees every passed token too (all earlier, no mask): one
                    # call over the prefix and the passed keys, instead of a second call and its merge over the block.
                    anchor_keys, anchor_values = _with_passed(step.passing.earlier(layer), anchor_keys, anchor_values)
                    passed = True
                anchor_out, anchor_lse = attention_with_lse(
                    query, anchor_keys, anchor_values, scale=scale, causal=False, softcap=softcap,
                    kernels=step.kernels, window=step.anchor_window(window),
                )  # fmt: skip
                out, lse = merge_pair(anchor_out, anchor_lse, out, lse)
    if step.passing is not None and not passed:
        out = _attend_passing(step, layer, query, out, lse, end, scale, softcap, window)
    return out


def _with_passed(earlier: PassedTokens | None, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """The prefix's keys and values ``[B, Hkv, P, D]`` followed by the passed ones (each KV head its own where they
    were chosen per head: without a window their positions play no part)."""
    if earlier is None:
        return keys, values
    return torch.cat([keys, earlier.keys], dim=2), torch.cat([values, earlier.values], dim=2)  # [B, Hkv, P + m, D]


def _share_prefix(step: ForwardStep, layer: int, query: Tensor, key: Tensor, value: Tensor, end: int) -> None:
    """Hand the prefix's K/V of this forward (and its selection queries) to ``share_anchor``: the first rows, and the
    query's tail rows where the first block's forward computes them."""
    sink = step.share_anchor
    assert sink is not None
    # From the store where the forward stored (no second reference to the whole block's K/V), else the input.
    keys, values = step.store.view(layer) if step.keep_new and step.store is not None else (key, value)
    rows = step.rows
    if rows.tail_query:
        keys = torch.cat([keys[:, :, : rows.prefix], key[:, :, end:]], dim=2)  # [B, Hkv, a + q, D]
        values = torch.cat([values[:, :, : rows.prefix], value[:, :, end:]], dim=2)
    else:
        keys, values = keys[:, :, : sink.length], values[:, :, : sink.length]  # [B, Hkv, P, D]
    selection = None if rows.selection is None else query[:, :, rows.selection[0] : rows.selection[1]]
    sink.put(layer, keys, values, selection)


def _send_passing(
    step: ForwardStep,
    layer: int,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    end: int,
    scale: float,
    softcap: float | None,
) -> None:
    """Choose this host's passing tokens of the layer among its block's tokens (not the prefix's) and start sending
    them; the exchange is waited for once the block's attention to its own tokens is done (without a window the passed
    keys then join the prefix's in one call; with one, after the prefix's, in a call of their own)."""
    assert step.passing is not None
    rows = step.rows
    positions = step.token_positions()
    if rows.selection is not None:  # this forward computes the prefix: the first block, or the prefix recomputed
        selection = query[:, :, rows.selection[0] : rows.selection[1]]  # [B, Hq, s, D]
        prefix_keys = key[:, :, : rows.prefix]
        if rows.tail_query:
            prefix_keys = torch.cat([prefix_keys, key[:, :, end:]], dim=2)  # [B, Hkv, a + q, D]
    else:
        if step.anchor is None:
            raise RuntimeError("passing tokens are chosen by the anchor prefix's selection queries: no prefix given")
        received = step.anchor.selection(layer, key)
        if received is None:
            raise RuntimeError(f"layer {layer}: the anchor prefix carries no selection queries for passing tokens")
        selection = received
        prefix_keys = step.anchor.kv(layer, key)[0]
    start = rows.prefix
    passed = select_passing(
        selection, prefix_keys, key[:, :, start:end], value[:, :, start:end], positions[start:end],
        step.passing.settings, scale=scale, softcap=softcap,
    )  # fmt: skip
    step.passing.start(layer, passed)


def _block_and_query(
    step: ForwardStep,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    end: int,
    scale: float,
    softcap: float | None,
    window: int | None,
) -> tuple[Tensor, Tensor]:
    """The first block's forward with the prefix's query appended: the block's rows causal over the block, the query's
    rows over the anchor (the first ``rows.prefix`` keys) and causally over themselves."""
    positions = step.token_positions()
    kernels, anchor = step.kernels, step.rows.prefix

    def windowed(rows: slice, keys: slice) -> SlidingWindow | None:
        return None if window is None else SlidingWindow(window, positions[rows], positions[keys])

    block, tail, head = slice(0, end), slice(end, None), slice(0, anchor)
    out, lse = attention_with_lse(
        query[:, :, block], key[:, :, block], value[:, :, block], scale=scale, causal=True, softcap=softcap,
        kernels=kernels, window=windowed(block, block),
    )  # fmt: skip
    tail_out, tail_lse = attention_with_lse(
        query[:, :, tail], key[:, :, tail], value[:, :, tail], scale=scale, causal=True, softcap=softcap,
        kernels=kernels, window=windowed(tail, tail),
    )  # fmt: skip
    anchor_out, anchor_lse = attention_with_lse(
        query[:, :, tail], key[:, :, head], value[:, :, head], scale=scale, causal=False, softcap=softcap,
        kernels=kernels, window=windowed(tail, head),
    )  # fmt: skip
    tail_out, tail_lse = merge_pair(anchor_out, anchor_lse, tail_out, tail_lse)
    return torch.cat([out, tail_out], dim=2), torch.cat([lse, tail_lse], dim=2)  # [B, Hq, L, D], [B, Hq, L]


def _attend_passing(
    step: ForwardStep,
    layer: int,
    query: Tensor,
    out: Tensor,
    lse: Tensor,
    end: int,
    scale: float,
    softcap: float | None,
    window: int | None,
) -> Tensor:
    """The block's rows ``[skip, end)`` also attend to the passing tokens of the hosts before this one (all earlier in
    the context: no causal mask; a sliding window by their true positions), merged exactly."""
    assert step.passing is not None
    earlier = step.passing.earlier(layer)
    if earlier is None:
        return out
    own = slice(step.skip, end)
    rows, positions = query[:, :, own], step.token_positions()[own]  # [B, Hq, l, D], [l]
    kernels = step.kernels
    if window is None or earlier.shared:
        cut = None if window is None else SlidingWindow(window, positions, earlier.positions[0])
        passed_out, passed_lse = attention_with_lse(
            rows, earlier.keys, earlier.values, scale=scale, causal=False, softcap=softcap, kernels=kernels, window=cut
        )
    else:  # each KV head chose its own tokens: their positions, hence the window, differ by head
        groups = query.shape[1] // earlier.keys.shape[1]
        parts = [
            attention_with_lse(
                rows[:, h * groups : (h + 1) * groups], earlier.keys[:, h : h + 1], earlier.values[:, h : h + 1],
                scale=scale, causal=False, softcap=softcap, kernels=kernels,
                window=SlidingWindow(window, positions, earlier.positions[h]),
            )
            for h in range(earlier.keys.shape[1])
        ]  # fmt: skip
        passed_out = torch.cat([part[0] for part in parts], dim=1)  # [B, Hq, l, D]
        passed_lse = torch.cat([part[1] for part in parts], dim=1)  # [B, Hq, l]
    merged, _ = merge_pair(out[:, :, own], lse[:, :, own], passed_out, passed_lse)
    if own.start == 0 and end == out.shape[2]:
        return merged
    return torch.cat([out[:, :, : own.start], merged, out[:, :, end:]], dim=2)  # [B, Hq, L, D]


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
