"""The text ``--model.anchor_query`` puts after the anchor: the request's question, not the opening of its answer.

A request's ``input_query`` is what the model reads before answering: for a chat model it ends the user turn, opens
the assistant turn and starts the answer (``...text?<|im_end|>\\n<|im_start|>assistant\\n The special magic number
for X is``). Encoded after the anchor, that tail makes every block look like the assistant's answer; what a block
should be encoded knowing is the question. So the anchor's query is, in this order:

1. ``question`` (form ``question``): the field ``generate`` writes for every RULER and BABILong request (the task's
   question text from its own template, without chat markers or answer prefix);
2. else ``input_query`` stripped (form ``input_query_stripped``): first the answer prefix (the request's
   ``answer_prefix`` field; else, for a RULER task, its template's answer prefix, whose ``{fields}`` match any
   text), then the chat template's end of the user turn and generation prompt. That tail is learned from the
   tokenizer itself: its chat template rendered for one user message holding a marker, with and without
   ``add_generation_prompt``; what follows the marker in the rendering with it is the tail (``<|im_end|>\\n
   <|im_start|>assistant\\n`` for Qwen and SmolLM2). A query that does not end with the tail but holds the
   generation prompt inside cannot be cut safely and is refused (:class:`ConfigurationError`, one line); so is a
   request whose ``answer_prefix`` is not the end of its query. A query with no chat markers is used as it is.

``predict`` checks every request before weights load and records the form (``anchor_query_form`` in the run
record).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from star_lightning.errors import ConfigurationError

QUESTION = "question"
STRIPPED = "input_query_stripped"
_MARKER = "\ue000star-lightning-question\ue000"


def chat_tail(tokenizer: Any) -> tuple[str, str] | None:
    """``(tail, generation prompt)`` of the tokenizer's chat template: ``tail`` is what follows a user message's
    text up to the assistant's first token (end of turn + generation prompt); None without a chat template.
    Raises :class:`ConfigurationError` when the template does not render a plain user message."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "user", "content": _MARKER}]
    try:
        with_prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        without = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    except Exception as error:  # a template may raise anything (jinja's TemplateError, a raise_exception call)
        raise ConfigurationError(
            f"--model.anchor_query: the tokenizer's chat template does not render a user message ({error}), so the "
            "question cannot be cut out of input_query; give each request a 'question' field (generate writes it)"
        ) from None
    if not (isinstance(with_prompt, str) and isinstance(without, str)) or with_prompt.count(_MARKER) != 1:
        raise ConfigurationError(
            "--model.anchor_query: the tokenizer's chat template hides the user's text, so the question cannot be "
            "cut out of input_query; give each request a 'question' field (generate writes it)"
        )
    tail = with_prompt.split(_MARKER, 1)[1]
    generation_prompt = with_prompt[len(without) :] if with_prompt.startswith(without) else ""
    return tail, generation_prompt


def _template_prefix(task: str | None, query: str) -> str | None:
    """The RULER task's answer prefix at the end of ``query`` (its template's ``{fields}`` matching any text)."""
    from star_lightning.bench.ruler.tasks import TASKS

    spec = TASKS.get(task or "")
    if spec is None:
        return None
    template = _answer_prefix_template(spec)
    candidates = {template, _singular(template)}
    for candidate in candidates:
        pattern = "".join(
            "(.*?)" if piece.startswith("{") else re.escape(piece) for piece in re.split(r"(\{\w+\})", candidate)
        )
        match = re.search(pattern + r"\Z", query, flags=re.DOTALL)
        if match:
            return match.group(0)
    return None


def _answer_prefix_template(spec: Any) -> str:
    from star_lightning.bench.ruler import prompts

    return {
        "niah": prompts.NIAH,
        "vt": prompts.VARIABLE_TRACKING,
        "cwe": prompts.COMMON_WORDS_EXTRACTION,
        "fwe": prompts.FREQ_WORDS_EXTRACTION,
        "qa_squad": prompts.QA,
        "qa_hotpotqa": prompts.QA,
    }[spec.kind].answer_prefix


def _singular(text: str) -> str:
    from star_lightning.bench.ruler.prompts import singular

    return singular(text)


def stripped_query(request: dict[str, Any], tail: tuple[str, str] | None) -> str:
    """``input_query`` without its answer prefix and the chat template's end of turn and generation prompt."""
    query, where = request["input_query"], f"request {request.get('index')}"
    prefix = request.get("answer_prefix")
    if isinstance(prefix, str) and prefix:
        if not query.endswith(prefix):
            raise ConfigurationError(
                f"--model.anchor_query: {where}: its answer_prefix {prefix[:40]!r} is not the end of its input_query, "
                "so the question cannot be cut out; give the request a 'question' field or fix answer_prefix"
            )
        query = query[: -len(prefix)]
    elif prefix is None:
        found = _template_prefix(request.get("task"), query)
        query = query[: len(query) - len(found)] if found else query
    if tail is not None:
        end, generation_prompt = tail
        if end and query.endswith(end):
            query = query[: -len(end)]
        elif generation_prompt.strip() and generation_prompt.strip() in query:
            raise ConfigurationError(
                f"--model.anchor_query: {where}: its input_query holds the chat template's generation prompt "
                f"{generation_prompt.strip()!r} but does not end with it (after the answer prefix), so the question "
                "cannot be cut out; give the request a 'question' field (generate writes it)"
            )
    text = query.strip()
    if not text:
        raise ConfigurationError(
            f"--model.anchor_query: {where}: nothing is left of input_query once the chat template's generation "
            "prompt and the answer prefix are cut; give the request a non-empty 'question' field"
        )
    return text


def anchor_query_text(request: dict[str, Any], tokenizer: Any) -> str:
    """The text that follows the anchor for this request (see the module docstring)."""
    question = request.get("question")
    if isinstance(question, str) and question.strip():
        return question
    return stripped_query(request, chat_tail(tokenizer))


def anchor_query_form(requests: Iterable[dict[str, Any]]) -> str:
    """``question``, ``input_query_stripped``, or both joined by ``+`` when a file mixes them (for the run record)."""
    forms = {QUESTION if isinstance(r.get("question"), str) and r["question"].strip() else STRIPPED for r in requests}
    return "+".join(sorted(forms, key=[QUESTION, STRIPPED].index)) or QUESTION


def check_anchor_texts(requests: Iterable[dict[str, Any]], tokenizer: Any) -> None:
    """Refuse (one line) the first request whose anchor text cannot be found; before any weights load."""
    needed = [r for r in requests if not (isinstance(r.get("question"), str) and r["question"].strip())]
    if needed:
        tail = chat_tail(tokenizer)
        for request in needed:
            stripped_query(request, tail)


def anchor_query_ids(tokenizer: Any, request: dict[str, Any], enabled: bool, device: Any) -> Any:
    """The anchor's query as ids ``[1, Q]`` on ``device`` (tokenized as a query: no special tokens); None when
    ``--model.anchor_query`` is off."""
    if not enabled:
        return None
    import torch

    from star_lightning.tokens import query_ids

    ids = query_ids(tokenizer, anchor_query_text(request, tokenizer))
    if not ids:
        raise ConfigurationError(f"request {request.get('index')}: the anchor's question encodes to no tokens")
    return torch.tensor([ids], device=device)  # [1, Q]
