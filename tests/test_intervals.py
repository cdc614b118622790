"""Intervals against known cases: Wilson's closed form (published values), the bootstrap against the normal
approximation on a large sample, and the paired share of dense against its degenerate and delta-method cases."""

from __future__ import annotations

import math
import random

import pytest

from star_lightning.bench.intervals import score_interval, share_of_dense, wilson


@pytest.mark.parametrize(
    ("successes", "n", "low", "high"),
    [
        (8, 10, 0.4902, 0.9433),  # Newcombe (1998), Table I / the Wilson interval's textbook example
        (0, 10, 0.0, 0.2775),
        (10, 10, 0.7225, 1.0),
        (50, 100, 0.4038, 0.5962),
    ],
)
def test_wilson_matches_published_values(successes: int, n: int, low: float, high: float) -> None:
    interval = wilson(successes, n)
    assert interval.value == successes / n
    assert interval.low == pytest.approx(low, abs=1e-4)
    assert interval.high == pytest.approx(high, abs=1e-4)


def test_binary_scores_take_wilson_and_fractions_the_bootstrap() -> None:
    assert score_interval([1.0] * 8 + [0.0] * 2).method == "wilson"
    rng = random.Random(1)
    scores = [rng.choice([0.0, 0.5, 1.0, 1 / 3]) for _ in range(400)]
    interval = score_interval(scores)
    assert interval.method == "bootstrap"
    mean = sum(scores) / len(scores)
    sd = math.sqrt(sum((s - mean) ** 2 for s in scores) / (len(scores) - 1))
    half = 1.96 * sd / math.sqrt(len(scores))
    assert interval.value == pytest.approx(mean)
    assert interval.low == pytest.approx(mean - half, abs=0.006)
    assert interval.high == pytest.approx(mean + half, abs=0.006)
    assert score_interval(scores) == interval  # seeded: the same table twice


def test_share_of_dense_degenerate_cases() -> None:
    dense = {"a": [1.0, 1.0, 0.0, 1.0], "b": [0.5, 1.0, 1.0]}
    same = share_of_dense(dense, dense)
    assert (same.value, same.low, same.high, same.n) == (1.0, 1.0, 1.0, 7)
    half = share_of_dense({t: [s / 2 for s in v] for t, v in dense.items()}, dense)
    assert half.value == pytest.approx(0.5) and half.low == pytest.approx(0.5) and half.high == pytest.approx(0.5)


def test_share_of_dense_matches_the_delta_method_on_a_large_paired_sample() -> None:
    rng = random.Random(2)
    dense = [1.0 if rng.random() < 0.8 else 0.0 for _ in range(2000)]
    star = [d if rng.random() < 0.9 else 1.0 - d for d in dense]  # flips 10% of the answers
    interval = share_of_dense({"t": star}, {"t": dense})
    n = len(dense)
    ms, md = sum(star) / n, sum(dense) / n
    ratio = ms / md
    # Delta method for a ratio of paired means: Var(R) ~ Var(s - R d) / (n md^2).
    residual = [s - ratio * d for s, d in zip(star, dense, strict=True)]
    se = math.sqrt(sum(r * r for r in residual) / (n - 1) / n) / md
    assert interval.value == pytest.approx(ratio)
    assert interval.low == pytest.approx(ratio - 1.96 * se, abs=0.005)
    assert interval.high == pytest.approx(ratio + 1.96 * se, abs=0.005)


def test_share_of_dense_refuses_unpaired_or_empty_input() -> None:
    with pytest.raises(ValueError, match="same tasks"):
        share_of_dense({"a": [1.0]}, {"b": [1.0]})
    with pytest.raises(ValueError, match="same requests"):
        share_of_dense({"a": [1.0, 0.0]}, {"a": [1.0]})
    with pytest.raises(ValueError, match="dense scores 0"):
        share_of_dense({"a": [1.0, 0.0]}, {"a": [0.0, 0.0]})
