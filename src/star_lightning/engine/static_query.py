"""Phase 2's query forward with static shapes, captured once per size of query as a CUDA graph and replayed.

Why: the query forward (a few dozen tokens over every host's store, then the merge) runs ~100 small kernels a layer,
each launched from Python: ~35 ms of a 0.16 s request on Qwen2.5-0.5B at 8K (H100 profile), where the GPU works
for a few. Captured, it is one graph launch.

The query is padded to a whole number of ``ROWS`` rows (the padding after its real rows: causal attention keeps the
real rows as they were; a pad's K/V lands in store slots past the query, which the valid length hides and the
generated tokens overwrite), its tokens, positions, store slots, valid length and the row whose logits are kept live
in device tensors set before each replay, and the step is kept with the store's buffers like the decode step
(:class:`~star_lightning.engine.static_decoder.StaticDecoder`), so the next request over the same buffers replays it.
"""

from __future__ import annotations

import time
import warnings
import weakref
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from star_lightning.attention.kernels import KernelChoice
from star_lightning.attention.step import ForwardStep, StaticSlot
from star_lightning.cache import KVStore
from star_lightning.engine.forward import model_config
from star_lightning.parallel.group import ContextGroup, capture_key, is_query_host

ROWS = 32
"""Queries are padded to a multiple of this many tokens: one captured step per multiple."""
MAX_ROWS = 256
"""Longer queries run uncaptured (a long question is compute, not launches)."""


def padded_rows(query_length: int) -> int | None:
    """The rows a query of ``query_length`` tokens is padded to; None when it runs uncaptured."""
    rows = -(-query_length // ROWS) * ROWS
    return rows if 0 < query_length <= MAX_ROWS else None


class StaticQuery:
    """The query forward over a store's buffers with ``rows`` static rows (see the module's docstring)."""

    def __init__(
        self,
        model: nn.Module,
        store: KVStore,
        group: ContextGroup,
        kernels: KernelChoice,
        rows: int,
        last_position: int,
        graph: bool,
    ) -> None:
        device = store.device
        self.model, self.group, self.kernels, self.rows = model, group, kernels, rows
        self.last_position = last_position
        self.store: KVStore = weakref.proxy(store)
        self.use_graph = graph and kernels.query_graph_failure is None
        self.ids = torch.zeros(1, rows, dtype=torch.long, device=device)  # [1, R]
        self.positions = torch.zeros(1, rows, dtype=torch.long, device=device)  # [1, R]
        self.offsets = torch.arange(rows, device=device)  # [R]
        self.keep = torch.zeros(1, dtype=torch.long, device=device)  # [1]: the last real row
        self.slot = StaticSlot(
            write_slot=torch.zeros(rows, dtype=torch.long, device=device),  # [R]
            valid_length=torch.zeros(1, dtype=torch.int32, device=device),
        )
        self.keep_new = is_query_host(group)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None
        self.setup_s = 0.0

    @staticmethod
    def key(model: nn.Module, group: ContextGroup, rows: int, last_position: int) -> tuple[Any, ...]:
        """What a step kept with a store's buffers was captured for, besides them (the window rule as the decoder's)."""
        window = getattr(model_config(model).get_text_config(), "sliding_window", None)
        return ("query", capture_key(group), rows, None if window is None else min(last_position, int(window)))

    @classmethod
    def over(
        cls,
        model: nn.Module,
        store: KVStore,
        group: ContextGroup,
        kernels: KernelChoice,
        rows: int,
        last_position: int,
        graph: bool,
    ) -> StaticQuery:
        """The step kept with ``store``'s buffers for this group, size and window rule, else a new one kept there."""
        key = cls.key(model, group, rows, last_position)
        found = store.allocation.graphs.get(key)
        if not isinstance(found, StaticQuery) or found.model is not model:
            found = cls(model, store, group, kernels, rows, last_position, graph)
            store.allocation.graphs[key] = found
        found.store, found.group = weakref.proxy(store), group
        found.setup_s = 0.0
        return found

    def _run(self) -> Tensor:
        step = ForwardStep(
            phase="query", group=self.group, kernels=self.kernels, store=self.store, keep_new=self.keep_new,
            static=self.slot, last_position=self.last_position,
        )  # fmt: skip
        output = self.model(
            input_ids=self.ids,  # [1, R]
            position_ids=self.positions,  # [1, R]
            use_cache=False,
            logits_to_keep=self.keep,  # [1]: the last real row's logits only
            star_step=replace(step, positions=self.positions[0]),
        )
        return output.logits[0, -1]  # [V]

    def _capture(self) -> None:
        t0 = time.perf_counter()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._run()  # warm-up: its store writes are the replay's own (same slots, same values)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.logits = self._run()
        self.graph = graph
        torch.cuda.synchronize()
        self.setup_s = time.perf_counter() - t0

    def __call__(self, query_ids: Tensor, start: int) -> Tensor:
        """The logits ``[V]`` after ``query_ids`` ``[1, q]`` (``q`` <= ``rows``) at positions ``start ..``; the query
        host's store counts the ``q`` real tokens."""
        q, length = query_ids.shape[1], self.store.length
        if q > self.rows or (self.keep_new and length + self.rows > self.store.capacity):
            raise RuntimeError(f"a static query of {self.rows} rows cannot take {q} tokens after {length} kept")
        self.ids.zero_()
        self.ids[:, :q].copy_(query_ids)
        torch.add(self.offsets, start, out=self.positions[0])
        torch.add(self.offsets, length, out=self.slot.write_slot)
        self.slot.valid_length.fill_(length + self.rows if self.keep_new else length)
        self.keep.fill_(q - 1)
        if self.use_graph and self.graph is None:
            try:
                self._capture()
            except RuntimeError as error:  # a kernel that cannot be captured: the same step, uncaptured
                warnings.warn(
                    f"capturing the query forward as a CUDA graph failed ({str(error).splitlines()[0]}); it runs "
                    "uncaptured (slower, the same tokens)",
                    stacklevel=2,
                )
                self.use_graph, self.graph, self.logits = False, None, None
                self.kernels.query_graph_failure = str(error).splitlines()[0]
                if self.ids.is_cuda:
                    torch.cuda.synchronize()
        if self.use_graph:
            assert self.graph is not None and self.logits is not None
            self.graph.replay()
            logits = self.logits
        else:
            logits = self._run()
        if self.keep_new:
            self.store.advance(q)
        return logits
