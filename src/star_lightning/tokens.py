"""How a request becomes token ids: the context with the tokenizer's special tokens (its BOS), the query without.

A context that already begins with the BOS text (a chat-template prompt such as Llama-3's or SmolLM2's, the
reference implementation's prepared files) is not given a second BOS. ``predict``, its length check before any
weights load, and ``generate``'s token budget all count tokens through these functions, so they agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from star_lightning.data.jsonl import TOKENS_FIELD


def without_second_bos(tokenizer: Any, text: str, ids: list[int]) -> list[int]:
    """``ids`` (the context tokenized with special tokens) without the BOS the tokenizer added in front of a text
    that already begins with one."""
    bos_text, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    if bos_text and bos_id is not None and text.startswith(bos_text) and ids[:2] == [bos_id, bos_id]:
        return ids[1:]
    return ids


def context_ids(tokenizer: Any, text: str) -> list[int]:
    return without_second_bos(tokenizer, text, tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"])


def query_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def request_tensors(tokenizer: Any, request: dict[str, Any]) -> tuple[Any, Any]:
    """A request's ``(context [1, T], query [1, Lq])`` token ids as int64 tensors on the CPU."""
    import torch

    return (torch.tensor([context_ids(tokenizer, request["input_context"])], dtype=torch.long),
            torch.tensor([query_ids(tokenizer, request["input_query"])], dtype=torch.long))  # fmt: skip


class RequestEncoder:
    """Tokenizes a request in the data loader's worker, so the next request's context is tokenized while this one
    runs on the GPU (an 8K context: ~10-20 ms a request for Qwen2.5's tokenizer, outside the phases). Adds
    ``TOKENS_FIELD``: :func:`request_tensors`, as ``predict_step`` makes them otherwise. A request that fails here is
    passed on as it came: the main process tokenizes it again and reports the problem in its own one line."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            tokens = request_tensors(self.tokenizer, request)
        except Exception:  # reported where the main process tokenizes it again, with the request's index
            return request
        return {**request, TOKENS_FIELD: tokens}


def batch_lengths(tokenizer: Any, contexts: Sequence[str], queries: Sequence[str]) -> list[tuple[int, int]]:
    """``(context tokens, query tokens)`` of many requests at once (the fast tokenizer's batch path)."""
    options: dict[str, Any] = {"return_attention_mask": False, "return_token_type_ids": False, "verbose": False}
    context_tokens = tokenizer(list(contexts), add_special_tokens=True, **options)["input_ids"]
    query_tokens = tokenizer(list(queries), add_special_tokens=False, **options)["input_ids"]
    return [
        (len(without_second_bos(tokenizer, text, ids)), len(query))
        for text, ids, query in zip(contexts, context_tokens, query_tokens, strict=True)
    ]


# Characters per token assumed for the first prefix (English text is ~4; each further try takes 4x as many), and the
# fewest characters it takes: a shorter text is counted whole (milliseconds), for the exact count in messages.
_FIRST_CHARS_PER_TOKEN = 4
_FIRST_PREFIX_CHARS = 2**16
# Tokens the cut at the end of a prefix may add (a word tokenized in part): a prefix's count minus these is a lower
# bound on the whole text's.
_CUT_MARGIN = 8


def context_tokens_beyond(tokenizer: Any, text: str, limit: int) -> tuple[int, int] | None:
    """``(tokens, characters)`` when ``text`` holds more than ``limit`` tokens for sure: ``tokens`` (above ``limit``)
    is a lower bound, found by tokenizing only its first ``characters``; None when it may hold ``limit`` or fewer
    (count it all). So a 20 MB context is refused after tokenizing a few times ``limit`` tokens' worth, not all of it.

    Prefixes grow 4x at a time from ``4 x limit`` characters (64K at least), each cut at a whitespace (where
    tokenizers split), so a tokenizer that keeps every character finds the bound within a few tries."""
    characters = max((limit + _CUT_MARGIN) * _FIRST_CHARS_PER_TOKEN, _FIRST_PREFIX_CHARS)
    while characters < len(text):
        prefix = text[:characters]
        cut = max(prefix.rfind(" "), prefix.rfind("\n"))
        prefix = prefix[:cut] if cut > characters // 2 else prefix
        tokens = len(context_ids(tokenizer, prefix)) - _CUT_MARGIN
        if tokens > limit:
            return tokens, len(prefix)
        characters *= 4
    return None
