"""The 13 RULER tasks: their settings, metric and generation budget, and the sample generator."""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from star_lightning.bench.ruler import niah, qa, variable_tracking, word_extraction
from star_lightning.bench.ruler.fitting import largest_fitting
from star_lightning.bench.ruler.haystacks import load_essay_words
from star_lightning.bench.ruler.prompts import Prompt, count_tokens, render
from star_lightning.errors import ConfigurationError

Kind = Literal["niah", "vt", "cwe", "fwe", "qa_squad", "qa_hotpotqa"]
MetricName = Literal["match_all", "match_part"]


@dataclass(frozen=True)
class TaskSpec:
    """How one RULER task is built and scored; ``tokens_to_generate`` is reserved inside the target length."""

    kind: Kind
    tokens_to_generate: int
    metric: MetricName
    niah: niah.NiahConfig | None = None

    @property
    def needs_essays(self) -> bool:
        return self.niah is not None and self.niah.haystack == "essay"


def _niah(haystack: niah.HaystackKind, key: niah.NeedleKind, value: niah.NeedleKind, **counts: int) -> TaskSpec:
    return TaskSpec("niah", 128, "match_all", niah.NiahConfig(haystack, key, value, **counts))


TASKS: dict[str, TaskSpec] = {
    "niah_single_1": _niah("noise", "words", "numbers"),
    "niah_single_2": _niah("essay", "words", "numbers"),
    "niah_single_3": _niah("essay", "words", "uuids"),
    "niah_multikey_1": _niah("essay", "words", "numbers", num_keys=4),
    "niah_multikey_2": _niah("needle", "words", "numbers"),
    "niah_multikey_3": _niah("needle", "uuids", "uuids"),
    "niah_multivalue": _niah("essay", "words", "numbers", num_values=4),
    "niah_multiquery": _niah("essay", "words", "numbers", num_keys=4, num_queries=4),
    "vt": TaskSpec("vt", 30, "match_all"),
    "cwe": TaskSpec("cwe", 120, "match_all"),
    "fwe": TaskSpec("fwe", 50, "match_all"),
    "qa_1": TaskSpec("qa_squad", 32, "match_part"),
    "qa_2": TaskSpec("qa_hotpotqa", 32, "match_part"),
}


def sample_seed(seed: int, task: str, index: int) -> int:
    """A per-sample seed that depends only on (seed, task, index): samples are reproducible one by one."""
    return random.Random(f"{seed}/{task}/{index}").getrandbits(63)


def _builder(
    name: str, spec: TaskSpec, length: int, essays: Any, qa_file: Any, seed: int
) -> tuple[Callable[[int, int, int], Prompt], int]:
    """Return ``build(index, size, sample_seed)`` and the largest sensible haystack size for the task."""
    if spec.kind == "niah":
        config = spec.niah
        assert config is not None
        words = load_essay_words(essays) if spec.needs_essays else None
        return (lambda index, size, s: niah.build(config, size, s, words)), 10_000_000
    if spec.kind == "vt":
        return (lambda index, size, s: variable_tracking.build(size, s)), 10_000_000
    if spec.kind == "cwe":
        return (lambda index, size, s: word_extraction.build_cwe(size, s, length=length)), 10_000_000
    if spec.kind == "fwe":
        return (lambda index, size, s: word_extraction.build_fwe(size, s, length=length)), 10_000_000
    dataset = qa.load_squad(qa_file) if spec.kind == "qa_squad" else qa.load_hotpotqa(qa_file)
    order = list(range(len(dataset.questions)))
    random.Random(f"{seed}/{name}/questions").shuffle(order)
    return (lambda index, size, s: qa.build(dataset, order[index % len(order)], size, s)), len(dataset.documents)


def generate_samples(
    task: str,
    tokenizer: Any,
    *,
    length: int,
    num_samples: int,
    seed: int,
    chat: bool = False,
    essays: Any = None,
    qa_file: Any = None,
) -> list[dict[str, Any]]:
    """Generate ``num_samples`` rows of ``task`` at ``length`` tokens (prompt + generation budget <= length).

    The haystack size of each sample is the largest that fits, found by search on the real token count of the
    rendered prompt (context + query, with the tokenizer's special tokens).
    """
    if task not in TASKS:
        raise ConfigurationError(f"Unknown RULER task {task!r}. Choose one of: {', '.join(TASKS)}.")
    spec = TASKS[task]
    budget = length - spec.tokens_to_generate
    if budget <= 0:
        raise ConfigurationError(
            f"--length {length} leaves no room for {task}'s {spec.tokens_to_generate} answer tokens."
        )
    build, upper = _builder(task, spec, length, essays, qa_file, seed)
    rows: list[dict[str, Any]] = []
    hint = 1
    capped_warned = False
    for index in range(num_samples):
        seed_i = sample_seed(seed, task, index)
        measured: dict[int, tuple[Prompt, str, str, int]] = {}

        def measure(size: int, index: int = index, seed_i: int = seed_i, measured: dict = measured) -> int:
            if size not in measured:
                prompt = build(index, size, seed_i)
                context, query = render(prompt, tokenizer, chat=chat)
                count = count_tokens(tokenizer, context, query)
                measured[size] = (prompt, context, query, count)
            return measured[size][3]

        try:
            hint = largest_fitting(measure, budget, hint=hint, upper=upper)
        except ConfigurationError as error:
            smallest = measure(1) + spec.tokens_to_generate
            raise ConfigurationError(
                f"{task} at --length {length}: the smallest prompt needs {smallest} tokens with this tokenizer "
                f"(including {spec.tokens_to_generate} for the answer). Use --length {smallest} or more."
            ) from error
        prompt, context, query, count = measured[hint]
        if hint == upper and not capped_warned:
            capped_warned = True
            warnings.warn(
                f"{task}: all {upper} documents of --qa_file fit in --length {length} (sample {index} has {count} "
                "prompt tokens); the prompts are shorter than the target. Use a larger dataset file.",
                stacklevel=2,
            )
        rows.append(
            {
                "index": index,
                "input_context": context,
                "input_query": query,
                "outputs": prompt.outputs,
                "task": task,
                "length": length,
                "answer_prefix": prompt.answer_prefix.lstrip() if chat else prompt.answer_prefix,
                "max_new_tokens": spec.tokens_to_generate,
                "num_prompt_tokens": count,
            }
        )
    return rows
