"""Metrics against hand-computed values: RULER's string match (all / part) and BABILong's rule."""

from __future__ import annotations

import math

import pytest
import torch

from star_lightning.bench.metrics import (
    BabilongAccuracy,
    StringMatchAll,
    StringMatchPart,
    babilong_correct,
    string_match_all,
    string_match_part,
)

PREDICTIONS = ["The numbers are 123 and 456.", "I only recall 456", "nothing here", "ANSWER: Paris\x07"]
REFERENCES = [["123", "456"], ["123", "456", "789"], ["42"], ["paris", "France"]]


def test_string_match_functions() -> None:
    assert [string_match_all(p, r) for p, r in zip(PREDICTIONS, REFERENCES, strict=True)] == [1.0, 1 / 3, 0.0, 0.5]
    assert [string_match_part(p, r) for p, r in zip(PREDICTIONS, REFERENCES, strict=True)] == [1.0, 1.0, 0.0, 1.0]


def test_metric_classes_accumulate_over_updates() -> None:
    match_all, match_part = StringMatchAll(), StringMatchPart()
    match_all.update(PREDICTIONS[:2], REFERENCES[:2])
    match_all.update(PREDICTIONS[2:], REFERENCES[2:])
    match_part.update(PREDICTIONS, REFERENCES)
    torch.testing.assert_close(match_all.compute().item(), 100 * (1 + 1 / 3 + 0 + 0.5) / 4)
    torch.testing.assert_close(match_part.compute().item(), 75.0)
    match_all.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(match_all.compute().item())


def test_metric_input_checks() -> None:
    with pytest.raises(ValueError, match="2 predictions but 1"):
        StringMatchAll().update(["a", "b"], [["a"]])
    with pytest.raises(TypeError, match="list of predictions"):
        StringMatchAll().update("a", [["a"]])
    with pytest.raises(ValueError, match="at least one reference"):
        string_match_all("a", [])


@pytest.mark.parametrize(
    ("prediction", "target", "question", "task", "correct"),
    [
        ("The most recent location of Mary is kitchen.", "kitchen", "Where is Mary?", "qa1", True),
        ("Kitchen", "kitchen", "Where is Mary?", "qa1", True),
        ("Mary is in the kitchen or the garden.", "kitchen", "Where is Mary?", "qa1", False),  # two answers
        ("The most recent location is hallway. Earlier: kitchen.", "hallway", "Where is John?", "qa1", True),
        ("Before the kitchen the apple was in the bathroom.", "bathroom", "Where was the apple before the kitchen?",
         "qa3", True),  # labels named in the question do not count
        ("bedroom", "garden", "What is the bedroom west of?", "qa4", False),
        ("Fred", "fred", "Who did Mary give the apple to?", "qa5", True),
        ("apple <example> milk", "apple", "What did Fred give to Bill?", "qa5", True),
        ("The answer. milk", "milk", "What did Jeff take?", "qa5", False),  # only the first sentence counts
    ],
)  # fmt: skip
def test_babilong_rule(prediction: str, target: str, question: str, task: str, correct: bool) -> None:
    assert babilong_correct(prediction, target, question, task) is correct


def test_babilong_metric() -> None:
    metric = BabilongAccuracy("qa1")
    metric.update(["kitchen", "garden", "office."], ["kitchen", "kitchen", "office"], ["Where is A?"] * 3)
    torch.testing.assert_close(metric.compute().item(), 200 / 3)
    with pytest.raises(ValueError, match="qa1"):
        BabilongAccuracy("qa9")
