"""Metric states sum across real gloo processes: 2 ranks with different samples give the global score."""

from __future__ import annotations

from pathlib import Path

import torch

from distributed_utils import run_on_ranks
from star_lightning.bench.metrics import BabilongAccuracy, StringMatchAll, StringMatchPart

SHARDS = {
    0: (["alpha beta", "gamma"], [["alpha", "beta"], ["gamma", "delta"]]),
    1: (["nothing", "epsilon zeta eta"], [["x"], ["epsilon", "eta", "theta"]]),
}
BABILONG = {
    0: (["kitchen", "garden"], ["kitchen", "office"], ["Where is Mary?", "Where is Bill?"]),
    1: (["The hallway."], ["hallway"], ["Where is John?"]),
}


def _scores(rank: int, world_size: int) -> list[float]:
    predictions, references = SHARDS[rank]
    match_all, match_part = StringMatchAll(), StringMatchPart()
    match_all.update(predictions, references)
    match_part.update(predictions, references)
    babilong = BabilongAccuracy("qa1")
    babilong.update(*BABILONG[rank])
    return [match_all.compute().item(), match_part.compute().item(), babilong.compute().item()]


def test_metrics_reduce_across_two_processes(tmp_path: Path) -> None:
    results = run_on_ranks(_scores, 2, tmp_path)
    expected = [100 * (1 + 0.5 + 0 + 2 / 3) / 4, 100 * 3 / 4, 100 * 2 / 3]
    for per_rank in results:
        torch.testing.assert_close(per_rank, expected)
