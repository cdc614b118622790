"""JSONL files: atomic writes (a crash never leaves half a file) and reads that name the bad line."""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from collections.abc import Iterable
from typing import Any

from star_lightning.errors import ConfigurationError


def write_jsonl_atomic(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> int:
    """Write ``rows`` one JSON object a line to ``path`` via a temp file in the same folder, fsync and rename.

    Returns the number of rows written. Readers see either the old file or the complete new one.
    """
    target = pathlib.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    return count


def read_jsonl(path: str | os.PathLike[str], *, allow_truncated_last_line: bool = True) -> list[dict[str, Any]]:
    """Read a JSONL file into a list of dicts; blank lines are skipped.

    A last line that is not valid JSON (a run killed mid-write) is dropped when ``allow_truncated_last_line``;
    any other bad line raises a ``ConfigurationError`` naming the file and line number.
    """
    source = pathlib.Path(path)
    if not source.is_file():
        raise ConfigurationError(f"JSONL file not found: {source}. Check the path.")
    with source.open(encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    numbered = [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]
    rows: list[dict[str, Any]] = []
    for position, (number, line) in enumerate(numbered):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            is_last = position == len(numbered) - 1
            if is_last and allow_truncated_last_line and number == len(lines):  # no final newline: cut short
                break
            raise ConfigurationError(f"{source}, line {number}: not valid JSON ({error.msg}).") from error
        if not isinstance(row, dict):
            raise ConfigurationError(f"{source}, line {number}: expected a JSON object, got {type(row).__name__}.")
        rows.append(row)
    return rows
