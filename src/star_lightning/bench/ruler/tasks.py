"""The 13 RULER tasks (NVIDIA/RULER scripts/synthetic.yaml): settings, metric, generation budget, sample generator."""

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
from star_lightning.bench.ruler.words import common_words
from star_lightning.bench.ruler.words import english_words as english_words_file
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

    @property
    def several_queries(self) -> bool:
        """Whether the task defines several questions about one haystack (NIAH's keys, QA's documents)."""
        return self.kind in ("niah", "qa_squad", "qa_hotpotqa")


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

Builder = Callable[[int, int, int], Prompt]  # (context number, haystack size, sample seed) -> prompt


def sample_seed(seed: int, task: str, index: int) -> int:
    """A per-sample seed that depends only on (seed, task, index): samples are reproducible one by one."""
    return random.Random(f"{seed}/{task}/{index}").getrandbits(63)


@dataclass(frozen=True)
class Sources:
    """The files some tasks read: essays (NIAH essay haystacks), the QA dataset, RULER's english_words.json."""

    essays: Any = None
    qa_file: Any = None
    english_words: Any = None


@dataclass(frozen=True)
class _Plan:
    """How to build a task's prompts: ``build``, the largest haystack size, a QA file's document count."""

    build: Builder
    upper: int = 10_000_000
    documents: int | None = None


def _plan(
    name: str, spec: TaskSpec, tokenizer: Any, *, length: int, sources: Sources, seed: int, queries: int, contexts: int
) -> _Plan:
    """Read the task's sources once (essays, QA file, vt's sized example) and return how to build its prompts."""
    if spec.kind == "niah":
        config = spec.niah
        assert config is not None
        words = load_essay_words(sources.essays) if spec.needs_essays else None
        return _Plan(lambda context, size, s: niah.build(config, size, s, words, queries=queries))
    if spec.kind == "vt":
        example = variable_tracking.make_example(
            lambda text: count_tokens(tokenizer, text, special=False), random.Random(f"{seed}/{name}").getrandbits(63)
        )
        return _Plan(lambda context, size, s: variable_tracking.build(size, s, example))
    if spec.kind == "cwe":
        path = sources.english_words
        return _Plan(
            lambda context, size, s: word_extraction.build_cwe(size, s, length=length, english_words_path=path),
            # Without RULER's english_words.json the search stops at wonderwords' vocabulary.
            upper=len(common_words()) if path is None else 10_000_000,
        )
    if spec.kind == "fwe":
        vocab_size = word_extraction.fwe_vocabulary_size(length, spec.tokens_to_generate)
        return _Plan(lambda context, size, s: word_extraction.build_fwe(size, s, vocab_size=vocab_size))
    dataset = qa.load_squad(sources.qa_file) if spec.kind == "qa_squad" else qa.load_hotpotqa(sources.qa_file)
    needed = contexts * queries
    if needed > len(dataset.questions):
        raise ConfigurationError(
            f"{name}: --qa_file {sources.qa_file} holds {len(dataset.questions)} answerable questions, asked in file "
            f"order as RULER does; {contexts} samples x {queries} queries per context need {needed}. "
            "Lower --num_samples or --queries_per_context."
        )
    return _Plan(
        lambda context, size, s: qa.build(dataset, context * queries, size, s, queries=queries),
        documents=len(dataset.documents),
    )


@dataclass(frozen=True)
class _Rendered:
    prompt: Prompt
    context: str
    queries: list[str]
    context_tokens: int
    query_tokens: list[int]

    @property
    def longest(self) -> int:
        """Tokens of the context with its longest query: the one the budget must hold."""
        return self.context_tokens + max(self.query_tokens)


class PromptTooLong(ConfigurationError):
    """The smallest prompt of a task needs more tokens than ``--length`` (``smallest`` of them)."""

    def __init__(self, message: str, *, task: str, smallest: int) -> None:
        super().__init__(message)
        self.task, self.smallest = task, smallest


def check_queries_per_context(task: str, queries: int) -> None:
    """Several questions per context only where RULER defines several per haystack (NIAH keys, QA documents)."""
    if queries < 1:
        raise ConfigurationError(f"--queries_per_context {queries}: must be 1 or more.")
    if queries > 1 and not TASKS[task].several_queries:
        several = ", ".join(name for name, other in TASKS.items() if other.several_queries)
        raise ConfigurationError(
            f"--queries_per_context {queries}: RULER's {task} asks one question per context; several questions "
            f"about one haystack are defined for {several}. Generate {task} with --queries_per_context 1."
        )
    config = TASKS[task].niah
    if config is not None:
        niah.check_queries(config, queries, task)


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
    english_words: Any = None,
    queries_per_context: int = 1,
) -> list[dict[str, Any]]:
    """``num_samples`` contexts of ``task`` at ``length`` tokens, each asked ``queries_per_context`` questions.

    The haystack size of each context is the largest for which the context with its longest query, plus the
    task's answer budget, fits in ``length``; found by search on the real token count of the rendered prompt
    (context with the tokenizer's special tokens, query without). One row per question; with several questions
    per context, the rows carry ``context_id`` and only the first row of a context carries ``input_context``.
    """
    if task not in TASKS:
        raise ConfigurationError(f"Unknown RULER task {task!r}. Choose one of: {', '.join(TASKS)}.")
    spec = TASKS[task]
    queries = queries_per_context
    check_queries_per_context(task, queries)
    budget = length - spec.tokens_to_generate
    if budget <= 0:
        raise ConfigurationError(
            f"--length {length} leaves no room for {task}'s {spec.tokens_to_generate} answer tokens."
        )
    sources = Sources(essays, qa_file, english_words)
    plan = _plan(
        task, spec, tokenizer, length=length, sources=sources, seed=seed, queries=queries, contexts=num_samples
    )
    rows: list[dict[str, Any]] = []
    hint = 1
    for sample in range(num_samples):
        seed_i = sample_seed(seed, task, sample)
        measured: dict[int, _Rendered] = {}

        def measure(size: int, sample: int = sample, seed_i: int = seed_i, measured: dict = measured) -> int:
            if size not in measured:
                prompt = plan.build(sample, size, seed_i)
                context, queries_text = render(prompt, tokenizer, chat=chat)
                measured[size] = _Rendered(
                    prompt,
                    context,
                    queries_text,
                    count_tokens(tokenizer, context, special=True),
                    [count_tokens(tokenizer, query, special=False) for query in queries_text],
                )
            return measured[size].longest

        try:
            hint = largest_fitting(measure, budget, hint=hint, upper=plan.upper)
        except ConfigurationError:
            if measure(1) <= budget:
                raise  # not a length problem: the error names its own cause
            smallest = measure(1) + spec.tokens_to_generate
            raise PromptTooLong(
                f"{task} at --length {length}: the smallest prompt needs {smallest} tokens with this tokenizer "
                f"(including {spec.tokens_to_generate} for the answer). Use --length {smallest} or more.",
                task=task,
                smallest=smallest,
            ) from None
        if spec.kind == "cwe" and hint == plan.upper and english_words is None:
            english_words_file(None, hint + 1)  # raises: more words would fit than wonderwords has
        rendered = measured[hint]
        if plan.documents is not None and hint > plan.documents and sample == 0:
            warnings.warn(
                f"{task}: all {plan.documents} documents of --qa_file fit in --length {length}; as RULER does, they "
                f"are repeated to fill it ({hint} documents). Use a larger dataset file for distinct documents.",
                stacklevel=2,
            )
        rows.extend(_rows(task, spec, length, sample, rendered, queries))
    return rows


def _rows(task: str, spec: TaskSpec, length: int, sample: int, rendered: _Rendered, queries: int) -> list[dict]:
    rows = []
    for number, (question, query, query_tokens) in enumerate(
        zip(rendered.prompt.questions, rendered.queries, rendered.query_tokens, strict=True)
    ):
        row: dict[str, Any] = {"index": sample * queries + number}
        if queries > 1:
            row["context_id"] = f"{task}-{length}-{sample}"
        if number == 0:
            row["input_context"] = rendered.context
        row |= {
            "input_query": query,
            "question": question.query.strip(),  # the template's question half: the anchor's query (anchor_text)
            "outputs": question.outputs,
            "task": task,
            "length": length,
            "answer_prefix": question.answer_prefix,
            "max_new_tokens": spec.tokens_to_generate,
            "num_prompt_tokens": rendered.context_tokens + query_tokens,
        }
        rows.append(row)
    return rows
