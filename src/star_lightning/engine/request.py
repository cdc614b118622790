"""One request on this host: Phase 1 (:mod:`.encode`, skipped where a kept context answers), then Phase 2
(:func:`answer`: the query, then the token loop), with its figures (:class:`RequestStats`).

:func:`generate` does both, and reuses a kept context when the next request shares it (exact: the store is rolled
back to the context, so nothing of the last query remains).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from torch import Tensor, nn

from star_lightning.attention.kernels import KernelChoice
from star_lightning.engine.context import EncodedContext, context_key
from star_lightning.engine.decode import (
    StopCheck,
    cache_step,
    query_logits,
    resolve_decode_mode,
    sample_loop,
    static_decoder_for,
    store_step,
)
from star_lightning.engine.encode import encode_context
from star_lightning.engine.forward import (
    PHASE1,
    PHASE2_DECODE,
    PHASE2_QUERY,
    PhaseListener,
    model_devices,
    peak_memory_bytes,
    phase,
    reset_peak_memory,
    synchronize,
)
from star_lightning.engine.settings import GenerationSettings, StarSettings
from star_lightning.engine.static_decoder import StaticDecoder
from star_lightning.parallel.group import ContextGroup, is_query_host
from star_lightning.rope import length_dependent_rotary_modules, pinned_rope_length


@dataclass
class RequestStats:
    """Per-request figures for the profiler and the benchmarks (seconds, tokens, bytes)."""

    context_tokens: int = 0
    local_context_tokens: int = 0
    query_tokens: int = 0
    new_tokens: int = 0
    context_reused: bool = False
    phase1_s: float = 0.0
    query_s: float = 0.0
    decode_s: float = 0.0
    decode_setup_s: float = 0.0
    decode_mode: str = "eager"
    phase1_bytes: int = 0
    phase2_bytes: int = 0
    peak_mem_bytes: int = 0

    @property
    def ttft_s(self) -> float:
        """Time to first token: the whole context and query encoding, i.e. until the first token is chosen."""
        return self.phase1_s + self.query_s

    @property
    def decode_ms_per_token(self) -> float:
        steps = max(0, self.new_tokens - 1)
        return 1000.0 * self.decode_s / steps if steps else 0.0

    @property
    def total_s(self) -> float:
        return self.phase1_s + self.query_s + self.decode_setup_s + self.decode_s


@dataclass
class GenerationResult:
    token_ids: list[int]
    stats: RequestStats
    context: EncodedContext


def answer(
    model: nn.Module,
    context: EncodedContext,
    query_ids: Tensor,
    group: ContextGroup,
    star: StarSettings,
    settings: GenerationSettings,
    *,
    kernels: KernelChoice | None = None,
    stop_check: StopCheck | None = None,
    on_phase: PhaseListener | None = None,
) -> tuple[list[int], RequestStats]:
    """Phase 2, timed: encode the query over the encoded context, then decode until EOS, a stop or the budget (a
    length-dependent rope pinned to the prompt's length, :mod:`star_lightning.rope`)."""
    with pinned_rope_length(model, context.context_length + query_ids.shape[1]):
        return _answer(model, context, query_ids, group, star, settings, kernels, stop_check, on_phase)


def _answer(
    model: nn.Module,
    context: EncodedContext,
    query_ids: Tensor,
    group: ContextGroup,
    star: StarSettings,
    settings: GenerationSettings,
    kernels: KernelChoice | None,
    stop_check: StopCheck | None,
    on_phase: PhaseListener | None,
) -> tuple[list[int], RequestStats]:
    kernels = KernelChoice(backend=star.backend) if kernels is None else kernels
    devices, query_length = model_devices(model), query_ids.shape[1]
    if query_length == 0:
        raise ValueError("the query is empty: every request needs a non-empty 'input_query'")
    stats = RequestStats(
        context_tokens=context.context_length, local_context_tokens=context.local_length, query_tokens=query_length
    )
    bytes_before, t0 = group.bytes_moved, time.perf_counter()
    mode = "eager"
    if context.store is not None:
        mode = resolve_decode_mode(star.decode, devices, bool(length_dependent_rotary_modules(model)))
    captured = mode in ("graph", "compile")
    with phase(PHASE2_QUERY, on_phase):
        first_logits = query_logits(model, context, query_ids, group, settings, kernels, captured=captured)
        synchronize(devices)
    decoder: StaticDecoder | None = None
    start = context.context_length + query_length
    if context.store is not None:
        stats.decode_mode, decoder = static_decoder_for(model, context, group, mode, settings, kernels)
        next_logits = store_step(model, context, group, kernels, decoder, start, query_ids.device)
    else:
        next_logits = cache_step(model, context, start, query_ids.device)
    t1 = time.perf_counter()
    with phase(PHASE2_DECODE, on_phase):
        tokens = sample_loop(first_logits, next_logits, group, settings, stop_check)
        synchronize(devices)
    stats.query_s, stats.new_tokens = t1 - t0, len(tokens)
    stats.decode_setup_s = decoder.setup_s if decoder is not None else 0.0
    stats.decode_mode = decoder.mode if decoder is not None else stats.decode_mode
    stats.decode_s = time.perf_counter() - t1 - stats.decode_setup_s
    stats.phase2_bytes = group.bytes_moved - bytes_before + (decoder.replayed_bytes if decoder is not None else 0)
    return tokens, stats


def generate(
    model: nn.Module,
    context_ids: Tensor,
    query_ids: Tensor,
    group: ContextGroup,
    star: StarSettings,
    settings: GenerationSettings,
    stop_check: StopCheck | None = None,
    on_phase: PhaseListener | None = None,
    *,
    kernels: KernelChoice | None = None,
    kept: EncodedContext | None = None,
    anchor_query_ids: Tensor | None = None,
) -> GenerationResult:
    """One request; ``context_ids`` and ``query_ids`` are ``[1, L]`` on the model's device.

    ``anchor_query_ids`` (``[1, Q]``): what ``star.anchor_query`` puts after the anchor, when it is not the whole
    query (the question alone, :mod:`star_lightning.anchor_text`); Phase 2 still reads ``query_ids``.

    ``kept``: the context the previous request encoded (``GenerationResult.context``); when this request's context
    is the same (same tokens, same settings: its key, made once here), Phase 1 is skipped and the kept context
    answers (``phase1_s`` 0); else it is dropped before the new one is encoded (hand it over as the only reference,
    and its memory is free by then). ``on_phase`` is told the name of each phase as it starts (a progress display).
    """
    kernels = KernelChoice(backend=star.backend) if kernels is None else kernels
    devices = model_devices(model)
    reset_peak_memory(devices)
    extra = query_ids.shape[1] + settings.max_new_tokens if is_query_host(group) else 0
    prompt_length = context_ids.shape[1] + query_ids.shape[1]
    anchor_ids = query_ids if anchor_query_ids is None else anchor_query_ids
    key = context_key(model, context_ids, query_ids, star, group, anchor_ids)
    reused = kept is not None and key.matches(kept.key)
    if kept is not None and reused:
        context = kept
        context.rollback()
    else:
        kept = None  # freed before the next context is encoded
        with phase(PHASE1, on_phase):
            context = encode_context(
                model, context_ids, group, star, extra_capacity=extra, kernels=kernels, prompt_length=prompt_length,
                query_ids=anchor_ids, key=key,
            )  # fmt: skip
    tokens, stats = answer(
        model, context, query_ids, group, star, settings, kernels=kernels, stop_check=stop_check, on_phase=on_phase
    )
    stats.context_reused = reused
    stats.phase1_s = 0.0 if reused else context.phase1_s
    stats.phase1_bytes = 0 if reused else context.phase1_bytes
    stats.peak_mem_bytes = peak_memory_bytes(devices)
    return GenerationResult(tokens, stats, context)
