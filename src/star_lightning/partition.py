"""Who encodes which context tokens: Star Attention's block plan, and the ring baseline's chunk plan.

Pure bookkeeping (no torch, no torch.distributed) so that every rank derives the same plan from the same
numbers, and so that the plan can be checked before any weights are loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

from star_lightning.engine.settings import RingLayout, check_block_sizes
from star_lightning.errors import ConfigurationError

# Passing tokens without the query in the anchor: the anchor's last tokens choose them (SnapKV's observation window).
SELECTION_WINDOW = 32


@dataclass(frozen=True)
class Block:
    """A contiguous span ``[start, end)`` of context tokens; positions are the tokens' true positions."""

    index: int
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start

    def lookback(self, anchor_length: int, tokens: int) -> int:
        """The context tokens just before this block that a lookback of ``tokens`` recomputes in its forward
        (``--model.lookback_tokens``): at most ``tokens``, none of the anchor's (the prefix holds them), none for
        the first block."""
        if self.index == 0 or not tokens:
            return 0
        return self.start - max(anchor_length, self.start - tokens)


@dataclass(frozen=True)
class BlockPlan:
    """Blocks of ``block_size`` tokens assigned contiguously to ``num_hosts`` hosts.

    ``anchor_length`` is the number of leading tokens of the first block that prefix every other block
    (0 when the anchor is switched off or when there is a single block).
    """

    context_length: int
    block_size: int
    anchor_length: int
    num_hosts: int
    blocks: tuple[Block, ...]
    host_blocks: tuple[tuple[Block, ...], ...]

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def query_host(self) -> int:
        """The host that owns the last block; it also stores the query and generated tokens."""
        return self.num_hosts - 1

    def blocks_of(self, host: int) -> tuple[Block, ...]:
        return self.host_blocks[host]

    def local_context_length(self, host: int) -> int:
        return sum(block.length for block in self.host_blocks[host])


def split_evenly(length: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous spans covering ``[0, length)`` whose sizes differ by at most one."""
    return [(length * i // parts, length * (i + 1) // parts) for i in range(parts)]


def plan_blocks(
    context_length: int,
    block_size: int,
    num_hosts: int,
    anchor_block_size: int | None = None,
    use_anchor: bool = True,
) -> BlockPlan:
    """Cut ``context_length`` tokens into blocks and give each host a contiguous, balanced run of them.

    The last block may be shorter than ``block_size``: it is processed ragged, so no padding exists to leak.
    """
    check_block_sizes(block_size, anchor_block_size)
    if context_length <= 0:
        raise ConfigurationError("the context is empty: every request needs a non-empty 'input_context'")
    if num_hosts <= 0:
        raise ConfigurationError(f"num_hosts must be positive, got {num_hosts}")
    starts = range(0, context_length, block_size)
    blocks = tuple(Block(i, s, min(s + block_size, context_length)) for i, s in enumerate(starts))
    if num_hosts > len(blocks):
        most = -(-context_length // num_hosts)
        raise ConfigurationError(
            f"the context of {context_length} tokens makes {len(blocks)} block(s) of block_size {block_size}, fewer "
            f"than the {num_hosts} hosts of the context-parallel group: every host needs at least one block. Lower "
            f"--model.block_size to at most {most}, or use fewer hosts (--trainer.devices / "
            "--trainer.strategy.context_parallel_size)"
        )
    anchor = block_size if anchor_block_size is None else anchor_block_size
    anchor_length = min(anchor, blocks[0].length) if (use_anchor and len(blocks) > 1) else 0
    spans = split_evenly(len(blocks), num_hosts)
    host_blocks = tuple(blocks[a:b] for a, b in spans)
    return BlockPlan(context_length, block_size, anchor_length, num_hosts, blocks, host_blocks)


@dataclass(frozen=True)
class RingPlan:
    """The ring baseline's context chunks and which host holds which.

    ``contiguous``: ``H`` chunks, host ``h`` holds chunk ``h`` (the last host has the most causal work: it attends
    to every earlier chunk). ``zigzag``: ``2H`` chunks, host ``h`` holds chunks ``h`` and ``2H-1-h``, so every host
    has the same causal work (the layout of ring-flash-attention's zigzag ring and of Llama 3's context parallelism).
    """

    context_length: int
    num_hosts: int
    layout: RingLayout
    chunks: tuple[tuple[int, int], ...]
    host_chunks: tuple[tuple[int, ...], ...]

    def spans_of(self, host: int) -> tuple[tuple[int, int], ...]:
        """The ``[start, end)`` spans of the host's chunks, in context order."""
        return tuple(self.chunks[i] for i in self.host_chunks[host])

    def chunk_lengths_of(self, host: int) -> tuple[int, ...]:
        return tuple(end - start for start, end in self.spans_of(host))

    def local_context_length(self, host: int) -> int:
        return sum(self.chunk_lengths_of(host))

    @property
    def query_host(self) -> int:
        return self.num_hosts - 1


def plan_ring(context_length: int, num_hosts: int, layout: RingLayout = "zigzag") -> RingPlan:
    """Cut the context into balanced chunks for ``num_hosts`` hosts in the given layout."""
    if num_hosts <= 0:
        raise ConfigurationError(f"num_hosts must be positive, got {num_hosts}")
    parts = 2 * num_hosts if layout == "zigzag" else num_hosts
    if context_length < parts:
        raise ConfigurationError(
            f"the context of {context_length} tokens is too short for a {layout} ring over {num_hosts} hosts (it needs "
            f"at least {parts} tokens: one per chunk); use fewer hosts, --model.ring_layout contiguous, or "
            "--model.attention dense"
        )
    chunks = tuple(split_evenly(context_length, parts))
    host_chunks: tuple[tuple[int, ...], ...]
    if layout == "zigzag":
        host_chunks = tuple((h, parts - 1 - h) for h in range(num_hosts))
    else:
        host_chunks = tuple((h,) for h in range(num_hosts))
    return RingPlan(context_length, num_hosts, layout, chunks, host_chunks)
