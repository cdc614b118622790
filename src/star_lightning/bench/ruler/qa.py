"""Question answering over real documents (qa_1: SQuAD, qa_2: HotpotQA) with distractor documents.

Documents come from the dataset file the user points to with ``--qa_file`` (SQuAD v2 dev json for qa_1,
HotpotQA dev distractor json for qa_2). The haystack size is the number of documents.
"""

from __future__ import annotations

import json
import pathlib
import random
from dataclasses import dataclass

from star_lightning.bench.ruler import prompts
from star_lightning.errors import ConfigurationError


@dataclass(frozen=True)
class QuestionItem:
    """A question, its answers and the indices of the documents that hold the answer."""

    question: str
    answers: list[str]
    gold_documents: list[int]


@dataclass(frozen=True)
class QaDataset:
    """All unique documents of the file and its answerable questions."""

    documents: list[str]
    questions: list[QuestionItem]


def _load_json(path: str | pathlib.Path | None, task: str, expected: str) -> object:
    if path is None:
        option = "--squad" if task == "qa_1" else "--hotpotqa"
        raise ConfigurationError(f"Task {task} needs documents: pass {option} PATH or --qa_file PATH ({expected}).")
    source = pathlib.Path(path)
    if not source.is_file():
        raise ConfigurationError(f"--qa_file {source}: no such file ({task} needs {expected}).")
    try:
        return json.loads(source.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConfigurationError(f"--qa_file {source}: not valid JSON ({error.msg}).") from error


def load_squad(path: str | pathlib.Path | None) -> QaDataset:
    """SQuAD layout: ``{"data": [{"paragraphs": [{"context", "qas": [{"question", "answers", ...}]}]}]}``."""
    data = _load_json(path, "qa_1", "the SQuAD v2 dev json")
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ConfigurationError(f'--qa_file {path}: qa_1 expects the SQuAD layout {{"data": [...paragraphs...]}}.')
    documents: list[str] = []
    index_of: dict[str, int] = {}
    questions: list[QuestionItem] = []
    for article in data["data"]:
        for paragraph in article.get("paragraphs", []):
            text = paragraph["context"]
            if text not in index_of:
                index_of[text] = len(documents)
                documents.append(text)
            for qa in paragraph.get("qas", []):
                answers = [answer["text"] for answer in qa.get("answers", [])]
                if qa.get("is_impossible") or not answers:
                    continue
                questions.append(QuestionItem(qa["question"], answers, [index_of[text]]))
    return _checked(QaDataset(documents, questions), path)


def load_hotpotqa(path: str | pathlib.Path | None) -> QaDataset:
    """HotpotQA layout: a list of ``{"question", "answer", "context": [[title, [sentences]], ...]}``."""
    data = _load_json(path, "qa_2", "the HotpotQA dev distractor json")
    if not isinstance(data, list) or (data and not isinstance(data[0], dict)) or (data and "context" not in data[0]):
        raise ConfigurationError(f"--qa_file {path}: qa_2 expects the HotpotQA layout (a list of question objects).")
    documents: list[str] = []
    index_of: dict[str, int] = {}
    questions: list[QuestionItem] = []
    for item in data:
        gold = []
        for title, sentences in item["context"]:
            text = f"{title}\n{''.join(sentences)}"
            if text not in index_of:
                index_of[text] = len(documents)
                documents.append(text)
            gold.append(index_of[text])
        questions.append(QuestionItem(item["question"], [item["answer"]], gold))
    return _checked(QaDataset(documents, questions), path)


def _checked(dataset: QaDataset, path: object) -> QaDataset:
    if not dataset.questions:
        raise ConfigurationError(f"--qa_file {path}: no answerable questions found.")
    return dataset


def build(dataset: QaDataset, question_index: int, size: int, seed: int) -> prompts.Prompt:
    """``size`` documents: the question's own documents plus random distractors, shuffled."""
    rng = random.Random(seed)
    item = dataset.questions[question_index % len(dataset.questions)]
    count = max(size, len(item.gold_documents))
    chosen = list(item.gold_documents)
    if count >= len(dataset.documents):
        chosen = list(range(len(dataset.documents)))
    else:
        gold = set(item.gold_documents)
        others = [index for index in range(len(dataset.documents)) if index not in gold]
        chosen += rng.sample(others, count - len(chosen))
    rng.shuffle(chosen)
    documents = "\n\n".join(
        prompts.QA_DOCUMENT.format(index=i + 1, document=dataset.documents[doc]) for i, doc in enumerate(chosen)
    )
    return prompts.Prompt(
        context=prompts.QA_CONTEXT.format(context=documents),
        query=prompts.QA_QUERY.format(query=item.question),
        answer_prefix=prompts.QA_ANSWER_PREFIX,
        outputs=item.answers,
    )
