"""RULER's word lists: the ``wonderwords`` package's nouns, adjectives and verbs, read as RULER reads them.

RULER (scripts/data/synthetic/niah.py, common_words_extraction.py) loads the lists with
``wonderwords.random_word._get_words_from_text_file(NAME)``: the package's ``assets/NAME`` file, one word a line,
trailing whitespace stripped. We read the same files through ``importlib.resources``. Needle keys are
``adjective-noun`` pairs; the common-words task draws from the sorted union of all three lists (8,166 words with
wonderwords 3.0.1). Beyond that many words RULER's cwe switches to its own ``english_words.json`` (a Git LFS file
in the RULER repository, not on PyPI), which the user points to with ``--english_words``.
"""

from __future__ import annotations

import functools
import json
import pathlib
import random
from importlib import resources

from star_lightning.errors import ConfigurationError


def _wonderwords_list(name: str) -> list[str]:
    """Lines of ``wonderwords/assets/{name}``, as ``_get_words_from_text_file`` returns them."""
    text = resources.files("wonderwords").joinpath("assets", name).read_text(encoding="utf-8")
    return [line.rstrip() for line in text.splitlines(keepends=True)]


@functools.cache
def nouns() -> tuple[str, ...]:
    return tuple(_wonderwords_list("nounlist.txt"))


@functools.cache
def adjectives() -> tuple[str, ...]:
    return tuple(_wonderwords_list("adjectivelist.txt"))


@functools.cache
def verbs() -> tuple[str, ...]:
    return tuple(_wonderwords_list("verblist.txt"))


@functools.cache
def common_words() -> tuple[str, ...]:
    """``sorted(set(nouns + adjs + verbs))``: the common-words task's vocabulary (RULER's ``words``)."""
    return tuple(sorted(set(nouns() + adjectives() + verbs())))


@functools.cache
def _key_parts() -> tuple[tuple[str, ...], tuple[str, ...]]:
    return tuple(sorted(set(adjectives()))), tuple(sorted(set(nouns())))


def needle_key(rng: random.Random) -> str:
    """A needle key as RULER draws it: uniform over the distinct ``f"{adj}-{noun}"`` strings.

    RULER materialises all 6.2M pairs and calls ``random.choice``; every pair of distinct list entries gives a
    distinct string (tested), so drawing the adjective and the noun independently is the same distribution.
    """
    adjs, noun_list = _key_parts()
    return f"{rng.choice(adjs)}-{rng.choice(noun_list)}"


@functools.cache
def _english_words(path: str) -> tuple[str, ...]:
    source = pathlib.Path(path)
    if not source.is_file():
        raise ConfigurationError(f"--english_words {source}: no such file (RULER's json/english_words.json).")
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConfigurationError(
            f"--english_words {source}: not valid JSON ({error.msg}); a Git LFS pointer instead of the file? "
            "Fetch it with git lfs pull in the RULER repository."
        ) from error
    words = list(data.values()) if isinstance(data, dict) else data
    if not isinstance(words, list) or not words or not all(isinstance(word, str) for word in words):
        raise ConfigurationError(f"--english_words {source}: expected a JSON object (or list) of words.")
    return tuple(words)


def english_words(path: str | pathlib.Path | None, needed: int) -> tuple[str, ...]:
    """RULER's larger word list (``list(json.load(f).values())``), needed when cwe uses more than 8,166 words."""
    if path is None:
        raise ConfigurationError(
            f"cwe at this --length needs {needed} distinct words, more than wonderwords' {len(common_words())}; "
            "RULER then draws from its scripts/data/synthetic/json/english_words.json: pass --english_words PATH."
        )
    words = _english_words(str(path))
    if needed > len(words):
        raise ConfigurationError(f"--english_words {path}: {len(words)} words, but cwe needs {needed} here.")
    return words
