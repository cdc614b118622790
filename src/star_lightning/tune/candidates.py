"""The Star configurations ``tune`` tries, as ``--model.*`` options, and the rule that picks one.

A candidate is named like the fidelity table's cells: ``star_L/8`` (blocks of 1/8 of the longest context, anchor =
block), ``star_L/8_a/4`` (anchor = block/4), ``star_L/8_w/4`` (each block after the anchor and the block/4 context
tokens before it: ``--model.lookback_tokens``, the frontier's wider local context), ``aq_L/8`` (the question after
the anchor), ``aq+pt_L/8`` (and block/32 passing tokens per host and layer, the job's hosts played in one process).
Block fractions are of the job's hosts: ``L/H`` (one block a host) and ``L/2H``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from star_lightning.errors import ConfigurationError

PASSING_FRACTION = 32
_NAME = re.compile(r"^(star|aq|aq\+pt)_L/(\d+)(?:_a/(\d+))?(?:_w/(\d+))?$")


@dataclass(frozen=True)
class Candidate:
    name: str
    divisor: int  # block = longest context / divisor
    anchor_divisor: int = 1  # anchor = block / anchor_divisor
    anchor_query: bool = False
    passing: bool = False
    lookback_divisor: int = 0  # lookback = block / lookback_divisor; 0: none

    def model_options(self, context_tokens: int, hosts: int) -> dict[str, Any]:
        """``--model.*`` values for requests of up to ``context_tokens`` on ``hosts`` hosts."""
        block = max(1, -(-context_tokens // self.divisor))
        options: dict[str, Any] = {"attention": "star", "block_size": block,
                                   "anchor_block_size": max(1, block // self.anchor_divisor)}  # fmt: skip
        if self.anchor_query:
            options["anchor_query"] = True
        if self.passing:
            options["passing_tokens"] = max(1, block // PASSING_FRACTION)
        if self.lookback_divisor:
            options["lookback_tokens"] = max(1, block // self.lookback_divisor)
        return options


def parse_candidate(name: str) -> Candidate:
    match = _NAME.match(name)
    numbers = [int(group) for group in match.groups()[1:] if group is not None] if match is not None else []
    if match is None or min(numbers) < 1 or (match.group(1) == "aq+pt" and match.group(4) is not None):
        raise ConfigurationError(
            f"--candidates {name}: not a candidate name; write KIND_L/D[_a/A][_w/W] with KIND star, aq or aq+pt, D "
            "the block divisor of the longest context, A the anchor divisor of the block and W the lookback divisor "
            "of the block (not with aq+pt: passing tokens and a lookback are not combined; e.g. star_L/8, "
            "aq_L/8_a/4, star_L/8_w/4)"
        )
    kind, divisor, anchor = match.group(1), int(match.group(2)), int(match.group(3) or 1)
    lookback = int(match.group(4) or 0)
    return Candidate(name, divisor, anchor, anchor_query=kind != "star", passing=kind == "aq+pt",
                     lookback_divisor=lookback)  # fmt: skip


def default_candidates(hosts: int) -> list[str]:
    """One block a host and two, anchor = block or a quarter of it, a lookback of a quarter block (the frontier's
    cheap cell), the question in the anchor, passing tokens."""
    one, two = f"L/{hosts}", f"L/{2 * hosts}"
    return [f"star_{one}", f"aq_{one}", f"star_{two}", f"star_{two}_a/4", f"star_{two}_w/4", f"aq_{two}",
            f"aq+pt_{two}"]  # fmt: skip


def pick(table: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The candidate with the lowest predicted TTFT whose share of dense's LOWER 95% bound is >= ``target``
    (a fraction); ties go to the earlier (cheaper) candidate. None when none qualifies."""
    qualified = [row for row in table if row.get("qualifies")]
    if not qualified:
        return None
    return min(qualified, key=lambda row: (row["predicted_ttft_s"] is None, row["predicted_ttft_s"] or 0.0))


def qualifies(row: dict[str, Any], target: float) -> bool:
    """Whether a table row meets ``target`` (a fraction): its plan fits and its share of dense's LOWER 95% bound
    (in percent) is at least the target."""
    share = row.get("share_of_dense")
    return bool(row.get("fits")) and share is not None and share["low"] / 100.0 >= target


def nearest_target(table: list[dict[str, Any]]) -> tuple[float, dict[str, Any]] | None:
    """Where no candidate qualifies: the largest target in whole percent that some fitting candidate's lower bound
    meets, and the candidate :func:`pick` takes at it; None when no fitting candidate's lower bound reaches 1%."""
    lows = [row["share_of_dense"]["low"] for row in table if row.get("fits") and row.get("share_of_dense")]
    if not lows or max(lows) < 1.0:
        return None
    target = math.floor(max(lows)) / 100.0
    chosen = pick([{**row, "qualifies": qualifies(row, target)} for row in table], target)
    assert chosen is not None  # the row with the highest lower bound qualifies
    return target, chosen
