"""When generation stops: EOS (not emitted), stop strings (cut from the text), the token budget."""

from __future__ import annotations

import torch

from star_lightning.engine.decode import sample_loop
from star_lightning.engine.settings import GenerationSettings
from star_lightning.parallel.group import SingleHostGroup


def _scripted(tokens: list[int], vocab: int = 10):
    """Logits whose argmax follows a script, so the loop's decisions can be checked exactly."""

    def logits_for(step: int) -> torch.Tensor:
        out = torch.zeros(vocab)
        out[tokens[step]] = 5.0
        return out

    calls: list[int] = []

    def next_logits(token: int, i: int) -> torch.Tensor:
        calls.append(token)
        return logits_for(i + 1)

    return logits_for(0), next_logits, calls


def test_eos_ends_generation_and_is_not_emitted() -> None:
    first, next_logits, calls = _scripted([4, 5, 2, 7, 7])
    tokens = sample_loop(first, next_logits, SingleHostGroup(), GenerationSettings(5, eos_token_ids=frozenset({2})))
    assert tokens == [4, 5]
    assert calls == [4, 5]  # nothing is decoded after EOS


def test_budget_and_stop_check() -> None:
    first, next_logits, calls = _scripted([1, 3, 3, 3, 3, 3])
    assert sample_loop(first, next_logits, SingleHostGroup(), GenerationSettings(3)) == [1, 3, 3]
    assert len(calls) == 2  # the last token needs no forward
    first, next_logits, _ = _scripted([1, 3, 4, 3, 3])
    stop_after_4 = lambda ids: ids[-1] == 4  # noqa: E731
    assert sample_loop(first, next_logits, SingleHostGroup(), GenerationSettings(5), stop_after_4) == [1, 3, 4]


def test_stop_strings_are_cut_from_the_text(tiny_model_dir) -> None:
    from transformers import AutoTokenizer

    from star_lightning.module import StarAttentionLM

    module = StarAttentionLM(pretrained=str(tiny_model_dir), stop_strings=["\n\n", "STOP"])
    module.tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = module.tokenizer("The answer is 42.\n\nMore text", add_special_tokens=False)["input_ids"]
    assert module.decode_text(ids) == "The answer is 42."
    assert module._stop_check(ids)
    assert not module._stop_check(module.tokenizer("The answer", add_special_tokens=False)["input_ids"])
