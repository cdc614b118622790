"""RULER's prompt wording, and the split of a prompt into Star Attention's context and query.

Each template is cut in two where the haystack ends: ``context`` is the instruction plus the haystack (encoded
blockwise in Phase 1), ``query`` the question and answer prefix (encoded with global attention in Phase 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

NOISE_SENTENCES = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_v} for {key} is: {value}."

NIAH_CONTEXT = (
    "Some special magic {type_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_v} afterwards.\n{context}"
)
NIAH_QUERY = "\nWhat are all the special magic {type_v} for {query} mentioned in the provided text?"
NIAH_ANSWER_PREFIX = " The special magic {type_v} for {query} mentioned in the provided text are"

VT_CONTEXT = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}"
VT_QUERY = "\nQuestion: Find all variables that are assigned the value {query} in the text above."
VT_ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
    "assgined the value {query}, they are: "
)

CWE_CONTEXT = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}"
)
CWE_QUERY = "\nQuestion: What are the 10 most common words in the above list?"
CWE_ANSWER_PREFIX = " Answer: The top 10 words that appear most often in the list are:"

FWE_CONTEXT = (
    "Read the following coded text and track the frequency of each coded word. "
    "Find the three most frequently appeared coded words. {context}"
)
FWE_QUERY = (
    "\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
FWE_ANSWER_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"

QA_INSTRUCTION = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other words."
)
QA_CONTEXT = QA_INSTRUCTION + "\n\nThe following are given documents.\n\n{context}"
QA_QUERY = "\n\n" + QA_INSTRUCTION + "\n\nQuestion: {query}"
QA_ANSWER_PREFIX = " Answer:"
QA_DOCUMENT = "Document {index}:\n{document}"

SPLIT_MARK = "<<<star-lightning: context ends here>>>"


@dataclass(frozen=True)
class Prompt:
    """One task instance before tokenizer formatting: the prompt halves and the reference answers."""

    context: str
    query: str
    answer_prefix: str
    outputs: list[str]
    extra: dict[str, Any] = field(default_factory=dict)


def render(prompt: Prompt, tokenizer: Any, *, chat: bool) -> tuple[str, str]:
    """Return ``(input_context, input_query)`` as the model will see them.

    Without chat formatting the halves are the plain prompt; the answer prefix ends the query. With chat
    formatting the whole prompt is one user turn rendered by the tokenizer's template, split at the end of the
    haystack (a marker locates it), and the answer prefix follows the assistant header. A leading BOS written by
    the template is removed so that tokenizing the context with special tokens adds exactly one.
    """
    if not chat:
        return prompt.context, prompt.query + prompt.answer_prefix
    messages = [{"role": "user", "content": prompt.context + SPLIT_MARK + prompt.query}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(rendered, str) or rendered.count(SPLIT_MARK) != 1:
        raise ValueError("The tokenizer's chat template altered the prompt so the context/query split was lost.")
    context, query = rendered.split(SPLIT_MARK)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and context.startswith(bos):
        context = context[len(bos) :]
    return context, query + prompt.answer_prefix.lstrip()


def count_tokens(tokenizer: Any, context: str, query: str) -> int:
    """Prompt length as ``predict`` tokenizes it: the context with special tokens (BOS), the query without."""
    context_ids = tokenizer(context, add_special_tokens=True, verbose=False)["input_ids"]
    query_ids = tokenizer(query, add_special_tokens=False, verbose=False)["input_ids"]
    return len(context_ids) + len(query_ids)
