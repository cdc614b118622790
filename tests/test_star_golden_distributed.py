"""Star with ``anchor_query false`` and ``passing_tokens 0`` computes exactly what it computed before those options
existed (``golden/star_fe2f9e1.json``, written by ``golden/make_star_golden.py`` at main fe2f9e1): each host's Phase 1
KV, the merged first-token logits and the greedy tokens, float64, on 1-3 gloo processes, for every anchor source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distributed_utils import run_on_ranks
from golden.make_star_golden import CASES, SOURCES, host_results

GOLDEN = json.loads((Path(__file__).parent / "golden" / "star_fe2f9e1.json").read_text())


def _values(hexes: list[str]) -> torch.Tensor:
    return torch.tensor([float.fromhex(x) for x in hexes], dtype=torch.float64)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_default_star_is_unchanged(world_size: int, tmp_path: Path) -> None:
    results = run_on_ranks(host_results, world_size, tmp_path)  # one thread per process, as the golden was made
    for rank, result in enumerate(results):
        golden = GOLDEN["hosts"][str(world_size)][rank]
        for name in CASES:
            for source in SOURCES:
                got, want = result[f"{name}/{source}"], golden[f"{name}/{source}"]
                where = f"{name}/{source}, host {rank} of {world_size}"
                assert got["kv_shape"] == want["kv_shape"], where
                assert got["tokens"] == want["tokens"], where
                # float64 on the same kernels in the same order: equal to the last bit here; the tolerance only
                # allows another CPU's BLAS to sum in another order.
                for field in ("kv", "logits"):
                    torch.testing.assert_close(
                        _values(got[field]), _values(want[field]), rtol=1e-12, atol=1e-12, msg=f"{where}: {field}"
                    )
