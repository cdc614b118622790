"""The one registry of benchmark tasks: which benchmark a task belongs to, its metric, the published order.

``generate``, ``score`` and ``table`` read it; a new task is added where it is defined (RULER's task specs, or
BABILong's answer labels) and appears here, in their order.
"""

from __future__ import annotations

from typing import Literal

from star_lightning.bench.babilong_labels import BABILONG_LABELS
from star_lightning.bench.ruler.tasks import TASKS as RULER_SPECS

Benchmark = Literal["ruler", "babilong"]
MetricName = Literal["match_all", "match_part", "babilong"]

RULER_TASKS: tuple[str, ...] = tuple(RULER_SPECS)
BABILONG_TASKS: tuple[str, ...] = tuple(BABILONG_LABELS)
TASK_ORDER: tuple[str, ...] = (*RULER_TASKS, *BABILONG_TASKS)
METRIC_BY_TASK: dict[str, MetricName] = {
    **{task: spec.metric for task, spec in RULER_SPECS.items()},
    **dict.fromkeys(BABILONG_TASKS, "babilong"),
}


def tasks_of(benchmark: Benchmark) -> tuple[str, ...]:
    return RULER_TASKS if benchmark == "ruler" else BABILONG_TASKS
