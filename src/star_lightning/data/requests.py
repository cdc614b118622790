"""Reading prediction requests from JSONL, with errors that name the line and the field.

One request a line: ``input_context``, ``input_query`` (required, non-empty strings), optional ``index`` (an
integer; default: the line's 0-based number among requests), optional ``max_new_tokens`` (this request's
generation budget, capped by ``--model.max_new_tokens``), optional ``output`` / ``outputs`` references and any
other fields, which are copied into the prediction record. The reference implementation's prepared files read as
they are.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from star_lightning.errors import ConfigurationError

REQUIRED_FIELDS = ("input_context", "input_query")


def parse_request(line: str, line_number: int, path: Path, default_index: int) -> dict[str, Any]:
    where = f"{path}, line {line_number}"
    try:
        request = json.loads(line)
    except json.JSONDecodeError as error:
        raise ConfigurationError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(request, dict):
        raise ConfigurationError(f"{where}: expected a JSON object with input_context and input_query")
    for field in REQUIRED_FIELDS:
        if field not in request:
            raise ConfigurationError(
                f"{where}: missing the field {field!r} (every request needs {' and '.join(REQUIRED_FIELDS)})"
            )
        if not isinstance(request[field], str):
            raise ConfigurationError(f"{where}: {field!r} must be a string, got {type(request[field]).__name__}")
    if not request["input_context"].strip():
        raise ConfigurationError(f"{where}: 'input_context' is empty; Star Attention needs a context to encode")
    if not request["input_query"].strip():
        raise ConfigurationError(f"{where}: 'input_query' is empty; give the question to answer")
    index = request.setdefault("index", default_index)
    if isinstance(index, bool) or not isinstance(index, int):
        raise ConfigurationError(f"{where}: 'index' must be an integer, got {index!r}")
    budget = request.get("max_new_tokens")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0):
        raise ConfigurationError(
            f"{where}: 'max_new_tokens' must be a positive integer (this request's generation budget), got {budget!r}"
        )
    return request


def read_requests(path: str | Path) -> list[dict[str, Any]]:
    """All requests of a JSONL file, in file order; blank lines are skipped; indices must be unique."""
    path = Path(path)
    if not path.is_file():
        raise ConfigurationError(
            f"input file {str(path)!r} does not exist; set --data.path to a JSONL file of requests"
        )
    requests: list[dict[str, Any]] = []
    seen: dict[int, int] = {}
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            request = parse_request(line, line_number, path, default_index=len(requests))
            index = request["index"]
            if index in seen:
                raise ConfigurationError(
                    f"{path}, line {line_number}: index {index} was already used on line {seen[index]}; indices must "
                    "be unique (they identify requests when a job resumes)"
                )
            seen[index] = line_number
            requests.append(request)
    if not requests:
        raise ConfigurationError(f"input file {str(path)!r} holds no requests")
    return requests
