"""Metrics against hand-computed values: RULER's string match (all / part) and BABILong's rule."""

from __future__ import annotations

import math

import pytest
import torch

from star_lightning.bench.metrics import (
    BABILONG_LABELS,
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


# booydar/babilong babilong/metrics.py TASK_LABELS (qa1-qa5), copied.
OFFICIAL_LABELS = {
    "qa1": ["bathroom", "bedroom", "garden", "hallway", "kitchen", "office"],
    "qa2": ["bathroom", "bedroom", "garden", "hallway", "kitchen", "office"],
    "qa3": ["bathroom", "bedroom", "garden", "hallway", "kitchen", "office"],
    "qa4": ["bathroom", "bedroom", "garden", "hallway", "kitchen", "office"],
    "qa5": ["Bill", "Fred", "Jeff", "Mary", "apple", "football", "milk"],
}


def official_compare_answers(target: str, output: str, question: str, task_labels: list[str]) -> bool:
    """The behaviour of booydar/babilong babilong/metrics.py ``compare_answers``, restated step by step."""
    output = output.lower()
    for separator in (".", "<context>", "<example>", "Question"):  # 'Question' after lower(): never found
        output = output.split(separator)[0]
    labels = {label.lower() for label in task_labels}
    named = {label for label in labels if label in question.lower()}
    found = {label for label in labels if label in output} - named
    target = target.lower()
    if "," in target and len(target) > 3:
        parts = target.split(",")
        return all(part in found for part in parts) and len(found) == len(parts)
    return target in found and len(found) == 1


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
        ("Fred", "Fred", "Who did Mary give the apple to?", "qa5", True),  # the target is lower-cased
        ("apple <example> milk", "apple", "What did Fred give to Bill?", "qa5", True),
        ("The answer. milk", "milk", "What did Jeff take?", "qa5", False),  # only the first sentence counts
        # Where the official rule differs from the one this project used before (split on 'question', strip):
        ("office question: where is the kitchen", "office", "Where is Mary?", "qa1", False),  # 'Question' never cuts
        ("bathroom\nQuestion: is it the garden", "bathroom", "Where is Daniel?", "qa1", False),
        ("hallway", " hallway", "Where is John?", "qa1", False),  # the target is not stripped
        ("hallway", "hallway\n", "Where is John?", "qa1", False),
        ("milk and apple", "apple,milk", "What is Mary carrying?", "qa5", True),  # qa8's list rule applies
        ("apple", "apple,milk", "What is Mary carrying?", "qa5", False),
        ("apple, milk and football", "apple,milk", "What is Mary carrying?", "qa5", False),
        ("The office", "office", "Is it the bedroom or the office?", "qa1", False),  # the question names it
        ("Bill gave it to Fred", "fred", "What did Bill give?", "qa5", True),
    ],
)  # fmt: skip
def test_babilong_rule_is_the_official_compare_answers(
    prediction: str, target: str, question: str, task: str, correct: bool
) -> None:
    assert official_compare_answers(target, prediction, question, OFFICIAL_LABELS[task]) is correct
    assert babilong_correct(prediction, target, question, task) is correct


def test_babilong_labels_are_the_official_ones() -> None:
    assert {task: list(labels) for task, labels in BABILONG_LABELS.items()} == OFFICIAL_LABELS


def test_babilong_metric() -> None:
    metric = BabilongAccuracy("qa1")
    metric.update(["kitchen", "garden", "office."], ["kitchen", "kitchen", "office"], ["Where is A?"] * 3)
    torch.testing.assert_close(metric.compute().item(), 200 / 3)
    with pytest.raises(ValueError, match="qa1"):
        BabilongAccuracy("qa9")
