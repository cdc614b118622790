"""Question answering over real documents (qa_1: SQuAD, qa_2: HotpotQA) with distractor documents.

Follows NVIDIA/RULER scripts/data/synthetic/qa.py. Documents come from the dataset file the user points to with
``--qa_file`` (SQuAD v2 dev json for qa_1, HotpotQA dev distractor json for qa_2); the documents are the file's
unique paragraphs in sorted order, the questions are asked in file order (sample ``i`` asks question ``i``). The
haystack size is the number of documents: the question's own, then (SQuAD) the other paragraphs of the same
article, then random others; when the size reaches the file's document count, all documents repeated.

Several questions about one context (``generate --queries_per_context K``): context ``i`` asks questions
``iK .. iK+K-1`` (in SQuAD consecutive questions mostly share a paragraph), over the union of their documents.
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
    """A question, its answers, the documents that hold the answer and (SQuAD) its article's other paragraphs."""

    question: str
    answers: list[str]
    gold_documents: list[int]
    article_documents: list[int]


@dataclass(frozen=True)
class QaDataset:
    """All unique documents of the file (sorted) and its answerable questions in file order."""

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
    articles = [article.get("paragraphs", []) for article in data["data"]]
    documents = sorted({paragraph["context"] for paragraphs in articles for paragraph in paragraphs})
    index_of = {text: number for number, text in enumerate(documents)}
    questions: list[QuestionItem] = []
    for paragraphs in articles:
        article_documents = list(dict.fromkeys(index_of[paragraph["context"]] for paragraph in paragraphs))
        for paragraph in paragraphs:
            own = index_of[paragraph["context"]]
            for qa in paragraph.get("qas", []):
                answers = [answer["text"] for answer in qa.get("answers", [])]
                if qa.get("is_impossible") or not answers:
                    continue
                others = [number for number in article_documents if number != own]
                questions.append(QuestionItem(qa["question"], answers, [own], others))
    return _checked(QaDataset(documents, questions), path)


def load_hotpotqa(path: str | pathlib.Path | None) -> QaDataset:
    """HotpotQA layout: a list of ``{"question", "answer", "context": [[title, [sentences]], ...]}``."""
    data = _load_json(path, "qa_2", "the HotpotQA dev distractor json")
    if not isinstance(data, list) or (data and not isinstance(data[0], dict)) or (data and "context" not in data[0]):
        raise ConfigurationError(f"--qa_file {path}: qa_2 expects the HotpotQA layout (a list of question objects).")
    documents = sorted({f"{title}\n{''.join(sentences)}" for item in data for title, sentences in item["context"]})
    index_of = {text: number for number, text in enumerate(documents)}
    questions = [
        QuestionItem(
            item["question"],
            [item["answer"]],
            [index_of[f"{title}\n{''.join(sentences)}"] for title, sentences in item["context"]],
            [],
        )
        for item in data
    ]
    return _checked(QaDataset(documents, questions), path)


def _checked(dataset: QaDataset, path: object) -> QaDataset:
    if not dataset.questions:
        raise ConfigurationError(f"--qa_file {path}: no answerable questions found.")
    return dataset


def _documents(dataset: QaDataset, items: list[QuestionItem], size: int, rng: random.Random) -> list[int]:
    """RULER's choice of ``size`` documents: the questions' own, the same article's, then random others."""
    gold = list(dict.fromkeys(number for item in items for number in item.gold_documents))
    more = [number for item in items for number in item.article_documents if number not in gold]
    more = list(dict.fromkeys(more))
    count = max(size, len(gold))
    if count >= len(dataset.documents):
        repeats = -(-count // len(dataset.documents))
        return (list(range(len(dataset.documents))) * repeats)[:count]
    if count - len(gold) > len(more):
        taken = set(gold) | set(more)
        others = [number for number in range(len(dataset.documents)) if number not in taken]
        return gold + more + rng.sample(others, count - len(gold) - len(more))
    return gold + rng.sample(more, count - len(gold))


def build(dataset: QaDataset, first_question: int, size: int, seed: int, *, queries: int = 1) -> prompts.Prompt:
    """``size`` documents (at least the questions' own), shuffled, and questions ``first_question ..`` about them."""
    rng = random.Random(seed)
    items = dataset.questions[first_question : first_question + queries]
    chosen = _documents(dataset, items, size, rng)
    rng.shuffle(chosen)
    documents = "\n\n".join(
        prompts.DOCUMENT_PROMPT.format(i=i + 1, document=dataset.documents[doc]) for i, doc in enumerate(chosen)
    )
    context = ""
    questions = []
    for item in items:
        context, question = prompts.fill(prompts.QA, documents, query=item.question)
        questions.append(prompts.Question(question.query, question.answer_prefix, item.answers))
    return prompts.Prompt(context=context, questions=questions)
