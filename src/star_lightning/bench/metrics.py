"""Benchmark scores as torchmetrics metrics, so per-rank counts add up exactly across processes.

- ``StringMatchAll`` (RULER, most tasks): the fraction of references found in the prediction, averaged, x100.
- ``StringMatchPart`` (RULER qa_1/qa_2): 1 when any reference is found, averaged, x100.
- ``BabilongAccuracy`` (BABILong qa1-qa5): the official ``compare_answers``, x100: the target must be the only task
  label in the first sentence of the prediction, ignoring labels the question itself mentions.
Matching is case-insensitive substring search, as in RULER and BABILong.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric

from star_lightning.bench.babilong_labels import BABILONG_LABELS

_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f]")


def clean_prediction(prediction: str) -> str:
    """RULER's post-processing: control characters become newlines, outer whitespace goes."""
    return _CONTROL_CHARACTERS.sub("\n", prediction).strip()


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """Fraction (0-1) of ``references`` that occur in ``prediction``, ignoring case."""
    if not references:
        raise ValueError("string_match_all needs at least one reference answer")
    text = clean_prediction(prediction).lower()
    return sum(reference.lower() in text for reference in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """1.0 when any of ``references`` occurs in ``prediction`` (ignoring case), else 0.0."""
    if not references:
        raise ValueError("string_match_part needs at least one reference answer")
    text = clean_prediction(prediction).lower()
    return float(any(reference.lower() in text for reference in references))


def babilong_first_sentence(prediction: str) -> str:
    """BABILong's ``preprocess_output``: lower-case, first sentence, cut at an echoed ``<context>``/``<example>``.

    The official code then also cuts at ``'Question'`` — after lower-casing, so it never matches; published
    BABILong numbers are computed that way and so are ours.
    """
    output = prediction.lower().split(".")[0]
    output = output.split("<context>")[0]
    output = output.split("<example>")[0]
    return output.split("Question")[0]  # never matches (lower-cased): kept as the official rule has it


def babilong_correct(prediction: str, target: str, question: str, task: str) -> bool:
    """BABILong's ``compare_answers`` (babilong/metrics.py), bug for bug: it is what published numbers use.

    The target (lower-cased, not stripped) must be the only task label in the first sentence of the prediction,
    labels the question mentions not counting; a target with a comma (qa8's lists) needs all its parts and no other.
    """
    if task not in BABILONG_LABELS:
        raise ValueError(f"BABILong scoring covers {', '.join(BABILONG_LABELS)}, not {task!r}")
    output = babilong_first_sentence(prediction)
    target = target.lower()
    labels = {label.lower() for label in BABILONG_LABELS[task]}
    in_question = {label for label in labels if label in question.lower()}
    in_output = {label for label in labels if label in output} - in_question
    if "," in target and len(target) > 3:
        parts = target.split(",")
        return all(part in in_output for part in parts) and len(in_output) == len(parts)
    return target in in_output and len(in_output) == 1


class _MeanPercent(Metric):
    """Sum of per-sample scores and the sample count, reduced by summing across processes."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    score_sum: torch.Tensor
    count: torch.Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("score_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def _add(self, scores: Sequence[float]) -> None:
        self.score_sum += torch.tensor(float(sum(scores)), dtype=torch.float64, device=self.score_sum.device)
        self.count += len(scores)

    def compute(self) -> torch.Tensor:
        """Mean score x100; NaN when no sample was seen."""
        if int(self.count) == 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return 100.0 * self.score_sum / self.count


def _check_lengths(predictions: Sequence[str], references: Sequence[object]) -> None:
    if isinstance(predictions, str):
        raise TypeError("pass a list of predictions, not a single string")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")


class StringMatchAll(_MeanPercent):
    """RULER's string_match_all: mean fraction of references found in each prediction, x100."""

    def update(self, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
        _check_lengths(predictions, references)
        self._add([string_match_all(p, r) for p, r in zip(predictions, references, strict=True)])


class StringMatchPart(_MeanPercent):
    """RULER's string_match_part: share of predictions containing at least one reference, x100."""

    def update(self, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
        _check_lengths(predictions, references)
        self._add([string_match_part(p, r) for p, r in zip(predictions, references, strict=True)])


class BabilongAccuracy(_MeanPercent):
    """BABILong's accuracy for one of qa1-qa5, x100."""

    def __init__(self, task: str, **kwargs: Any) -> None:
        if task not in BABILONG_LABELS:
            raise ValueError(f"BABILong scoring covers {', '.join(BABILONG_LABELS)}, not {task!r}")
        super().__init__(**kwargs)
        self.task = task

    def update(self, predictions: Sequence[str], targets: Sequence[str], questions: Sequence[str]) -> None:
        _check_lengths(predictions, targets)
        _check_lengths(predictions, questions)
        self._add(
            [
                float(babilong_correct(p, t, q, self.task))
                for p, t, q in zip(predictions, targets, questions, strict=True)
            ]
        )


RULER_METRICS: dict[str, type[_MeanPercent]] = {"match_all": StringMatchAll, "match_part": StringMatchPart}
