"""Haystack text: the built-in noise sentences and essays read from the user's files (never downloaded)."""

from __future__ import annotations

import json
import pathlib
import re

from star_lightning.errors import ConfigurationError

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def load_essay_words(path: str | pathlib.Path | None) -> list[str]:
    """Words of the essay haystack (RULER uses Paul Graham's essays) from ``--essays PATH``.

    PATH may be a ``.txt`` file, a folder of ``.txt`` files (read in name order), or a ``.json`` file holding
    ``{"text": "..."}`` (RULER's ``PaulGrahamEssays.json``) or a list of strings / such objects.
    """
    if path is None:
        raise ConfigurationError(
            "This task needs an essay haystack: pass --essays PATH (a .txt file, a folder of .txt files, or "
            "RULER's PaulGrahamEssays.json)."
        )
    source = pathlib.Path(path)
    if source.is_dir():
        files = sorted(source.glob("*.txt"))
        if not files:
            raise ConfigurationError(f"--essays {source}: the folder holds no .txt files.")
        text = "\n".join(file.read_text(encoding="utf-8") for file in files)
    elif source.is_file():
        text = _essay_text_from_file(source)
    else:
        raise ConfigurationError(f"--essays {source}: no such file or folder.")
    words = text.split()
    if not words:
        raise ConfigurationError(f"--essays {source}: the essay text is empty.")
    return words


def _essay_text_from_file(source: pathlib.Path) -> str:
    if source.suffix != ".json":
        return source.read_text(encoding="utf-8")
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConfigurationError(f"--essays {source}: not valid JSON ({error.msg}).") from error
    items = data if isinstance(data, list) else [data]
    texts = []
    for item in items:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, dict) and isinstance(item.get("text"), str):
            texts.append(item["text"])
        else:
            raise ConfigurationError(
                f'--essays {source}: expected {{"text": "..."}} or a list of strings / such objects.'
            )
    return "\n".join(texts)


def essay_prefix(words: list[str], count: int) -> str:
    """The first ``count`` words of the essays, repeating them when the essays are shorter (as RULER does)."""
    if count <= len(words):
        return " ".join(words[:count])
    repeats = -(-count // len(words))
    return " ".join((words * repeats)[:count])


def split_sentences(text: str) -> list[str]:
    """Split text after ``.``, ``!`` or ``?`` followed by whitespace: insertion points for needles."""
    return [sentence for sentence in _SENTENCE_END.split(text.strip()) if sentence]
