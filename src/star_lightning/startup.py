"""Where a process's start-up goes: marks taken as ``predict`` starts, logged once as ``startup/*`` scalars.

A user who waits 15 s before the first request wants to know for what. The marks, in order (each the first time it
is reached in this process): ``entry`` (the command line's entry point), ``imported`` (the command's modules
imported: torch, Lightning, transformers), ``parsed`` (options parsed, classes built), ``checked`` (the checks
before any weights: requests read and counted), ``loaded`` (weights and tokenizer on the device), ``first_request``
(the first request handed to ``predict_step``). :func:`scalars` turns them into durations, with ``interpreter_s``
(the process's own start to ``entry``: Python and the console script) where the process's start time is known
(Linux's ``/proc``). The phase profiler logs them with the first request (``--trainer.logger`` on).
"""

from __future__ import annotations

import itertools
import os
import time

MARKS = ("entry", "imported", "parsed", "checked", "loaded", "first_request")
_taken: dict[str, float] = {}


def mark(name: str) -> None:
    """Note that ``name`` (one of :data:`MARKS`) is reached now; a later mark of the same name is ignored."""
    if name not in MARKS:
        raise ValueError(f"unknown start-up mark {name!r}; known: {', '.join(MARKS)}")
    if name not in _taken:
        _taken[name] = time.time()


def reset() -> None:
    """Forget the marks (a second command run in the same process, as the tests do)."""
    _taken.clear()


def process_started_at() -> float | None:
    """This process's start, in seconds since the epoch (Linux: ``/proc/self/stat``'s start time after boot)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as stat_file:
            fields = stat_file.read().rsplit(")", 1)[1].split()
        with open("/proc/stat", encoding="ascii") as boot_file:
            boot = next(int(line.split()[1]) for line in boot_file if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: start time in clock ticks
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def scalars() -> dict[str, float]:
    """``startup/<step>_s`` for every step between two consecutive marks taken (a missing mark merges its step into
    the next), ``startup/interpreter_s`` where the process start is known, and ``startup/total_s`` (process start,
    or ``entry``, to the last mark)."""
    taken = [(name, _taken[name]) for name in MARKS if name in _taken]
    if not taken:
        return {}
    names = {"imported": "imports", "parsed": "parse", "checked": "checks", "loaded": "model_load",
             "first_request": "to_first_request"}  # fmt: skip
    out: dict[str, float] = {}
    for (_, before), (name, at) in itertools.pairwise(taken):
        out[f"startup/{names[name]}_s"] = at - before
    started = process_started_at()
    first = taken[0][1]
    if started is not None and started <= first:
        out["startup/interpreter_s"] = first - started
        first = started
    out["startup/total_s"] = taken[-1][1] - first
    return out
