"""The start-up marks (star_lightning.startup) as durations: consecutive marks, a missing one merged, bad names."""

from __future__ import annotations

import time

import pytest

from star_lightning import startup


def test_marks_become_the_durations_between_them(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([100.0, 103.5, 104.0, 110.0, 110.25])
    monkeypatch.setattr(time, "time", lambda: next(clock))
    monkeypatch.setattr(startup, "process_started_at", lambda: 99.5)
    startup.reset()
    for name in ("entry", "imported", "parsed", "loaded", "first_request"):  # no "checked": merged into the next
        startup.mark(name)
    startup.mark("entry")  # a second mark of a name keeps the first
    assert startup.scalars() == {
        "startup/imports_s": 3.5,
        "startup/parse_s": 0.5,
        "startup/model_load_s": 6.0,
        "startup/to_first_request_s": 0.25,
        "startup/interpreter_s": 0.5,
        "startup/total_s": 10.75,
    }
    startup.reset()
    assert startup.scalars() == {}
    with pytest.raises(ValueError, match="unknown start-up mark 'warmup'"):
        startup.mark("warmup")


def test_the_process_start_is_before_now() -> None:
    started = startup.process_started_at()
    assert started is None or 0 < time.time() - started < 7 * 24 * 3600
