"""RULER's prompt templates, verbatim, and the split of a prompt into Star Attention's context and query.

Each task template is cut in two right after ``{context}`` (the haystack): the ``context`` half is the
instruction plus the haystack (encoded blockwise in Phase 1), the ``query`` half is the question, to which the
answer prefix is appended (encoded with global attention in Phase 2). Joined, the halves are RULER's prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from star_lightning.tokens import context_ids, query_ids


@dataclass(frozen=True)
class TaskTemplate:
    """RULER's ``template`` and ``answer_prefix`` of one task; the prompt is ``template + answer_prefix``."""

    template: str
    answer_prefix: str

    def halves(self) -> tuple[str, str]:
        """``(context part, query part)`` of the template, cut right after ``{context}``."""
        cut = self.template.index("{context}") + len("{context}")
        return self.template[:cut], self.template[cut:]


# Verbatim from NVIDIA/RULER scripts/data/synthetic/constants.py (TASKS[...]['template'] and ['answer_prefix']).
NIAH = TaskTemplate(
    template="""Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic {type_needle_v} for {query} mentioned in the provided text?""",  # noqa: E501
    answer_prefix=""" The special magic {type_needle_v} for {query} mentioned in the provided text are""",
)
VARIABLE_TRACKING = TaskTemplate(
    template="""Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\nQuestion: Find all variables that are assigned the value {query} in the text above.""",  # noqa: E501
    answer_prefix=""" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assigned the value {query}, they are: """,  # noqa: E501
)
COMMON_WORDS_EXTRACTION = TaskTemplate(
    template="""Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?""",  # noqa: E501
    answer_prefix=""" Answer: The top 10 words that appear most often in the list are:""",
)
FREQ_WORDS_EXTRACTION = TaskTemplate(
    template="""Read the following coded text and track the frequency of each coded word. Find the three most frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most frequently appeared words in the above coded text?""",  # noqa: E501
    answer_prefix=""" Answer: According to the coded text above, the three most frequently appeared words are:""",
)
QA = TaskTemplate(
    template="""Answer the question based on the given documents. Only give me the answer and do not output any other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}""",  # noqa: E501
    answer_prefix=""" Answer:""",
)

# NVIDIA/RULER scripts/data/synthetic/niah.py: the needle sentence, and the noise haystack (also variable_tracking.py).
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
# NVIDIA/RULER scripts/data/synthetic/qa.py
DOCUMENT_PROMPT = "Document {i}:\n{document}"

SPLIT_MARK = "<<<star-lightning: context ends here>>>"


def singular(text: str) -> str:
    """RULER's NIAH wording for a single answer (niah.py, applied to template and answer prefix alike)."""
    return text.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")


@dataclass(frozen=True)
class Question:
    """One question about a context: the query text, the answer prefix that ends the prompt, the references."""

    query: str
    answer_prefix: str
    outputs: list[str]


@dataclass(frozen=True)
class Prompt:
    """One task instance before tokenizer formatting: a context and the questions asked about it (usually one)."""

    context: str
    questions: list[Question]
    extra: dict[str, Any] = field(default_factory=dict)


def fill(template: TaskTemplate, context: str, **values: Any) -> tuple[str, Question]:
    """Format both halves of ``template``; returns the context and a question without references yet."""
    context_part, query_part = template.halves()
    return (
        context_part.format(context=context, **values),
        Question(query_part.format(**values), template.answer_prefix.format(**values), []),
    )


def render(prompt: Prompt, tokenizer: Any, *, chat: bool) -> tuple[str, list[str]]:
    """Return ``(input_context, [input_query per question])`` as the model will see them.

    Without chat formatting the halves are RULER's plain prompt, the answer prefix ending each query. With chat
    formatting the whole prompt is one user turn rendered by the tokenizer's template, split at the end of the
    haystack (a marker locates it), and the answer prefix follows the assistant header as RULER appends it. The
    context keeps a BOS the template writes (``predict`` adds no second one: :mod:`star_lightning.tokens`).
    """
    if not chat:
        return prompt.context, [question.query + question.answer_prefix for question in prompt.questions]
    contexts, queries = set(), []
    for question in prompt.questions:
        messages = [{"role": "user", "content": prompt.context + SPLIT_MARK + question.query}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if not isinstance(rendered, str) or rendered.count(SPLIT_MARK) != 1:
            raise ValueError("The tokenizer's chat template altered the prompt so the context/query split was lost.")
        context, query = rendered.split(SPLIT_MARK)
        contexts.add(context)
        queries.append(query + question.answer_prefix)
    if len(contexts) != 1:
        raise ValueError("The tokenizer's chat template renders the shared context differently for each question.")
    (context,) = contexts
    return context, queries


def count_tokens(tokenizer: Any, text: str, *, special: bool) -> int:
    """Token count as ``predict`` tokenizes: the context with special tokens (BOS, never twice), a query without."""
    return len(context_ids(tokenizer, text) if special else query_ids(tokenizer, text))
