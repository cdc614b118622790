"""Requests in, predictions out: the one owner of star_lightning's JSONL files.

Every JSONL file is read line by line through :func:`read_records`, whose errors name the file and the line (bad
JSON, a non-object, bytes that are not UTF-8; a leading byte-order mark is read as UTF-8's). On top of it:

- requests: :func:`read_requests` validates each line (``input_context``, ``input_query``, optional ``index``,
  ``max_new_tokens``, references and any other fields, which are copied into the prediction; every string must be
  text that UTF-8 can hold, and ``pred`` is the prediction's own field) in one place, :func:`validate_request`.
  Requests may share a context without repeating it: a line with ``context_id`` and ``input_context`` defines the
  context, later lines give only ``context_id`` (contexts may also come from a separate file, one
  ``{"context_id", "input_context"}`` a line);
- predictions: :func:`append_prediction` appends one record in one ``write`` under an exclusive ``flock`` and
  fsyncs it, :func:`repair_torn_tail` cuts a line a killed job left half-written (:func:`torn_last_line` finds
  it), :func:`completed_indices` answers "what is done" (the indices of the complete lines), and
  :func:`read_predictions` reads a finished file for scoring, refusing one that holds a request twice (two runs
  mixed);
- whole files written at once (``generate``, tables, the run record): :func:`write_jsonl_atomic` and
  :func:`write_json_atomic` (temp file, fsync, rename);
- :func:`requests_fingerprint` identifies the input files' bytes in the run record.

The reference implementation's prepared RULER files read as they are.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from star_lightning.errors import ConfigurationError

REQUIRED_FIELDS = ("input_context", "input_query")
# The key under which a data loader's worker hands a request's token ids to predict_step (star_lightning.tokens).
TOKENS_FIELD = "_star_lightning_tokens"
# Fields of a request that are inputs, not references: not copied into the prediction record.
INPUT_FIELDS = (*REQUIRED_FIELDS, TOKENS_FIELD)
# Fields predict writes into each prediction record: a request may not bring its own (it would be overwritten).
RESERVED_FIELDS = ("pred",)
CONTEXT_ID = "context_id"
_BOM = b"\xef\xbb\xbf"


def read_input(path: str | os.PathLike[str], what: str = "JSONL file") -> bytes:
    """The bytes of an input file (a pipe too), or a :class:`ConfigurationError` naming a folder or a missing file."""
    source = Path(path)
    if source.is_dir():
        raise ConfigurationError(f"{what} {str(source)!r} is a folder, not a file; give the JSONL file's path")
    if not source.exists():
        raise ConfigurationError(f"{what} {str(source)!r} does not exist; check the path")
    with source.open("rb") as handle:
        return handle.read()


def requests_fingerprint(requests: bytes, contexts: bytes | None = None) -> str:
    """What the run record holds of the inputs: ``sha256:<requests>`` (`` + contexts sha256:<contexts>``)."""
    fingerprint = f"sha256:{hashlib.sha256(requests).hexdigest()}"
    if contexts is not None:
        fingerprint += f" + contexts sha256:{hashlib.sha256(contexts).hexdigest()}"
    return fingerprint


def read_records(
    path: str | os.PathLike[str],
    *,
    what: str = "JSONL file",
    tolerate_torn_tail: bool = False,
    data: bytes | None = None,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line of ``path`` (of ``data``, its bytes read already).

    A last line without its newline that is not valid JSON (a job killed while writing it) is skipped when
    ``tolerate_torn_tail``; every other bad line raises a :class:`ConfigurationError` naming the file and line.
    """
    source = Path(path)
    data = read_input(path, what) if data is None else data
    data = data.removeprefix(_BOM)  # UTF-8 with a byte-order mark (as some editors save it) reads as UTF-8
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        where = f"{source}, line {number}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ConfigurationError(
                f"{where}: byte {error.start + 1} is not UTF-8 (0x{raw[error.start]:02x}); save the file as UTF-8"
            ) from None
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            if tolerate_torn_tail and number == len(lines):  # the file does not end with a newline: cut short
                return
            raise ConfigurationError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(record, dict):
            raise ConfigurationError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield number, record


def read_predictions(path: str | os.PathLike[str]) -> list[tuple[str, dict[str, Any]]]:
    """``(where, prediction)`` for every line of a predictions file (``where`` names the file and line for error
    messages); a request index written twice is refused (a file that mixes runs would be scored with one request
    counted twice)."""
    records: list[tuple[str, dict[str, Any]]] = []
    seen: dict[Any, int] = {}
    for number, record in read_records(path, what="predictions file", tolerate_torn_tail=True):
        index = record.get("index")
        if isinstance(index, int) and not isinstance(index, bool):
            if index in seen:
                raise ConfigurationError(
                    f"{path}: index {index} is on line {seen[index]} and line {number}: the file holds two "
                    "predictions of one request (runs mixed); score a file that one run wrote (star-lightning "
                    "predict --overwrite true, or another --output)"
                )
            seen[index] = number
        records.append((f"{path}, line {number}", record))
    return records


def check_encodable(value: Any, where: str, field: str) -> None:
    """Every string in ``value`` (keys too, at any depth) can be written as UTF-8: JSON's ``\\ud800`` escapes decode
    to an unpaired surrogate, which no tokenizer takes and no output file can hold."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            char = ord(value[error.start])
            raise ConfigurationError(
                f"{where}: the field {field!r} holds an unpaired UTF-16 surrogate (\\u{char:04x} at character "
                f"{error.start + 1}), which is no text and cannot be written as UTF-8; fix the text where the file "
                "was made (a character cut in half)"
            ) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            check_encodable(key, where, field)
            check_encodable(item, where, field)
    elif isinstance(value, list):
        for item in value:
            check_encodable(item, where, field)


def validate_request(request: dict[str, Any], where: str, default_index: int) -> dict[str, Any]:
    """Check one request's fields (its context resolved already); sets ``index`` to ``default_index`` if missing.

    The one place a request line is judged: every check a request could fail later (in the tokenizer, in the writer
    after its prediction was computed) is made here, before any model work."""
    for field, value in request.items():
        check_encodable(field, where, field)
        check_encodable(value, where, field)
        if field in RESERVED_FIELDS:
            raise ConfigurationError(
                f"{where}: the field {field!r} is reserved: predict writes each request's prediction there; rename "
                f"it (for example to 'previous_{field}')"
            )
    for field in REQUIRED_FIELDS:
        if field not in request:
            raise ConfigurationError(
                f"{where}: missing the field {field!r} (every request needs {' and '.join(REQUIRED_FIELDS)}, or "
                f"'{CONTEXT_ID}' naming a context given before instead of 'input_context')"
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


class ContextBook:
    """Contexts by ``context_id``: each given once (a contexts file, or the first request line that names it with
    its text); a second definition with another text is an error naming both places."""

    def __init__(self) -> None:
        self._texts: dict[str, str] = {}
        self._where: dict[str, str] = {}

    def define(self, context_id: object, text: object, where: str) -> str:
        if not isinstance(context_id, str) or not context_id:
            raise ConfigurationError(f"{where}: '{CONTEXT_ID}' must be a non-empty string, got {context_id!r}")
        if not isinstance(text, str):
            raise ConfigurationError(f"{where}: 'input_context' must be a string, got {type(text).__name__}")
        check_encodable(context_id, where, CONTEXT_ID)
        check_encodable(text, where, "input_context")
        known = self._texts.get(context_id)
        if known is None:
            self._texts[context_id], self._where[context_id] = text, where
            return text
        if known != text:
            raise ConfigurationError(
                f"{where}: context {context_id!r} is defined again with a different 'input_context' (first given at "
                f"{self._where[context_id]}); give each context once, or use another '{CONTEXT_ID}'"
            )
        return known  # the same text: one string object for every request that shares it

    def text(self, context_id: object, where: str) -> str:
        if not isinstance(context_id, str) and str(context_id) in self._texts:
            raise ConfigurationError(
                f"{where}: '{CONTEXT_ID}' {context_id!r} is no string, but the context is defined "
                f'as the string {str(context_id)!r} (at {self._where[str(context_id)]}); write it as "{context_id}"'
            )
        if not isinstance(context_id, str) or context_id not in self._texts:
            raise ConfigurationError(
                f"{where}: '{CONTEXT_ID}' {context_id!r} names no context given before; define it on an earlier line "
                f"(with 'input_context') or in the contexts file (--data.contexts)"
            )
        return self._texts[context_id]


def read_contexts(path: str | os.PathLike[str], data: bytes | None = None) -> ContextBook:
    """A contexts file: one ``{"context_id": ..., "input_context": ...}`` a line."""
    book = ContextBook()
    for number, record in read_records(path, what="contexts file (--data.contexts)", data=data):
        where = f"{path}, line {number}"
        if CONTEXT_ID not in record or "input_context" not in record:
            raise ConfigurationError(f"{where}: a contexts file line needs '{CONTEXT_ID}' and 'input_context'")
        book.define(record[CONTEXT_ID], record["input_context"], where)
    return book


def read_numbered_requests(
    path: str | os.PathLike[str],
    contexts: str | os.PathLike[str] | None = None,
    *,
    data: bytes | None = None,
    contexts_data: bytes | None = None,
) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, request)`` for every request of a JSONL file, in file order, each with its ``input_context``
    (resolved from ``context_id``); indices must be unique (they identify requests on resume). ``data`` and
    ``contexts_data``: the files' bytes, read already (so what is checked is what was hashed)."""
    book = read_contexts(contexts, contexts_data) if contexts is not None else ContextBook()
    requests: list[tuple[int, dict[str, Any]]] = []
    seen: dict[int, int] = {}
    for number, record in read_records(path, what="input file (--data.path)", data=data):
        where = f"{path}, line {number}"
        if CONTEXT_ID in record:
            if "input_context" in record:
                record["input_context"] = book.define(record[CONTEXT_ID], record["input_context"], where)
            else:
                record["input_context"] = book.text(record[CONTEXT_ID], where)
        request = validate_request(record, where, default_index=len(requests))
        index = request["index"]
        if index in seen:
            raise ConfigurationError(
                f"{path}, line {number}: index {index} was already used on line {seen[index]}; indices must be "
                "unique (they identify requests when a job resumes)"
            )
        seen[index] = number
        requests.append((number, request))
    if not requests:
        raise ConfigurationError(f"input file {str(path)!r} holds no requests")
    return requests


def read_requests(
    path: str | os.PathLike[str],
    contexts: str | os.PathLike[str] | None = None,
    *,
    data: bytes | None = None,
    contexts_data: bytes | None = None,
) -> list[dict[str, Any]]:
    """All requests of a JSONL file, in file order (see :func:`read_numbered_requests`)."""
    numbered = read_numbered_requests(path, contexts, data=data, contexts_data=contexts_data)
    return [request for _, request in numbered]


def prediction_record(request: dict[str, Any], pred: str) -> dict[str, Any]:
    """What is written for a request: its fields except the inputs, and ``pred``."""
    record = {key: value for key, value in request.items() if key not in INPUT_FIELDS}
    record["pred"] = pred
    return record


def unterminated_last_line(path: str | os.PathLike[str]) -> tuple[int, bytes] | None:
    """``(line number, bytes)`` of the last line when the file does not end with its newline -- what a run stopped
    while writing leaves (every line predict writes ends with one); None for a file that ends whole."""
    target = Path(path)
    if not target.is_file() or target.stat().st_size == 0:
        return None
    data = target.read_bytes()
    if data.endswith(b"\n"):
        return None
    return data.count(b"\n") + 1, data[data.rfind(b"\n") + 1 :]


def torn_last_line(path: str | os.PathLike[str]) -> int | None:
    """The number of an unterminated last line that is not JSON (a torn one), which readers leave out."""
    last = unterminated_last_line(path)
    if last is None:
        return None
    try:
        json.loads(last[1].removeprefix(_BOM))
    except (ValueError, UnicodeDecodeError):
        return last[0]
    return None


def completed_indices(path: str | os.PathLike[str]) -> set[int]:
    """Indices of the complete prediction lines of a predictions file (lines with ``pred``): an unterminated last line
    does not count, even where it parses (a write cut just before its newline), since the run cuts it off
    (:func:`repair_torn_tail`); a line without ``pred`` (a request) is no prediction."""
    return output_lines(path).done


@dataclass
class OutputLines:
    """What an output file holds: the indices predicted, the lines that are no prediction (no ``pred``: a request
    file?) and the indices predicted twice (``(index, first line, second line)``: two runs mixed)."""

    done: set[int] = dataclasses.field(default_factory=set)
    not_predictions: list[int] = dataclasses.field(default_factory=list)
    twice: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)


def output_lines(path: str | os.PathLike[str]) -> OutputLines:
    """The complete lines of an output file, sorted as :class:`OutputLines` says."""
    found = OutputLines()
    if not os.path.exists(path):
        return found
    last = unterminated_last_line(path)
    unterminated = None if last is None else last[0]
    seen: dict[int, int] = {}
    for number, record in read_records(path, what="output file", tolerate_torn_tail=True):
        if number == unterminated:
            continue
        if "pred" not in record:
            found.not_predictions.append(number)
            continue
        index = record.get("index")
        if isinstance(index, int) and not isinstance(index, bool):
            if index in seen:
                found.twice.append((index, seen[index], number))
            seen.setdefault(index, number)
            found.done.add(index)
    return found


def repair_torn_tail(path: str | os.PathLike[str]) -> None:
    """Cut a partial last line left by a job that died while writing it."""
    target = Path(path)
    if not target.exists() or target.stat().st_size == 0:
        return
    with target.open("r+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        data = handle.read()
        if data.endswith(b"\n"):
            return
        handle.truncate(data.rfind(b"\n") + 1)
        handle.flush()
        os.fsync(handle.fileno())


class OutputWriteError(Exception):
    """Writing a prediction failed mid-run (no space left, the file replaced or deleted): the message names the file
    and the cause; what was written before stays whole."""


FileIdentity = tuple[int, int]  # (st_dev, st_ino)


def file_identity(path: str | os.PathLike[str]) -> FileIdentity:
    """The file a path names now (device and inode): a replaced or recreated file has another."""
    status = os.stat(path)
    return status.st_dev, status.st_ino


def append_prediction(
    path: str | os.PathLike[str], record: dict[str, Any], expected: FileIdentity | None = None
) -> None:
    """One line, one ``write``, under an exclusive lock (data-parallel groups share the file), fsynced.

    With ``expected`` (the file the run started on), the path must still name that file: a file replaced, renamed
    away or deleted mid-run is not written to (:class:`OutputWriteError`). A write that does not complete (a full
    disk) is cut back off, so the file never ends with a torn line, and raised."""
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    flags = os.O_WRONLY | os.O_APPEND | (0 if expected is not None else os.O_CREAT)
    try:
        fd = os.open(path, flags, 0o644)
    except FileNotFoundError:
        raise OutputWriteError(f"{path} was deleted (or its folder) while the run wrote it") from None
    except OSError as error:
        raise OutputWriteError(f"cannot open {path} to append ({error.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        status = os.fstat(fd)
        if expected is not None and (status.st_dev, status.st_ino) != expected:
            raise OutputWriteError(
                f"{path} was replaced by another file while the run wrote it (the file it wrote so far is no longer "
                "under that name)"
            )
        size = status.st_size
        try:
            written = os.write(fd, line)
            if written != len(line):
                raise OSError(errno.ENOSPC, f"only {written} of {len(line)} bytes written")
            os.fsync(fd)
        except OSError as error:
            os.ftruncate(fd, size)  # no torn line left behind
            why = "no space left on device" if error.errno == errno.ENOSPC else error.strerror
            raise OutputWriteError(f"cannot write to {path} ({why}; the unfinished line was cut off)") from None
    finally:
        os.close(fd)


def _replace_atomically(path: str | os.PathLike[str], write: Callable[[IO[str]], None]) -> None:
    """``write`` into a temp file in the target's folder, fsync, rename: readers see the old or the new file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def write_jsonl_atomic(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> int:
    """Write ``rows`` one JSON object a line, atomically; returns the number of rows written."""
    count = 0

    def write(handle: IO[str]) -> None:
        nonlocal count
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1

    _replace_atomically(path, write)
    return count


def write_json_atomic(path: str | os.PathLike[str], value: Any) -> None:
    """Write one JSON document (indented, for people to read), atomically."""

    def write(handle: IO[str]) -> None:
        handle.write(json.dumps(value, ensure_ascii=False, indent=2) + "\n")

    _replace_atomically(path, write)
