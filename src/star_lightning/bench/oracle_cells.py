"""The frontier's cells: their names, the masked forward each one runs (:mod:`.oracle`) and one request through all.

Names (``--cells``): ``dense``; ``star``; ``aq`` (the question after the anchor in every block's prefix, its rows
seeing the anchor and themselves: the engine's ``anchor_query``); ``spava`` (the same question, its rows exact:
they see the whole context at every layer, Spava's view); ``{chooser}_r{P}``: dense's K/V for ``P``% of each
non-first block's tokens, the chooser one of ``oracle`` (largest K/V deviation from dense), ``attn_sum`` /
``attn_max`` (the question's attention over star's context, summed / max-pooled over heads and rows, summed over
layers), ``random``, ``first`` (each block's first tokens, EPIC), ``spava_attn_max`` (Spava's cell, its question's
max-pooled attention choosing); ``delta_g{N}``: Delta rows every N-th row of each non-first block; ``wider_b{D}``:
each block's rows also see the previous block's last block/D tokens, with the K/V that block stored (a mask: a bound,
since a host would need them from the block before, which in turn needs its own: a chain across hosts);
``lookback_b{D}``: the engine's ``--model.lookback_tokens block/D``, each block's forward recomputing those tokens
after the anchor (no communication; its K/V from the engine's own Phase 1). The first block (the anchor itself) is
exact in every cell.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from star_lightning.bench.oracle import (
    GenerationSettings,
    OracleStep,
    answer_over,
    causal_mask,
    kv_deviation,
    masked_forward,
    star_mask,
)
from star_lightning.cache import KVStore
from star_lightning.engine.forward import num_layers
from star_lightning.engine.prefill import prefill_star
from star_lightning.parallel.group import SingleHostGroup
from star_lightning.partition import BlockPlan, plan_blocks

KV = list[tuple[Tensor, Tensor]]
CHOOSERS = ("oracle", "attn_sum", "attn_max", "random", "first", "spava_attn_max")
DEFAULT_CELLS = (
    "dense", "star", "aq", "spava",
    *(f"{c}_r{r}" for c in CHOOSERS for r in (5, 10, 20, 50)),
    *(f"delta_g{g}" for g in (4, 8, 16, 32, 64)),
    *(f"wider_b{d}" for d in (8, 4, 2)),
    *(f"lookback_b{d}" for d in (8, 4, 2)),
)  # fmt: skip
_PATTERN = re.compile(
    r"^(?:(dense|star|spava|aq)|(" + "|".join(CHOOSERS) + r")_r(\d+)|delta_g(\d+)|(wider|lookback)_b(\d+))$"
)


@dataclass(frozen=True)
class Cell:
    name: str
    kind: str  # dense, star, spava, replace, delta, wider, lookback
    chooser: str = ""
    percent: int = 0
    gamma: int = 0
    divisor: int = 0

    @property
    def base(self) -> str:
        """The forward whose K/V, deviation or attention this cell reads (``spava`` for Spava's chooser)."""
        return "spava" if self.chooser.startswith("spava") else "star"


def parse_cell(name: str) -> Cell:
    """A cell from its name; ValueError naming the forms when it is none of them."""
    match = _PATTERN.match(name)
    if match is None:
        raise ValueError(
            f"unknown cell {name!r}; cells are dense, star, aq, spava, CHOOSER_rP ({', '.join(CHOOSERS)}; P in 0-100), "
            "delta_gN (N >= 1), wider_bD or lookback_bD (D >= 1)"
        )
    plain, chooser, percent, gamma, local, divisor = match.groups()
    if plain:
        return Cell(name, plain)
    if chooser:
        if not 0 <= int(percent) <= 100:
            raise ValueError(f"cell {name!r}: the share replaced is a percent, 0-100")
        return Cell(name, "replace", chooser=chooser, percent=int(percent))
    if gamma:
        if int(gamma) < 1:
            raise ValueError(f"cell {name!r}: gamma must be at least 1")
        return Cell(name, "delta", gamma=int(gamma))
    if int(divisor) < 1:
        raise ValueError(f"cell {name!r}: the divisor of the block must be at least 1")
    return Cell(name, local, divisor=int(divisor))


def choose(plan: BlockPlan, scores: Tensor | None, percent: int, rule: str, seed: str) -> Tensor:
    """``percent``% of each non-first block's tokens (rounded), by ``rule``: the highest ``scores``, the block's
    first tokens, or at random (seeded by ``seed``: the same request and cell choose the same tokens on a rerun)."""
    chosen = []
    for block in plan.blocks[1:]:
        count = round(block.length * percent / 100)
        if count == 0:
            continue
        if rule == "first":
            local = torch.arange(count)
        elif rule == "random":
            generator = torch.Generator().manual_seed(int(hashlib.sha256(seed.encode()).hexdigest()[:8], 16))
            local = torch.randperm(block.length, generator=generator)[:count]
        else:
            assert scores is not None
            local = torch.topk(scores[block.start : block.end].double().cpu(), count).indices
        chosen.append(local + block.start)
    return torch.cat(chosen).sort().values if chosen else torch.zeros(0, dtype=torch.long)


def delta_rows(plan: BlockPlan, gamma: int, total: int) -> tuple[Tensor, Tensor]:
    """Delta attention's exact rows (each non-first block's rows ``0, gamma, 2 gamma, ...``) and, for every row of
    those blocks, the exact row of its group (``-1`` elsewhere)."""
    rep = torch.full((total,), -1, dtype=torch.long)
    for block in plan.blocks[1:]:
        offsets = torch.arange(block.length)
        rep[block.start : block.end] = block.start + offsets // gamma * gamma
    exact = torch.unique(rep[rep >= 0])
    return exact, rep


@dataclass
class Request:
    """One request, tokenized: context ``[1, T]``, question ``[1, q]`` (the rows of Phase 1's question) and query
    ``[1, Lq]`` (Phase 2's)."""

    key: str
    context: Tensor
    question: Tensor
    query: Tensor
    settings: GenerationSettings


def run_request(model: nn.Module, request: Request, plan: BlockPlan, cells: list[Cell]) -> dict[str, list[int]]:
    """Every cell's answer tokens for one request: the engine's Phase 2 over each cell's K/V."""
    return {name: answer_over(model, kv, request.query, request.settings) for name, kv in encode_cells(
        model, request, plan, cells)}  # fmt: skip


def encode_cells(model: nn.Module, request: Request, plan: BlockPlan, cells: list[Cell]) -> Iterator[tuple[str, KV]]:
    """Each cell's Phase 1 K/V of one request, per layer ``[1, Hkv, T, D]`` (dense and star's forwards are shared by
    the cells built on them)."""
    device = request.context.device
    context, q, anchor = request.context.shape[1], request.question.shape[1], plan.anchor_length
    ids = torch.cat([request.context, request.question, request.question], dim=1)  # [1, T + 2q]
    positions = torch.cat([torch.arange(context + q), torch.arange(anchor, anchor + q)]).unsqueeze(0)  # [1, T + 2q]
    total = ids.shape[1]
    groups = [(block.start, block.end) for block in plan.blocks] + [(context, context + q), (context + q, total)]

    def run(visible: Tensor | None, **kwargs: object) -> OracleStep:
        """``visible`` None: plain causal attention over the sequence (dense; the question's copies see it all)."""
        mask = causal_mask(total, device) if visible is None else visible.to(device)
        step = OracleStep(visible=mask, context=context, groups=None if visible is None else groups, **kwargs)  # type: ignore[arg-type]
        return masked_forward(model, ids, positions.to(device), step)

    phase2_rows = torch.arange(context, context + q, device=device)
    prefix_rows = torch.arange(context + q, total, device=device)
    needs_dense = any(c.kind in ("dense", "replace") for c in cells)
    dense = run(None) if needs_dense else None
    star_visible = star_mask(plan, q)
    spava_visible = star_mask(plan, q, prefix_question="context")
    bases: dict[str, OracleStep] = {}
    if any(c.kind in ("star", "replace") and c.base == "star" for c in cells):
        bases["star"] = run(star_visible, probe=phase2_rows)
    if any(c.kind == "spava" or (c.base == "spava" and c.kind == "replace") for c in cells):
        bases["spava"] = run(spava_visible, probe=prefix_rows)
    for cell in cells:
        if cell.kind == "dense":
            assert dense is not None
            kv = dense.captured
        elif cell.kind in ("star", "spava"):
            kv = bases[cell.kind].captured
        elif cell.kind == "aq":
            kv = run(star_mask(plan, q, prefix_question="anchor")).captured
        elif cell.kind == "replace":
            assert dense is not None
            base = bases[cell.base]
            rule = cell.chooser.removeprefix("spava_")
            scores = None
            if rule == "oracle":
                scores = kv_deviation(base.captured, dense.captured)
            elif rule.startswith("attn"):
                scores = base.probe_sum if rule == "attn_sum" else base.probe_max
            replaced = choose(plan, scores, cell.percent, rule, f"{request.key}/{cell.name}").to(device)
            visible = spava_visible if cell.base == "spava" else star_visible
            kv = run(visible, replace=replaced, dense_kv=dense.captured).captured
        elif cell.kind == "delta":
            exact, rep = delta_rows(plan, cell.gamma, total)
            kv = run(star_visible, exact=exact.to(device), delta_rep=rep.to(device)).captured
        elif cell.kind == "lookback":
            kv = engine_lookback_kv(model, request.context, plan, plan.block_size // cell.divisor)
        else:
            kv = run(star_mask(plan, q, tail=plan.block_size // cell.divisor)).captured
        yield cell.name, kv


def engine_lookback_kv(model: nn.Module, context: Tensor, plan: BlockPlan, lookback: int) -> KV:
    """The engine's star Phase 1 with ``lookback`` tokens (:func:`star_lightning.engine.prefill.prefill_star`) on one
    host holding every block of ``plan`` (the same K/V as any hosts: a lookback needs no other host's), per layer."""
    one_host = plan_blocks(plan.context_length, plan.block_size, 1, plan.anchor_length, plan.anchor_length > 0)
    store = KVStore(num_layers(model), plan.context_length)
    with torch.inference_mode():
        prefill_star(model, context, one_host, SingleHostGroup(), store, lookback=lookback)
    return [store.view(layer) for layer in range(store.num_layers)]
