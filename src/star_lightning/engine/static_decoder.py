"""Phase 2 decoding with static shapes, captured once as a CUDA graph (or compiled) and replayed per token.

A step is captured over a store's buffers and kept with them (:attr:`star_lightning.cache.StoreBuffers.graphs`): the
next request whose store gets the same buffers from the engine's pool (:class:`star_lightning.cache.StorePool`), or
the next query over a kept context, replays it without a capture.
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
from star_lightning.engine.forward import forward, model_config
from star_lightning.parallel.group import ContextGroup, capture_key, is_query_host


class StaticDecoder:
    """Phase 2 decoding with static shapes: every step is the same kernels on the same buffers.

    The token, its position, the cache slot and the valid length live in device tensors that are set before each
    step, so the step can be captured once as a CUDA graph (collectives included) and replayed per token. The
    capture's warm-up runs the first real step (its cache write is idempotent: same token, same slot).

    The decoder holds the store it serves weakly (:meth:`begin_request` points it at the request's store): it is kept
    with the store's buffers, which outlive the store in the engine's pool, and must not keep the store alive.
    """

    def __init__(
        self,
        model: nn.Module,
        store: KVStore,
        group: ContextGroup,
        kernels: KernelChoice,
        last_position: int,
        graph: bool,
        compile: bool = False,
    ) -> None:
        self.kernels = kernels
        self.model, self.group = model, group
        self.store: KVStore = weakref.proxy(store)
        self.use_graph = graph and kernels.graph_failure is None  # this engine's captures failed before: none
        self.forward = kernels.compiled_forward(model) if compile else model
        device = store.device
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=device)  # [1, 1]
        self.positions = torch.zeros(1, 1, dtype=torch.long, device=device)  # [1, 1]
        self.slot = StaticSlot(
            write_slot=torch.zeros(1, dtype=torch.long, device=device),
            valid_length=torch.zeros(1, dtype=torch.int32, device=device),
        )
        self.keep_new = is_query_host(group)
        self.step = ForwardStep(
            phase="query",
            group=group,
            kernels=kernels,
            store=self.store,
            keep_new=self.keep_new,
            static=self.slot,
            last_position=last_position,
        )
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None
        self.bytes_per_step = 0
        self.replays = 0
        self.setup_s = 0.0
        self.requested = ("compile" if compile else "graph") if graph else "static"
        self.mode = self.requested if self.use_graph or not graph else "static"
        """The mode it decodes in: ``static`` where a graph was asked for but cannot be captured."""

    @staticmethod
    def key(model: nn.Module, group: ContextGroup, mode: str, last_position: int) -> tuple[Any, ...]:
        """What a step kept with a store's buffers was captured for, besides the buffers. The last position counts
        only through whether the model's sliding window can cut something (``ForwardStep.window``), so requests of
        other lengths over the same buffers replay the same step: ~40 ms of capture a request, measured on an H100,
        when the exact position was the key."""
        window = getattr(model_config(model).get_text_config(), "sliding_window", None)
        cuts = None if window is None else min(last_position, int(window))
        return ("decode", capture_key(group), mode, cuts)

    @classmethod
    def over(
        cls,
        model: nn.Module,
        store: KVStore,
        group: ContextGroup,
        kernels: KernelChoice,
        last_position: int,
        mode: str,
    ) -> StaticDecoder:
        """The step kept with ``store``'s buffers for this group, mode and last position, else a new one kept there;
        pointed at ``store`` for this request."""
        key = cls.key(model, group, mode, last_position)
        decoder = store.allocation.graphs.get(key)
        if not isinstance(decoder, StaticDecoder) or decoder.model is not model:
            graph, compiled = mode in ("graph", "compile"), mode == "compile"
            decoder = cls(model, store, group, kernels, last_position, graph=graph, compile=compiled)
            store.allocation.graphs[key] = decoder
        decoder.begin_request(store, group)
        return decoder

    def begin_request(self, store: KVStore, group: ContextGroup) -> None:
        """Serve ``store`` (whose buffers the step was made over) for ``group`` (one of the same capture key);
        per-request figures start at zero; a graph captured for an earlier request is replayed as it is."""
        self.store, self.group = weakref.proxy(store), group
        self.step = replace(self.step, store=self.store, group=group)
        self.setup_s = 0.0
        self.replays = 0

    def _run(self) -> Tensor:
        return forward(self.forward, self.ids, self.positions, self.step)

    def _capture(self) -> None:
        t0 = time.perf_counter()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._run()  # warm-up: lazy initialisation and kernel compilation stay out of the graph
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        bytes_before = self.group.bytes_moved
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.logits = self._run()
        self.bytes_per_step = self.group.bytes_moved - bytes_before
        self.graph = graph
        torch.cuda.synchronize()
        self.setup_s = time.perf_counter() - t0

    def __call__(self, token: int, position: int) -> Tensor:
        length = self.store.length
        if self.keep_new and length >= self.store.capacity:
            raise RuntimeError(f"KV store overflow: {length} + 1 tokens exceed the capacity {self.store.capacity}")
        self.ids.fill_(token)
        self.positions.fill_(position)
        self.slot.write_slot.fill_(length)
        self.slot.valid_length.fill_(length + 1 if self.keep_new else length)
        if self.use_graph and self.graph is None:
            try:
                self._capture()
            except RuntimeError as error:  # a kernel that cannot be captured (or compiled: torch.compile's errors are
                # RuntimeErrors too): decode with the model's own forward, uncaptured, exactly
                warnings.warn(
                    f"capturing the decode step as a CUDA graph failed ({str(error).splitlines()[0]}); decoding with "
                    "the static step, uncaptured (slower, the same tokens)",
                    stacklevel=2,
                )
                self.use_graph, self.graph, self.logits, self.mode = False, None, None, "static"
                self.forward = self.model
                self.kernels.graph_failure = str(error).splitlines()[0]
                torch.cuda.synchronize()
        if not self.use_graph:
            logits = self._run()
        else:
            assert self.graph is not None and self.logits is not None
            self.graph.replay()
            self.replays += 1
            logits = self.logits
        if self.keep_new:
            self.store.advance(1)
        return logits

    @property
    def replayed_bytes(self) -> int:
        """Bytes this request's replays moved that the group did not count (a capture counts one step's bytes
        without moving them, a replay moves them without counting)."""
        if not self.replays:
            return 0
        captured_now = self.setup_s > 0
        return self.bytes_per_step * (self.replays - 1 if captured_now else self.replays)
