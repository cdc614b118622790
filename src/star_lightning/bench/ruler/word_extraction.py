"""Aggregation tasks: common words extraction (cwe) and frequent (coded) words extraction (fwe)."""

from __future__ import annotations

import random
import string

from star_lightning.bench.ruler import prompts
from star_lightning.bench.ruler.words import vocabulary


def _numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(words))


def _word_list(
    rng: random.Random, num_words: int, common_repeats: int, uncommon_repeats: int, num_common: int
) -> tuple[str, list[str]]:
    """A shuffled numbered list: ``num_common`` words ``common_repeats`` times, the rest ``uncommon_repeats``."""
    words = vocabulary(num_words, rng)
    common, uncommon = words[:num_common], words[num_common:]
    listed = common * common_repeats + uncommon * uncommon_repeats
    rng.shuffle(listed)
    return _numbered(listed), common


def build_cwe(
    size: int, seed: int, *, length: int, num_common: int = 10, freq_common: int = 30, freq_uncommon: int = 3
) -> prompts.Prompt:
    """``size`` distinct words; RULER lowers the repeat counts below 4K tokens so the list still fits."""
    rng = random.Random(seed)
    if length < 4096:
        example_shape, shape = (20, 3, 1), (6, 1)
    else:
        example_shape, shape = (40, 10, 3), (freq_common, freq_uncommon)
    example_list, example_answer = _word_list(rng, example_shape[0], example_shape[1], example_shape[2], num_common)
    example = (
        prompts.CWE_CONTEXT.format(context=example_list)
        + prompts.CWE_QUERY
        + prompts.CWE_ANSWER_PREFIX
        + " "
        + _numbered(example_answer)
    )
    word_list, answer = _word_list(rng, max(size, num_common + 1), shape[0], shape[1], num_common)
    return prompts.Prompt(
        context=example + "\n" + prompts.CWE_CONTEXT.format(context=word_list),
        query=prompts.CWE_QUERY,
        answer_prefix=prompts.CWE_ANSWER_PREFIX,
        outputs=answer,
    )


def zeta(alpha: float, terms: int = 10_000) -> float:
    """Riemann zeta for ``alpha > 1``: a partial sum plus the Euler-Maclaurin tail (error far below 1e-9)."""
    partial = sum(k**-alpha for k in range(1, terms))
    return partial + terms ** (1 - alpha) / (alpha - 1) + 0.5 * terms**-alpha


def _coded_text(
    rng: random.Random, num_words: int, word_length: int, vocab_size: int, alpha: float
) -> tuple[str, list[str]]:
    """Zipf-distributed coded words; rank 1 is the noise token '...', the answer is ranks 2-4."""
    vocab: set[str] = set()
    while len(vocab) < vocab_size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=word_length)))
    ranked = sorted(vocab)
    rng.shuffle(ranked)
    ranked[0] = "..."
    normaliser = zeta(alpha)
    words = [
        word for rank, word in enumerate(ranked, start=1) for _ in range(int(num_words * rank**-alpha / normaliser))
    ]
    rng.shuffle(words)
    return " ".join(words), ranked[1:4]


def build_fwe(size: int, seed: int, *, length: int, alpha: float = 2.0) -> prompts.Prompt:
    """``size`` is the nominal word count of the Zipf sample; a short solved example comes first."""
    rng = random.Random(seed)
    example_text, example_answer = _coded_text(rng, 60 if length < 4096 else 150, 3, 10, alpha)
    example = (
        prompts.FWE_CONTEXT.format(context=example_text)
        + prompts.FWE_QUERY
        + prompts.FWE_ANSWER_PREFIX
        + " "
        + " ".join(example_answer)
    )
    # At least 100 words, so ranks 2-4 have distinct counts and the answer is unambiguous.
    text, answer = _coded_text(rng, max(size, 100), 6, 2000, alpha)
    return prompts.Prompt(
        context=example + "\n" + prompts.FWE_CONTEXT.format(context=text),
        query=prompts.FWE_QUERY,
        answer_prefix=prompts.FWE_ANSWER_PREFIX,
        outputs=answer,
    )
