"""The Star configurations ``tune`` tries, as ``--model.*`` options, and the rule that picks one.

A candidate is named like the fidelity table's cells: ``star_L/8`` (blocks of 1/8 of the longest context, anchor =
block), ``star_L/8_a/4`` (anchor = block/4), ``aq_L/8`` (the question after the anchor), ``aq+pt_L/8`` (and
block/32 passing tokens per host and layer, the job's hosts played in one process). Block fractions are of the job's
hosts: ``L/H`` (one block a host) and ``L/2H``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from star_lightning.errors import ConfigurationError

PASSING_FRACTION = 32
_NAME = re.compile(r"^(star|aq|aq\+pt)_L/(\d+)(?:_a/(\d+))?$")


@dataclass(frozen=True)
class Candidate:
    name: str
    divisor: int  # block = longest context / divisor
    anchor_divisor: int = 1  # anchor = block / anchor_divisor
    anchor_query: bool = False
    passing: bool = False

    def model_options(self, context_tokens: int, hosts: int) -> dict[str, Any]:
        """``--model.*`` values for requests of up to ``context_tokens`` on ``hosts`` hosts."""
        block = max(1, -(-context_tokens // self.divisor))
        options: dict[str, Any] = {"attention": "star", "block_size": block,
                                   "anchor_block_size": max(1, block // self.anchor_divisor)}  # fmt: skip
        if self.anchor_query:
            options["anchor_query"] = True
        if self.passing:
            options["passing_tokens"] = max(1, block // PASSING_FRACTION)
        return options


def parse_candidate(name: str) -> Candidate:
    match = _NAME.match(name)
    if match is None or int(match.group(2)) < 1 or (match.group(3) is not None and int(match.group(3)) < 1):
        raise ConfigurationError(
            f"--candidates {name}: not a candidate name; write KIND_L/D[_a/A] with KIND star, aq or aq+pt, D the "
            "block divisor of the longest context and A the anchor divisor of the block (e.g. star_L/8, aq_L/8_a/4)"
        )
    kind, divisor, anchor = match.group(1), int(match.group(2)), int(match.group(3) or 1)
    return Candidate(name, divisor, anchor, anchor_query=kind != "star", passing=kind == "aq+pt")


def default_candidates(hosts: int) -> list[str]:
    """One block a host and two, anchor = block or a quarter of it, the question in the anchor, passing tokens."""
    one, two = f"L/{hosts}", f"L/{2 * hosts}"
    return [f"star_{one}", f"aq_{one}", f"star_{two}", f"star_{two}_a/4", f"aq_{two}", f"aq+pt_{two}"]


def pick(table: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The candidate with the lowest predicted TTFT whose share of dense's LOWER 95% bound is >= ``target``
    (a fraction); ties go to the earlier (cheaper) candidate. None when none qualifies."""
    qualified = [row for row in table if row.get("qualifies")]
    if not qualified:
        return None
    return min(qualified, key=lambda row: (row["predicted_ttft_s"] is None, row["predicted_ttft_s"] or 0.0))
