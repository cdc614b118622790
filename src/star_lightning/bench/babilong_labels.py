"""BABILong's answer labels, apart from the metrics so that ``generate`` (and its ``--help``) need no torch."""

from __future__ import annotations

# Verbatim from booydar/babilong babilong/metrics.py TASK_LABELS (qa1-qa5): the answer vocabulary of each task.
BABILONG_LABELS: dict[str, tuple[str, ...]] = {
    "qa1": ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office"),
    "qa2": ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office"),
    "qa3": ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office"),
    "qa4": ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office"),
    "qa5": ("Bill", "Fred", "Jeff", "Mary", "apple", "football", "milk"),
}
