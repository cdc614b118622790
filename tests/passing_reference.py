"""A float64 reference for Star Attention's Phase 1 with the query in the anchor and passing tokens, written plainly.

One forward of the model over the whole context (and, with the query in the anchor, the query's tokens after it),
through an attention function that gives every row exactly the keys the method says it sees, by an explicit mask:

- a row of the first block: the first block's earlier rows;
- a row of the anchor prefix's query: the anchor and the query's earlier rows;
- a row of block ``b >= 1`` on host ``h``: the anchor, the prefix's query, the passing tokens chosen from every block
  of the hosts ``h' < h`` encoded in the same round as ``b`` or earlier, and ``b``'s earlier rows;
- on a sliding-window layer, only keys within the window by true positions.

The passing tokens of a block are chosen at each layer by the rule of ``star_lightning.attention.passing``, restated
here with loops over candidates: the selection queries' softmax over the prefix keys and the block's candidate keys
(the first block without the anchor), summed over queries and heads (per KV head, or shared), max-pooled over
neighbouring positions, the best (earlier position first on ties). Nothing of star_lightning's attention is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import AttentionInterface, PreTrainedModel

from star_lightning.partition import BlockPlan

NAME = "passing_reference"


@dataclass
class ReferenceSpec:
    plan: BlockPlan
    query_length: int  # query tokens in the prefix (0 without anchor_query)
    query_start: int  # their first position
    tokens: int
    per_head: bool
    pool_kernel: int
    selection_window: int = 32
    keys: dict[int, Tensor] = field(default_factory=dict)  # layer -> [1, Hkv, S, D] as the layer saw them
    values: dict[int, Tensor] = field(default_factory=dict)
    chosen: dict[tuple[int, int], list[list[int]]] = field(default_factory=dict)  # (layer, block) -> per head rows

    @property
    def context(self) -> int:
        return self.plan.context_length

    def positions(self) -> list[int]:
        return list(range(self.context)) + [self.query_start + i for i in range(self.query_length)]

    def host_of(self, block: int) -> int:
        return next(h for h in range(self.plan.num_hosts) if any(b.index == block for b in self.plan.blocks_of(h)))

    def round_of(self, block: int) -> int:
        host = self.host_of(block)
        return [b.index for b in self.plan.blocks_of(host)].index(block)


_SPEC: list[ReferenceSpec] = []


def _choose(spec: ReferenceSpec, query: Tensor, key: Tensor, scale: float, softcap: float | None) -> dict:
    """``{block: [rows chosen, per KV head]}`` for one layer."""
    a, context, q_len = spec.plan.anchor_length, spec.context, spec.query_length
    groups = query.shape[1] // key.shape[1]
    selectors = list(range(context, context + q_len)) if q_len else list(range(a - min(spec.selection_window, a), a))
    prefix = list(range(a)) + list(range(context, context + q_len))
    chosen = {}
    for block in spec.plan.blocks:
        start = a if block.index == 0 else block.start
        candidates = list(range(start, block.end))
        score = [[0.0] * len(candidates) for _ in range(key.shape[1])]
        for head in range(query.shape[1]):
            kv = head // groups
            for row in selectors:
                logits = []
                for col in prefix + candidates:
                    value = float(query[0, head, row] @ key[0, kv, col]) * scale
                    logits.append(math.tanh(value / softcap) * softcap if softcap is not None else value)
                top = max(logits)
                total = top + math.log(sum(math.exp(x - top) for x in logits))
                for i in range(len(candidates)):
                    score[kv][i] += math.exp(logits[len(prefix) + i] - total)
        if not spec.per_head:
            summed = [sum(column) for column in zip(*score, strict=True)]
            score = [summed] * key.shape[1]
        half = spec.pool_kernel // 2
        rows = []
        for head_score in score:
            pooled = [max(head_score[max(0, i - half) : i + half + 1]) for i in range(len(candidates))]
            best = sorted(range(len(candidates)), key=lambda i: (-pooled[i], i))[: spec.tokens]
            rows.append(sorted(candidates[i] for i in best))
        chosen[block.index] = rows
    return chosen


def reference_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, sliding_window=None, **kwargs
):
    spec = _SPEC[-1]
    layer = module.layer_idx
    spec.keys[layer], spec.values[layer] = key.clone(), value.clone()
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    plan, context, a = spec.plan, spec.context, spec.plan.anchor_length
    positions = spec.positions()
    size = len(positions)
    chosen = _choose(spec, query, key, scale, softcap) if spec.tokens and plan.num_hosts > 1 else {}
    for block, rows in chosen.items():
        spec.chosen[(layer, block)] = rows
    kv_heads, groups = key.shape[1], query.shape[1] // key.shape[1]
    visible = torch.zeros(kv_heads, size, size, dtype=torch.bool)
    prefix = list(range(a)) + list(range(context, size))
    for block in plan.blocks:
        for row in range(block.start, block.end):
            visible[:, row, block.start : row + 1] = True
            if block.index == 0:
                continue
            visible[:, row, prefix] = True
            host, round_ = spec.host_of(block.index), spec.round_of(block.index)
            for earlier, rows in chosen.items():
                if spec.host_of(earlier) < host and spec.round_of(earlier) <= round_:
                    for kv in range(kv_heads):
                        visible[kv, row, rows[kv]] = True
    for row in range(context, size):  # the prefix's query: the anchor and the query before it
        visible[:, row, list(range(a))] = True
        visible[:, row, context : row + 1] = True
    if sliding_window is not None and max(positions) >= sliding_window:
        where = torch.tensor(positions)
        inside = (where[None, :] <= where[:, None]) & (where[None, :] > where[:, None] - sliding_window)
        visible &= inside
    scores = torch.matmul(query, key.repeat_interleave(groups, dim=1).transpose(-1, -2)) * scale  # [1, Hq, S, S]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~visible.repeat_interleave(groups, dim=0)[None], float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), value.repeat_interleave(groups, dim=1))  # [1, Hq, S, D]
    return out.transpose(1, 2).contiguous(), None


def reference_phase1(
    model: PreTrainedModel, context: Tensor, query: Tensor | None, spec: ReferenceSpec
) -> ReferenceSpec:
    """Run the reference forward; ``spec.keys/values[layer]`` then hold every row's K/V of that layer."""
    AttentionInterface.register(NAME, reference_attention)
    previous = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    ids = context if query is None else torch.cat([context, query], dim=1)
    _SPEC.append(spec)
    try:
        with torch.no_grad():
            model(input_ids=ids, position_ids=torch.tensor([spec.positions()]), use_cache=False)
    finally:
        _SPEC.pop()
        model.set_attn_implementation(previous)
    return spec
