"""Needle-in-a-haystack tasks (RULER's retrieval group): single, multi-key, multi-value, multi-query.

Follows NVIDIA/RULER scripts/data/synthetic/niah.py: keys are wonderwords ``adjective-noun`` pairs, 7-digit
numbers or UUIDs; essay needles go at sentence boundaries at depths drawn without replacement from 40 evenly spaced
percentages; noise and needle haystacks get their needles at distinct line positions.

Several questions about one haystack (``queries``, ``generate --queries_per_context``) extend RULER's own
multi-needle rule (``num_needle_k = max(num_needle_k, num_needle_q)``): the haystack holds
``max(num_keys, queries * num_queries)`` keys, and the questions ask about disjoint sets of ``num_queries`` of them,
each with its own references. With one question this is RULER's task exactly.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from typing import Literal

from star_lightning.bench.ruler import prompts
from star_lightning.bench.ruler.haystacks import essay_prefix, split_sentences
from star_lightning.bench.ruler.words import needle_key
from star_lightning.errors import ConfigurationError

HaystackKind = Literal["noise", "essay", "needle"]
NeedleKind = Literal["words", "numbers", "uuids"]

# Needle depths in percent of the haystack, as RULER: np.round(np.linspace(0, 100, 40)).
DEPTHS = [round(100 * i / 39) for i in range(40)]


@dataclass(frozen=True)
class NiahConfig:
    """One RULER NIAH variant: haystack kind, needle key/value kinds and counts."""

    haystack: HaystackKind
    key_kind: NeedleKind
    value_kind: NeedleKind
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1

    def total_keys(self, queries: int) -> int:
        return max(self.num_keys, self.num_queries * queries)


def random_needle_part(kind: NeedleKind, rng: random.Random) -> str:
    """A key or value: an ``adjective-noun`` word pair, a 7-digit number, or a UUID."""
    if kind == "words":
        return needle_key(rng)
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def check_queries(config: NiahConfig, queries: int, task: str) -> None:
    """Essay needles take distinct depths: at most 40 needles fit RULER's depth grid."""
    needles = config.total_keys(queries) * config.num_values
    if config.haystack == "essay" and needles > len(DEPTHS):
        most = len(DEPTHS) // (config.num_queries * config.num_values)
        raise ConfigurationError(
            f"{task} with --queries_per_context {queries} puts {needles} needles in the essay, more than RULER's "
            f"{len(DEPTHS)} needle depths. Use --queries_per_context {most} or less."
        )


def _essay(sentences: list[str], needles: list[str], rng: random.Random) -> str:
    """Needles between sentences at distinct depths; the segments joined as RULER joins them."""
    cuts = sorted(int(len(sentences) * depth / 100) for depth in rng.sample(DEPTHS, len(needles)))
    bounds = [0, *cuts, len(sentences)]
    pieces: list[str] = []
    for number in range(1, len(bounds)):
        pieces.append(" ".join(sentences[bounds[number - 1] : bounds[number]]))
        if number - 1 < len(needles):
            pieces.append(needles[number - 1])
    return " ".join(pieces)


def _lines(lines: list[str], needles: list[str], rng: random.Random) -> str:
    """Needles inserted at distinct line positions, from the back so earlier positions stay valid."""
    positions = sorted(rng.sample(range(max(len(lines), len(needles))), len(needles)), reverse=True)
    for position, needle in zip(positions, needles, strict=True):
        lines.insert(position, needle)
    return "\n".join(lines)


def build(
    config: NiahConfig, size: int, seed: int, essay_words: list[str] | None = None, *, queries: int = 1
) -> prompts.Prompt:
    """A NIAH prompt whose haystack has ``size`` units (noise lines, essay words or distractor needles)."""
    rng = random.Random(seed)
    type_v: str = config.value_kind
    keys: list[str] = []
    values: list[list[str]] = []
    needles: list[str] = []
    while len(keys) < config.total_keys(queries):
        key = random_needle_part(config.key_kind, rng)
        if key in keys:
            continue
        keys.append(key)
        values.append([random_needle_part(config.value_kind, rng) for _ in range(config.num_values)])
        needles.extend(prompts.NEEDLE.format(type_needle_v=type_v, key=key, value=value) for value in values[-1])
    rng.shuffle(needles)

    if config.haystack == "essay":
        assert essay_words is not None, "essay haystack needs the essay words"
        haystack = _essay(split_sentences(essay_prefix(essay_words, size)), needles, rng)
    elif config.haystack == "noise":
        haystack = _lines([prompts.NOISE] * size, needles, rng)
    else:
        distractors: list[str] = []
        while len(distractors) < size:
            key = random_needle_part(config.key_kind, rng)
            if key not in keys:
                value = random_needle_part(config.value_kind, rng)
                distractors.append(prompts.NEEDLE.format(type_needle_v=type_v, key=key, value=value))
        haystack = _lines(distractors, needles, rng)

    asked = rng.sample(range(len(keys)), config.num_queries * queries)
    template = prompts.NIAH
    if config.num_queries * config.num_values == 1:
        template = prompts.TaskTemplate(prompts.singular(template.template), prompts.singular(template.answer_prefix))
        type_v = type_v[:-1]  # remove "s", as RULER
    context = ""
    questions = []
    for number in range(queries):
        chosen = asked[number * config.num_queries : (number + 1) * config.num_queries]
        query_keys = [keys[i] for i in chosen]
        query = ", ".join(query_keys[:-1]) + ", and " + query_keys[-1] if len(query_keys) > 1 else query_keys[0]
        context, question = prompts.fill(template, haystack, type_needle_v=type_v, query=query)
        answers = [value for i in chosen for value in values[i]]
        questions.append(prompts.Question(question.query, question.answer_prefix, answers))
    return prompts.Prompt(context=context, questions=questions)
