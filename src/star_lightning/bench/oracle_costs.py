"""What each frontier cell would add to star's Phase 1 at a real scale, from the project's cost model.

Default scale: the Llama-3.1-8B shape in bf16, a 128K context on 4 hosts, blocks of L/8 with anchor = block (the
blocks :func:`~star_lightning.partition.plan_blocks` gives), a 128-token question (the plan's default query). Star's
own Phase 1 per host is :func:`~star_lightning.plan.hosts.phase1_flops_per_host`; a cell's extra work is counted
with :mod:`star_lightning.plan.costs` (``attention_flops``, ``linear_flops``, ``causal_pairs``) as a mechanism
would run it through Phase 2's distributed softmax:

- an exact row of a non-first block (a replaced token recomputed, a Delta row) attends to every earlier context
  token: beyond star's anchor and own block, the tokens from the anchor's end to its block's start; its query goes
  to each earlier host holding some of them, which sends back its partial (output and float32 log-sum-exp) per
  layer. The oracle's choice of rows needs dense's K/V (no mechanism has them): its cost is that of the rows alone;
  a choice by the question's attention adds the question's Phase 1 (Spava's cost).
- Spava's view: the question's rows attend to the whole context at every layer (its queries visit every host, the
  resulting K/V go to every host), and every non-first block's rows see ``q`` more keys.
- a wider local context of ``W`` tokens: every non-first block sees the previous block's last ``W`` tokens that the
  anchor does not hold (none for the second block when anchor = block), whose K/V the previous block's host sends
  when it is another host (its latency, a chain of blocks each waiting for the one before, is not counted).
- a lookback of ``W`` tokens (the engine's ``--model.lookback_tokens``): every non-first block's forward recomputes
  those ``W`` tokens (plan's count: ``W`` more rows a block), nothing sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from star_lightning.bench.oracle_cells import Cell
from star_lightning.partition import BlockPlan, plan_blocks
from star_lightning.plan import costs
from star_lightning.plan.hosts import Layout, assign, phase1_flops_per_host
from star_lightning.plan.shape import ModelShape

PARTIAL_LSE_BYTES = 4  # the log-sum-exp of a partial is float32, one per query head and row


@dataclass(frozen=True)
class Scale:
    shape: ModelShape
    context: int = 131072
    hosts: int = 4
    block_divisor: int = 8
    anchor_divisor: int = 1
    question: int = 128

    @property
    def plan(self) -> BlockPlan:
        block = self.context // self.block_divisor
        return plan_blocks(self.context, block, self.hosts, block // self.anchor_divisor)

    def describe(self) -> str:
        return (
            f"{self.shape.model_type} shape ({self.shape.layers} layers, {self.shape.heads}/{self.shape.kv_heads} "
            f"heads, {self.shape.dtype}), {self.context // 1024}K context on {self.hosts} hosts, blocks of "
            f"L/{self.block_divisor}, anchor block/{self.anchor_divisor}, {self.question}-token question"
        )


def llama_8b_scale() -> Scale:
    from star_lightning.bench.speed import llama_8b_config

    return Scale(ModelShape.from_config(llama_8b_config(), "bfloat16"))


def _owner(plan: BlockPlan) -> dict[int, int]:
    return {block.index: host for host in range(plan.num_hosts) for block in plan.blocks_of(host)}


def _exact_rows(scale: Scale, rows_of: Any) -> tuple[list[float], list[int]]:
    """Extra FLOPs and bytes sent per host when ``rows_of(block)`` rows of each non-first block are exact."""
    plan, shape = scale.plan, scale.shape
    owner = _owner(plan)
    flops = [0.0] * plan.num_hosts
    sent = [0] * plan.num_hosts
    query_bytes = shape.q_width * shape.bytes_per_element * shape.layers
    partial_bytes = (shape.q_width * shape.bytes_per_element + shape.heads * PARTIAL_LSE_BYTES) * shape.layers
    for block in plan.blocks[1:]:
        rows, host = rows_of(block), owner[block.index]
        flops[host] += costs.attention_flops(shape, rows * (block.start - plan.anchor_length))
        earlier = {owner[b.index] for b in plan.blocks[1 : block.index] if b.start >= plan.anchor_length} - {host}
        sent[host] += rows * query_bytes * len(earlier)
        for other in earlier:
            sent[other] += rows * partial_bytes
    return flops, sent


def _question(scale: Scale) -> tuple[list[float], list[int]]:
    """Spava's view: the question's rows exact at every layer (computed on the query host), its K/V to every host,
    and every non-first block's rows seeing it."""
    plan, shape, q = scale.plan, scale.shape, scale.question
    owner = _owner(plan)
    flops = [0.0] * plan.num_hosts
    sent = [0] * plan.num_hosts
    last = plan.query_host
    flops[last] += costs.linear_flops(shape, q) + costs.attention_flops(
        shape, costs.causal_pairs(q, plan.context_length)
    )
    query_bytes = q * shape.q_width * shape.bytes_per_element * shape.layers
    partial_bytes = q * (shape.q_width * shape.bytes_per_element + shape.heads * PARTIAL_LSE_BYTES) * shape.layers
    others = plan.num_hosts - 1
    sent[last] += query_bytes * others + q * shape.kv_bytes_per_token * others
    for host in range(plan.num_hosts - 1):
        sent[host] += partial_bytes
    for block in plan.blocks[1:]:
        flops[owner[block.index]] += costs.attention_flops(shape, block.length * q)
    return flops, sent


def _wider(scale: Scale, tail: int) -> tuple[list[float], list[int]]:
    plan, shape = scale.plan, scale.shape
    owner = _owner(plan)
    flops = [0.0] * plan.num_hosts
    sent = [0] * plan.num_hosts
    for block in plan.blocks[1:]:
        seen = max(0, min(tail, block.start - plan.anchor_length))  # what the anchor does not hold already
        previous = plan.blocks[block.index - 1]
        flops[owner[block.index]] += costs.attention_flops(shape, block.length * seen)
        if seen and owner[previous.index] != owner[block.index]:
            sent[owner[previous.index]] += seen * shape.kv_bytes_per_token
    return flops, sent


def _star_flops(scale: Scale, lookback_tokens: int = 0) -> list[float]:
    """Each host's Phase 1 FLOPs for star at the scale (with the engine's lookback, as the plan counts it)."""
    plan = scale.plan
    layout = Layout(method="star", hosts=scale.hosts, block_size=plan.block_size,
                    anchor_block_size=plan.anchor_length, lookback_tokens=lookback_tokens)  # fmt: skip
    return phase1_flops_per_host(scale.shape, layout, scale.context)


def extra_cost(cell: Cell, scale: Scale) -> dict[str, Any]:
    """The cell's extra Phase 1 FLOPs and bytes sent, on the host where the sum is largest, and the slowest host's
    Phase 1 FLOPs against star's (the time ratio at the cost model's one Phase 1 efficiency)."""
    plan, star = scale.plan, _star_flops(scale)
    zero = ([0.0] * plan.num_hosts, [0] * plan.num_hosts)
    flops, sent = zero
    realizable = True
    if cell.kind == "replace":
        flops, sent = _exact_rows(scale, lambda block: round(block.length * cell.percent / 100))
        realizable = cell.chooser != "oracle"
        if cell.chooser.startswith(("attn", "spava")):
            question = _question(scale)
            flops = [a + b for a, b in zip(flops, question[0], strict=True)]
            sent = [a + b for a, b in zip(sent, question[1], strict=True)]
    elif cell.kind == "delta":
        flops, sent = _exact_rows(scale, lambda block: -(-block.length // cell.gamma))
    elif cell.kind == "spava":
        flops, sent = _question(scale)
    elif cell.kind == "aq":  # the engine's anchor_query, as the plan counts it
        layout = Layout(method="star", hosts=scale.hosts, block_size=plan.block_size,
                        anchor_block_size=plan.anchor_length, anchor_query=True)  # fmt: skip
        query = [
            sum(f.flops(scale.shape) for f in host) for host in assign(layout, scale.context, scale.question).forwards
        ]
        flops = [a - b for a, b in zip(query, star, strict=True)]
        sent = [scale.question * scale.shape.kv_bytes_per_token * (plan.num_hosts - 1)] + [0] * (plan.num_hosts - 1)
    elif cell.kind == "wider":
        flops, sent = _wider(scale, plan.block_size // cell.divisor)
    elif cell.kind == "lookback":  # the engine's option, as the plan counts it
        with_lookback = _star_flops(scale, lookback_tokens=plan.block_size // cell.divisor)
        flops = [a - b for a, b in zip(with_lookback, star, strict=True)]
    if cell.kind == "dense":
        dense = costs.forward_flops(scale.shape, scale.context)
        return {"extra_flops": dense - max(star), "extra_bytes": 0, "extra_phase1": dense / max(star) - 1,
                "realizable": True}  # fmt: skip
    with_extra = [s + f for s, f in zip(star, flops, strict=True)]
    return {
        "extra_flops": max(flops),
        "extra_bytes": max(sent),
        "extra_phase1": max(with_extra) / max(star) - 1,
        "realizable": realizable,
    }
