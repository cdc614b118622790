"""The block plan: contiguous balanced placement, ragged last block, anchor length, clear errors."""

from __future__ import annotations

import pytest

from star_lightning.errors import ConfigurationError
from star_lightning.parallel.layout import make_layout
from star_lightning.partition import plan_blocks


def test_blocks_cover_the_context_and_hosts_get_contiguous_runs() -> None:
    plan = plan_blocks(100, 16, 3, anchor_block_size=8)
    assert [(b.start, b.end) for b in plan.blocks] == [(i, min(i + 16, 100)) for i in range(0, 100, 16)]
    assert [[b.index for b in host] for host in plan.host_blocks] == [[0, 1], [2, 3], [4, 5, 6]]
    assert plan.anchor_length == 8 and plan.query_host == 2
    assert sum(plan.local_context_length(h) for h in range(3)) == 100


def test_default_anchor_is_the_block_and_single_block_has_none() -> None:
    assert plan_blocks(100, 16, 1).anchor_length == 16
    assert plan_blocks(10, 16, 1).anchor_length == 0
    assert plan_blocks(100, 16, 1, use_anchor=False).anchor_length == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"block_size": 0}, "block_size must be a positive"),
        ({"block_size": -4}, "block_size must be a positive"),
        ({"anchor_block_size": 0}, "anchor_block_size must be a positive"),
        ({"anchor_block_size": 32}, r"anchor_block_size \(32\) is larger than block_size \(16\)"),
        ({"context_length": 0}, "context is empty"),
        ({"num_hosts": 8, "context_length": 40}, r"3 block\(s\).*fewer than the 8 hosts.*at most 5"),
    ],
)
def test_bad_sizes_are_refused_with_the_fix(kwargs: dict, message: str) -> None:
    args = {"context_length": 100, "block_size": 16, "num_hosts": 2, "anchor_block_size": None} | kwargs
    with pytest.raises(ConfigurationError, match=message):
        plan_blocks(**args)


def test_layout_splits_world_into_contiguous_context_parallel_groups() -> None:
    layout = make_layout(8, 4)
    assert layout.data_parallel_size == 2
    assert layout.all_context_parallel_groups() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [layout.data_parallel_rank(r) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert make_layout(3, None).context_parallel_size == 3
    with pytest.raises(
        ConfigurationError, match=r"world size 6 .* not divisible by context_parallel_size 4.*\[1, 2, 3, 6\]"
    ):
        make_layout(6, 4)
    with pytest.raises(ConfigurationError, match="positive"):
        make_layout(4, 0)


def test_hosts_of_several_gpus_take_consecutive_gpus_of_their_node() -> None:
    from star_lightning.parallel.layout import host_gpu_indices

    common = {"gpus_per_host": 2, "processes_per_node": 4, "accelerator": "cuda"}
    assert [host_gpu_indices(local_rank=r, visible_gpus=8, **common) for r in range(4)] == [
        [0, 1],
        [2, 3],
        [4, 5],
        [6, 7],
    ]
    # A job that binds exactly the host's GPUs to each process: every process sees its own two as 0 and 1.
    assert host_gpu_indices(local_rank=3, visible_gpus=2, **common) == [0, 1]


@pytest.mark.parametrize(
    ("visible", "accelerator", "message"),
    [
        (4, "cuda", r"needs 8 GPUs per node, but 4 are visible; run 2 process\(es\) per node"),
        (8, "cpu", "the accelerator is 'cpu'; use --trainer.accelerator gpu, or gpus_per_host 1"),
    ],
)
def test_hosts_of_several_gpus_are_validated_with_the_fix(visible: int, accelerator: str, message: str) -> None:
    from star_lightning.parallel.layout import host_gpu_indices

    with pytest.raises(ConfigurationError, match=message):
        host_gpu_indices(
            gpus_per_host=2, local_rank=0, processes_per_node=4, visible_gpus=visible, accelerator=accelerator
        )
