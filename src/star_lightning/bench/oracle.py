"""Bounds on what making part of star's Phase 1 exact can recover: each cell's Phase 1 K/V from one masked forward.

Star's Phase 1 is, for every layer, attention under a mask: block 0 (the anchor) causally over itself, every other
block over the anchor and itself causally, at the tokens' true positions. One forward of the model whose attention
takes that mask reproduces the K/V the engine stores (``tests/test_oracle.py`` checks it against the engine), and
the cells of the frontier are edits of that forward (:class:`OracleStep`):

- ``visible``: which columns each row sees (star; the question in every block's prefix, Spava's view; the previous
  block's last W tokens as extra prefix);
- ``exact``: rows whose output is full causal attention over this layer's K/V (the question's rows in Spava's view);
- ``delta``: Delta attention (arXiv 2505.11254): the rows of each group of ``gamma`` in a block take the exact-minus-
  star difference of the group's first row, whose output is exact;
- ``replace``: tokens whose K/V are dense's at every layer (the oracle's substitution: the bound a mechanism that
  recomputes those tokens could at best reach), both where the block's own rows read them and in what is stored;
- ``probe``: rows (the question) whose attention over the context is summed (and max-pooled) over heads, rows and
  layers, to choose tokens by it.

Every forward runs over the context, the question at its Phase 2 positions (its rows see the whole context: the
view Phase 2 has of star's K/V, for choosing by attention) and the question again at the positions after the anchor
(where the engine's ``anchor_query`` puts it); no context row sees either unless the cell says so, so the context's
K/V are the cell's. Phase 2 is the engine's own (:func:`answer` over a store filled with the cell's K/V): exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface

# --- The engine: every import of it in one place (the engine's modules may move; only these lines follow); the
# frontier's other modules and script take GenerationSettings from here too. --------------------------------------
from star_lightning.attention.star import star_attention_forward
from star_lightning.cache import KVStore
from star_lightning.engine.context import ContextKey, EncodedContext
from star_lightning.engine.forward import num_layers
from star_lightning.engine.request import answer
from star_lightning.engine.settings import GenerationSettings, StarSettings
from star_lightning.parallel.group import SingleHostGroup
from star_lightning.partition import BlockPlan

__all__ = [
    "ORACLE_ATTENTION", "GenerationSettings", "OracleStep", "answer_over", "causal_mask", "kv_deviation",
    "masked_forward", "oracle_attention_forward", "register_oracle_attention", "star_mask",
]  # fmt: skip

ORACLE_ATTENTION = "star_lightning_oracle"


@dataclass
class OracleStep:
    """What one masked forward does at every layer (see the module docstring). Row and column indices run over the
    forward's sequence: the context ``[0, T)`` then the question ``[T, T+q)``."""

    visible: Tensor  # [N, N] bool: row i sees column j
    context: int  # T: the rows whose K/V are captured
    groups: list[tuple[int, int]] | None = None  # row spans attended apart over the columns they see (None: causal)
    exact: Tensor | None = None  # [E] long
    delta_rep: Tensor | None = None  # [N] long: the exact row whose difference row i takes, -1 for none
    replace: Tensor | None = None  # [R] long
    dense_kv: list[tuple[Tensor, Tensor]] | None = None  # per layer [1, Hkv, T, D]: dense's K/V of the context
    probe: Tensor | None = None  # [P] long: the question's rows
    captured: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    probe_sum: Tensor | None = None  # [T]
    probe_max: Tensor | None = None  # [T]


def _expand(tensor: Tensor, groups: int) -> Tensor:
    """K/V heads repeated for grouped-query attention: ``[B, Hkv, N, D] -> [B, Hkv * groups, N, D]``."""
    return tensor if groups == 1 else tensor.repeat_interleave(groups, dim=1)


def oracle_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    sliding_window: int | None = None,
    oracle_step: OracleStep | None = None,
    **kwargs: object,
) -> tuple[Tensor, None]:
    """q ``[1, Hq, N, D]``, k/v ``[1, Hkv, N, D]`` -> ``([1, N, Hq, D], None)``; the engine's star function when the
    call is not an oracle forward (Phase 2 runs through the engine)."""
    if oracle_step is None:
        return star_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            scaling,
            dropout,
            softcap,
            sliding_window,
            **kwargs,  # type: ignore[arg-type]
        )
    if softcap is not None or sliding_window is not None:
        raise RuntimeError("the oracle's masked forward has no soft-capped or sliding-window attention")
    step, layer = oracle_step, module.layer_idx
    assert isinstance(layer, int)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if step.replace is not None and step.replace.numel():
        assert step.dense_kv is not None
        dense_k, dense_v = step.dense_kv[layer]
        key, value = key.clone(), value.clone()
        key[:, :, step.replace] = dense_k[:, :, step.replace].to(key.dtype)
        value[:, :, step.replace] = dense_v[:, :, step.replace].to(value.dtype)
    step.captured.append((key[:, :, : step.context], value[:, :, : step.context]))
    groups = query.shape[1] // key.shape[1]
    k, v = _expand(key, groups), _expand(value, groups)  # [1, Hq, N, D]
    if step.groups is None:  # plain causal attention (dense): the fused kernel
        out = F.scaled_dot_product_attention(query, k, v, is_causal=True, scale=scale)  # [1, Hq, N, D]
    else:  # each span over only the columns it sees (a block: its prefix and itself), not all N
        parts = []
        for start, stop in step.groups:
            rows = step.visible[start:stop]  # [l, N]
            columns = rows.any(dim=0).nonzero().squeeze(1)  # [C]
            parts.append(
                F.scaled_dot_product_attention(
                    query[:, :, start:stop], k[:, :, columns], v[:, :, columns], attn_mask=rows[:, columns], scale=scale
                )  # [1, Hq, l, D]
            )
        out = torch.cat(parts, dim=2)  # [1, Hq, N, D]
    exact_rows = step.exact
    if exact_rows is not None and exact_rows.numel():
        n = query.shape[2]
        causal = torch.arange(n, device=query.device)
        mask = causal.unsqueeze(0) <= exact_rows.unsqueeze(1)  # [E, N]
        exact = F.scaled_dot_product_attention(query[:, :, exact_rows], k, v, attn_mask=mask, scale=scale)
        if step.delta_rep is not None:
            difference = torch.zeros_like(out)
            difference[:, :, exact_rows] = exact - out[:, :, exact_rows]
            rows = (step.delta_rep >= 0).nonzero().squeeze(1)  # [M]
            out = out.clone()
            out[:, :, rows] += difference[:, :, step.delta_rep[rows]]
        else:
            out = out.clone()
            out[:, :, exact_rows] = exact
    if step.probe is not None and step.probe.numel():
        scores = query[:, :, step.probe] @ k.transpose(-1, -2) * scale  # [1, Hq, P, N]
        scores = scores.masked_fill(~step.visible[step.probe], float("-inf"))
        weights = scores.softmax(dim=-1)[0, :, :, : step.context].float()  # [Hq, P, T]
        summed, pooled = weights.sum(dim=(0, 1)), weights.amax(dim=(0, 1))  # [T]
        step.probe_sum = summed if step.probe_sum is None else step.probe_sum + summed
        step.probe_max = pooled if step.probe_max is None else step.probe_max + pooled
    return out.transpose(1, 2).contiguous(), None


def register_oracle_attention(model: nn.Module) -> None:
    """Give ``model`` the oracle's attention (which is star's wherever no oracle step is passed)."""
    AttentionInterface.register(ORACLE_ATTENTION, oracle_attention_forward)
    model.set_attn_implementation(ORACLE_ATTENTION)  # type: ignore[operator]


def masked_forward(model: nn.Module, ids: Tensor, positions: Tensor, step: OracleStep) -> OracleStep:
    """One forward of ``ids`` ``[1, N]`` at ``positions`` ``[1, N]`` under ``step``; the step, with its captures."""
    with torch.inference_mode():
        model(input_ids=ids, position_ids=positions, use_cache=False, logits_to_keep=1, oracle_step=step)
    return step


# --- Masks ----------------------------------------------------------------------------------------------------------


def causal_mask(n: int, device: torch.device) -> Tensor:
    index = torch.arange(n, device=device)
    return index.unsqueeze(0) <= index.unsqueeze(1)  # [N, N]


def star_mask(plan: BlockPlan, query: int, *, prefix_question: str = "", tail: int = 0) -> Tensor:
    """Star's Phase 1 as a mask over the context ``[0, T)``, the question at its Phase 2 positions ``[T, T+q)`` and
    the question again after the anchor ``[T+q, T+2q)``: ``[T+2q, T+2q]``.

    A non-first block sees the anchor, (``tail``) the previous block's last ``tail`` tokens that the anchor does not
    hold, itself causally and (``prefix_question``) the question after the anchor. The question's first copy sees
    the whole context (Phase 2's view; no context row sees it); its second copy sees the anchor and itself
    (``prefix_question="anchor"``: the engine's ``anchor_query``) or the whole context (``"context"``: Spava's
    view, its rows exact).
    """
    context, anchor = plan.context_length, plan.anchor_length
    total = context + 2 * query
    mask = torch.zeros(total, total, dtype=torch.bool)
    for block in plan.blocks:
        rows = slice(block.start, block.end)
        start = block.start if block.index == 0 else min(block.start, max(anchor, block.start - tail))
        mask[rows, start : block.end] = causal_mask(block.end - start, mask.device)[-block.length :]
        if block.index > 0:
            mask[rows, :anchor] = True
            if prefix_question:
                mask[rows, context + query :] = True
    phase2, prefix = slice(context, context + query), slice(context + query, total)
    mask[phase2, :context] = True
    mask[phase2, phase2] = causal_mask(query, mask.device)
    mask[prefix, : context if prefix_question == "context" else anchor] = True
    mask[prefix, prefix] = causal_mask(query, mask.device)
    return mask


# --- Phase 2 through the engine ---------------------------------------------------------------------------------------


def answer_over(
    model: nn.Module, kv: list[tuple[Tensor, Tensor]], query_ids: Tensor, settings: GenerationSettings
) -> list[int]:
    """The engine's Phase 2 (one host, eager decoding) over a context whose per-layer K/V ``[1, Hkv, T, D]`` are
    ``kv``: the query's rows and every generated token attend to them exactly."""
    context = kv[0][0].shape[2]
    store = KVStore(num_layers(model), context + query_ids.shape[1] + settings.max_new_tokens)
    positions = torch.arange(context, device=query_ids.device)  # [T]
    for layer, (keys, values) in enumerate(kv):
        store.append(layer, keys, values, positions)
    key = ContextKey(query_ids.new_zeros(1, context), None, ("oracle", context))  # answered once, never matched
    encoded = EncodedContext(key, context, context, store=store)
    star = StarSettings(attention="star", decode="eager")
    with torch.inference_mode():
        tokens, _ = answer(model, encoded, query_ids, SingleHostGroup(), star, settings)
    return tokens


def kv_deviation(star_kv: list[tuple[Tensor, Tensor]], dense_kv: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Each context token's K/V distance from dense's ``[T]``: per layer the squared difference over heads and
    dims, relative to that layer's mean squared dense K/V norm (so no layer outweighs the others by scale), summed."""
    total = None
    for (ks, vs), (kd, vd) in zip(star_kv, dense_kv, strict=True):
        difference = ((ks - kd).float() ** 2).sum(dim=(0, 1, 3)) + ((vs - vd).float() ** 2).sum(dim=(0, 1, 3))
        norm = (kd.float() ** 2).sum(dim=(0, 1, 3)) + (vd.float() ** 2).sum(dim=(0, 1, 3))  # [T]
        relative = difference / norm.mean().clamp_min(1e-30)
        total = relative if total is None else total + relative
    assert total is not None
    return total
