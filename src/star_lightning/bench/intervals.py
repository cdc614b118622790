"""95% intervals for benchmark scores, so a table can tell an effect from noise.

- A task's score: the Wilson score interval when every request scores 0 or 1 (single-answer RULER tasks), else the
  percentile bootstrap over requests (multi-answer tasks score a fraction per request).
- Star's share of dense: ``sum(star) / sum(dense)`` over the same requests, with a *paired*, task-stratified
  percentile bootstrap: each resample draws the same request indices for both cells, within each task, so the
  interval reflects only how the two cells differ on the requests, not how hard the sample happened to be.
The bootstrap is seeded: a table is reproducible to the digit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import torch

DEFAULT_RESAMPLES = 10_000


@dataclass(frozen=True)
class Interval:
    """A point estimate with its interval; ``n`` is the number of requests it rests on."""

    value: float
    low: float
    high: float
    n: int
    method: str

    def as_dict(self, scale: float = 1.0, digits: int = 4) -> dict[str, float | int | str]:
        return {
            "value": round(self.value * scale, digits),
            "low": round(self.low * scale, digits),
            "high": round(self.high * scale, digits),
            "n": self.n,
            "method": self.method,
        }


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson(successes: int, n: int, confidence: float = 0.95) -> Interval:
    """Wilson score interval of a proportion (Wilson 1927): keeps its coverage near 0 and 1, unlike mean +- 2 SE."""
    if n <= 0:
        raise ValueError("wilson needs at least one trial")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, {n}], got {successes}")
    z = _z(confidence)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half), n, "wilson")


def _percentiles(samples: torch.Tensor, confidence: float) -> tuple[float, float]:
    alpha = (1 - confidence) / 2
    low, high = torch.quantile(samples, torch.tensor([alpha, 1 - alpha], dtype=samples.dtype))
    return float(low), float(high)


def score_interval(
    scores: Sequence[float], confidence: float = 0.95, resamples: int = DEFAULT_RESAMPLES, seed: int = 0
) -> Interval:
    """Mean of per-request scores in [0, 1] with its interval (Wilson when binary, else percentile bootstrap)."""
    if not scores:
        raise ValueError("score_interval needs at least one score")
    values = torch.tensor(scores, dtype=torch.float64)  # [n]
    if bool(((values < 0) | (values > 1)).any()):
        raise ValueError("scores must be per-request fractions in [0, 1]")
    if bool(((values == 0) | (values == 1)).all()):
        return wilson(int(values.sum()), len(scores), confidence)
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(len(scores), (resamples, len(scores)), generator=generator)  # [R, n]
    low, high = _percentiles(values[draws].mean(dim=1), confidence)
    return Interval(float(values.mean()), low, high, len(scores), "bootstrap")


def share_of_dense(
    star: Mapping[str, Sequence[float]],
    dense: Mapping[str, Sequence[float]],
    confidence: float = 0.95,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Interval:
    """``sum(star) / sum(dense)`` over the same requests of each task, with a paired, task-stratified bootstrap.

    ``star[task][i]`` and ``dense[task][i]`` must score the same request. A resample whose dense sum is 0 has no
    share; it is dropped (reported through ``n`` staying the request count, and refused if most resamples are).
    """
    if set(star) != set(dense) or not star:
        raise ValueError(f"star and dense must score the same tasks, got {sorted(star)} and {sorted(dense)}")
    generator = torch.Generator().manual_seed(seed)
    star_sums = torch.zeros(resamples, dtype=torch.float64)  # [R]
    dense_sums = torch.zeros(resamples, dtype=torch.float64)  # [R]
    star_total = dense_total = 0.0
    count = 0
    for task in sorted(star):
        s = torch.tensor(star[task], dtype=torch.float64)  # [n_task]
        d = torch.tensor(dense[task], dtype=torch.float64)  # [n_task]
        if s.shape != d.shape or s.numel() == 0:
            raise ValueError(f"{task}: star has {s.numel()} scores and dense {d.numel()}; both need the same requests")
        draws = torch.randint(s.numel(), (resamples, s.numel()), generator=generator)  # [R, n_task]
        star_sums += s[draws].sum(dim=1)
        dense_sums += d[draws].sum(dim=1)
        star_total += float(s.sum())
        dense_total += float(d.sum())
        count += s.numel()
    if dense_total == 0:
        raise ValueError("dense scores 0 on every request: there is no share of dense to estimate")
    valid = dense_sums > 0
    if int(valid.sum()) < resamples // 2:
        raise ValueError("dense scores 0 on most resamples: too few requests to estimate a share of dense")
    low, high = _percentiles(star_sums[valid] / dense_sums[valid], confidence)
    return Interval(star_total / dense_total, low, high, count, "paired bootstrap")
