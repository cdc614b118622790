"""Needle-in-a-haystack tasks (RULER's retrieval group): single, multi-key, multi-value, multi-query."""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from typing import Literal

from star_lightning.bench.ruler import prompts
from star_lightning.bench.ruler.haystacks import essay_prefix, split_sentences
from star_lightning.bench.ruler.words import needle_key

HaystackKind = Literal["noise", "essay", "needle"]
NeedleKind = Literal["words", "numbers", "uuids"]

# Needle depths in percent of the haystack, as RULER: 40 evenly spaced values from 0 to 100.
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


def random_needle_part(kind: NeedleKind, rng: random.Random) -> str:
    """A key or value: an ``adjective-noun`` word pair, a 7-digit number, or a UUID."""
    if kind == "words":
        return needle_key(rng)
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def build(config: NiahConfig, size: int, seed: int, essay_words: list[str] | None = None) -> prompts.Prompt:
    """A NIAH prompt whose haystack has ``size`` units (noise repeats, essay words or distractor needles)."""
    rng = random.Random(seed)
    type_v: str = config.value_kind
    keys: list[str] = []
    values: list[list[str]] = []
    needles: list[str] = []
    while len(keys) < config.num_keys:
        key = random_needle_part(config.key_kind, rng)
        if key in keys:
            continue
        keys.append(key)
        values.append([random_needle_part(config.value_kind, rng) for _ in range(config.num_values)])
        needles.extend(prompts.NEEDLE.format(type_v=type_v, key=key, value=value) for value in values[-1])
    rng.shuffle(needles)
    queried = rng.sample(range(config.num_keys), config.num_queries)
    query_keys = [keys[i] for i in queried]
    answers = [value for i in queried for value in values[i]]

    if config.haystack == "essay":
        assert essay_words is not None, "essay haystack needs the essay words"
        sentences = split_sentences(essay_prefix(essay_words, size))
        cuts = sorted(int(len(sentences) * depth / 100) for depth in rng.sample(DEPTHS, len(needles)))
        pieces: list[str] = []
        previous = 0
        for cut, needle in zip(cuts, needles, strict=True):
            pieces.extend(sentences[previous:cut])
            pieces.append(needle)
            previous = cut
        pieces.extend(sentences[previous:])
        haystack = " ".join(pieces)
    else:
        if config.haystack == "noise":
            lines = [prompts.NOISE_SENTENCES] * size
        else:
            lines = []
            while len(lines) < size:
                key = random_needle_part(config.key_kind, rng)
                if key not in keys:
                    value = random_needle_part(config.value_kind, rng)
                    lines.append(prompts.NEEDLE.format(type_v=type_v, key=key, value=value))
        # Insert from the back so earlier positions stay valid; needles keep their shuffled order.
        positions = sorted(rng.choices(range(size + 1), k=len(needles)))
        for position, needle in reversed(list(zip(positions, needles, strict=True))):
            lines.insert(position, needle)
        haystack = "\n".join(lines)

    query = ", ".join(query_keys[:-1]) + ", and " + query_keys[-1] if len(query_keys) > 1 else query_keys[0]
    context_template, query_template, prefix_template = (
        prompts.NIAH_CONTEXT,
        prompts.NIAH_QUERY,
        prompts.NIAH_ANSWER_PREFIX,
    )
    if config.num_queries * config.num_values == 1:
        # One answer: RULER switches the wording to the singular.
        type_v = type_v[:-1]
        context_template = context_template.replace("Some", "A").replace(" are ", " is ")
        query_template = query_template.replace("are all", "is")
        prefix_template = prefix_template.replace(" are", " is")
    return prompts.Prompt(
        context=context_template.format(type_v=type_v, context=haystack),
        query=query_template.format(type_v=type_v, query=query),
        answer_prefix=prefix_template.format(type_v=type_v, query=query),
        outputs=answers,
    )
