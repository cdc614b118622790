"""Aggregation tasks: common words extraction (cwe) and frequent (coded) words extraction (fwe).

cwe follows NVIDIA/RULER scripts/data/synthetic/common_words_extraction.py: distinct words drawn from wonderwords'
nouns, adjectives and verbs (RULER's ``english_words.json`` beyond those), the first 10 repeated 30 times and the
rest 3 times (6 and 1 below 4K tokens), one solved example first. fwe follows freq_words_extraction.py: Zipf-
distributed 6-letter coded words over a vocabulary of ``(length - 50) // 50`` words, no example.
"""

from __future__ import annotations

import pathlib
import random
import string

from star_lightning.bench.ruler import prompts
from star_lightning.bench.ruler.words import common_words, english_words


def _numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(words))


def cwe_vocabulary(count: int, rng: random.Random, english_words_path: str | pathlib.Path | None) -> list[str]:
    """``count`` distinct words: wonderwords' when it has enough, else RULER's english_words.json."""
    words = common_words()
    source = words if count <= len(words) else english_words(english_words_path, count)
    return rng.sample(source, count)


def _word_list(
    rng: random.Random,
    num_words: int,
    common_repeats: int,
    uncommon_repeats: int,
    num_common: int,
    english_words_path: str | pathlib.Path | None,
) -> tuple[str, list[str]]:
    """A shuffled numbered list: ``num_common`` words ``common_repeats`` times, the rest ``uncommon_repeats``."""
    words = cwe_vocabulary(num_words, rng, english_words_path)
    common, uncommon = words[:num_common], words[num_common:]
    listed = common * common_repeats + uncommon * uncommon_repeats
    rng.shuffle(listed)
    return _numbered(listed), common


def build_cwe(
    size: int,
    seed: int,
    *,
    length: int,
    num_common: int = 10,
    freq_common: int = 30,
    freq_uncommon: int = 3,
    english_words_path: str | pathlib.Path | None = None,
) -> prompts.Prompt:
    """``size`` distinct words; RULER lowers the repeat counts below 4K tokens so the list still fits."""
    rng = random.Random(seed)
    if length < 4096:
        example_shape, shape = (20, 3, 1), (6, 1)
    else:
        example_shape, shape = (40, 10, 3), (freq_common, freq_uncommon)
    example_list, example_answer = _word_list(rng, *example_shape, num_common, None)
    example_context, example_question = prompts.fill(prompts.COMMON_WORDS_EXTRACTION, example_list)
    example = (
        example_context + example_question.query + example_question.answer_prefix + " " + _numbered(example_answer)
    )
    word_list, answer = _word_list(rng, max(size, num_common + 1), *shape, num_common, english_words_path)
    context, question = prompts.fill(prompts.COMMON_WORDS_EXTRACTION, word_list)
    return prompts.Prompt(
        context=example + "\n" + context,
        questions=[prompts.Question(question.query, question.answer_prefix, answer)],
    )


def zeta(alpha: float, terms: int = 10_000) -> float:
    """Riemann zeta for ``alpha > 1``: a partial sum plus the Euler-Maclaurin tail (error far below 1e-9)."""
    partial = sum(k**-alpha for k in range(1, terms))
    return partial + terms ** (1 - alpha) / (alpha - 1) + 0.5 * terms**-alpha


def fwe_vocabulary_size(length: int, tokens_to_generate: int) -> int:
    """RULER's default ``vocab_size = max_seq_length // 50`` with the answer budget already subtracted."""
    return max(4, (length - tokens_to_generate) // 50)  # at least '...' plus the three answers


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


def build_fwe(size: int, seed: int, *, vocab_size: int, alpha: float = 2.0, word_length: int = 6) -> prompts.Prompt:
    """``size`` is the nominal word count of the Zipf sample (RULER's ``num_words``)."""
    rng = random.Random(seed)
    # At least 100 words, so ranks 2-4 have distinct counts and the answer is unambiguous.
    text, answer = _coded_text(rng, max(size, 100), word_length, vocab_size, alpha)
    context, question = prompts.fill(prompts.FREQ_WORDS_EXTRACTION, text)
    return prompts.Prompt(context=context, questions=[prompts.Question(question.query, question.answer_prefix, answer)])
