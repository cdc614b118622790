"""The Phase 2 query forward with static shapes (padded rows, device-held slots; captured on a GPU) against the
engine's own query forward: the same logits, the same store, the same next steps."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch

from model_zoo import random_tokens, tiny_model
from star_lightning.attention.kernels import KernelChoice
from star_lightning.engine.decode import decode_step, encode_query, query_logits
from star_lightning.engine.encode import encode_context
from star_lightning.engine.request import generate
from star_lightning.engine.settings import GenerationSettings, StarSettings
from star_lightning.engine.static_decoder import StaticDecoder
from star_lightning.engine.static_query import MAX_ROWS, ROWS, StaticQuery, padded_rows
from star_lightning.models import use_star_attention
from star_lightning.parallel.group import SingleHostGroup

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CASES = [("llama", {}), ("mistral", {"sliding_window": 8}), ("gemma3", {}), ("qwen2", {})]


def _model(family: str, overrides: dict, dtype: torch.dtype = torch.float64, device: str = "cpu") -> torch.nn.Module:
    model = tiny_model(family, dtype=dtype, **overrides)
    use_star_attention(model)
    return model.to(device)


def test_queries_are_padded_to_whole_tiles_up_to_a_bound() -> None:
    assert padded_rows(1) == padded_rows(ROWS) == ROWS
    assert padded_rows(ROWS + 1) == 2 * ROWS
    assert padded_rows(MAX_ROWS) == MAX_ROWS and padded_rows(MAX_ROWS + 1) is None and padded_rows(0) is None


@pytest.mark.parametrize(("family", "overrides"), CASES)
@pytest.mark.parametrize("query_length", [5, ROWS, ROWS + 3])
def test_a_padded_static_query_equals_the_engines_query(family: str, overrides: dict, query_length: int) -> None:
    """Float64, uncaptured: the last real row's logits, the store after it (the pads' slots are past its length),
    and the next decode steps over it equal the engine's own query forward's."""
    model = _model(family, overrides)
    context, query = random_tokens(200, seed=1), random_tokens(query_length, seed=2)
    star = StarSettings(block_size=64)
    results = []
    with torch.no_grad():
        for static in (False, True):
            group = SingleHostGroup()
            encoded = encode_context(model, context, group, star, extra_capacity=2 * MAX_ROWS)
            store = encoded.store
            assert store is not None
            if static:
                rows = padded_rows(query_length)
                assert rows is not None
                step = StaticQuery(model, store, group, KernelChoice(), rows, last_position=10_000, graph=False)
                logits = step(query, encoded.context_length)
            else:
                logits = encode_query(model, store, query, encoded.context_length, group)
            position = encoded.context_length + query_length
            following = [decode_step(model, store, torch.tensor([[7 + i]]), position + i, group) for i in range(3)]
            layers = [(store.view(layer), store.positions(layer)) for layer in range(model.config.num_hidden_layers)]
            results.append((logits, following, store.length, layers))
    (eager_logits, eager_next, eager_length, eager_layers), (logits, following, length, layers) = results
    torch.testing.assert_close(logits, eager_logits, rtol=1e-10, atol=1e-10)
    for a, b in zip(following, eager_next, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert length == eager_length == 200 + query_length + 3
    for ((keys, values), positions), ((eager_keys, eager_values), eager_positions) in zip(
        layers, eager_layers, strict=True
    ):
        torch.testing.assert_close(keys, eager_keys, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(values, eager_values, rtol=1e-10, atol=1e-10)
        assert torch.equal(positions, eager_positions)


def test_a_query_that_cannot_be_captured_runs_uncaptured_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    """A capture that fails (a kernel that cannot be captured): the engine says so once, records why, and answers
    uncaptured, exactly."""

    def refused(self: StaticQuery) -> None:
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(StaticQuery, "_capture", refused)
    model = _model("llama", {})
    context, query = random_tokens(150, seed=1), random_tokens(6, seed=2)
    star, settings = StarSettings(block_size=64), GenerationSettings(max_new_tokens=4)
    kernels = KernelChoice()
    with torch.no_grad():
        reference = encode_query(
            model, (e := encode_context(model, context, SingleHostGroup(), star, extra_capacity=64)).store, query,
            e.context_length, SingleHostGroup(),
        )  # fmt: skip
        encoded = encode_context(model, context, SingleHostGroup(), star, extra_capacity=64)
        with pytest.warns(UserWarning, match="capturing the query forward as a CUDA graph failed"):
            logits = query_logits(model, encoded, query, SingleHostGroup(), settings, kernels, captured=True)
        assert kernels.query_graph_failure is not None
        torch.testing.assert_close(logits, reference, rtol=1e-10, atol=1e-10)
        again = encode_context(model, context, SingleHostGroup(), star, extra_capacity=64)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once: this engine does not try again
            query_logits(model, again, query, SingleHostGroup(), settings, kernels, captured=True)


class _OtherGroup(SingleHostGroup):
    """A group of its own kind: its captured steps are its own (as a distributed group's, whose communicators are in
    the capture)."""


def test_a_new_one_host_group_per_request_finds_the_steps_kept_with_the_buffers() -> None:
    """A caller that makes a ``SingleHostGroup`` per request (the library's own scripts did) gets the query and
    decode steps kept with the store's buffers, not a new capture each request (a captured step kept per request);
    a group of another kind gets its own."""
    model = _model("qwen2", {}, dtype=torch.float32)
    kernels, settings = KernelChoice(), GenerationSettings(max_new_tokens=4)
    star = StarSettings(block_size=64, decode="static")
    with torch.no_grad():
        first = generate(model, random_tokens(200, seed=1), random_tokens(5, seed=2), SingleHostGroup(), star,
                         settings, kernels=kernels)  # fmt: skip
        store = first.context.store
        assert store is not None
        graphs = store.allocation.graphs
        decoders = [entry for entry in graphs.values() if isinstance(entry, StaticDecoder)]
        assert len(decoders) == 1
        query = StaticQuery.over(model, store, SingleHostGroup(), kernels, ROWS, 10_000, graph=False)
        del first, store
        gc.collect()
        second = generate(model, random_tokens(190, seed=3), random_tokens(5, seed=4), SingleHostGroup(), star,
                          settings, kernels=kernels)  # fmt: skip
        store = second.context.store
        assert store is not None and store.allocation.graphs is graphs  # the pool's buffers, with what they keep
        assert [entry for entry in graphs.values() if isinstance(entry, StaticDecoder)] == decoders
        group = SingleHostGroup()
        assert StaticQuery.over(model, store, group, kernels, ROWS, 10_000, graph=False) is query
        assert query.group is group
        other = _OtherGroup()
        assert StaticQuery.over(model, store, other, kernels, ROWS, 10_000, graph=False) is not query
        other_decoder = StaticDecoder.over(model, store, other, kernels, 10_000, "static")
        assert other_decoder is not decoders[0] and other_decoder.group is other


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(
    ("family", "overrides", "dtype"),
    [("llama", {}, torch.float32), ("mistral", {"sliding_window": 8}, torch.float32), ("qwen2", {}, torch.bfloat16)],
)
def test_captured_queries_give_the_uncaptured_tokens_and_replay_for_the_next_request(
    family: str, overrides: dict, dtype: torch.dtype
) -> None:
    """With the decode step captured, the query forward is too: the same tokens as a request decoded uncaptured,
    and the next requests (other lengths, other query lengths in the same tile) replay it without a capture."""
    model = _model(family, overrides, dtype=dtype, device="cuda")
    settings = GenerationSettings(max_new_tokens=8)
    kernels, group = KernelChoice(), SingleHostGroup()
    with torch.no_grad():
        for seed, (length, query_length) in enumerate([(200, 5), (190, 9), (180, 3)]):
            context = random_tokens(length, seed=seed).cuda()
            query = random_tokens(query_length, seed=30 + seed).cuda()
            graphed = generate(model, context, query, group, StarSettings(block_size=64, decode="graph"), settings,
                               kernels=kernels)  # fmt: skip
            plain = generate(model, context, query, SingleHostGroup(), StarSettings(block_size=64, decode="static"),
                             settings)  # fmt: skip
            assert graphed.token_ids == plain.token_ids
            del graphed, plain
            gc.collect()
    assert kernels.query_graph_failure is None and kernels.graph_failure is None
    captured = [
        entry for entry in _graphs_of(kernels) if isinstance(entry, StaticQuery) and entry.graph is not None
    ]  # one tile of rows, one capture, kept with the buffers
    assert len(captured) == 1


def _graphs_of(kernels: KernelChoice) -> list[object]:
    """What is kept with the engine's free buffers (the last request's, given back when its store died)."""
    free = kernels.stores.free
    return [] if free is None else list(free.graphs.values())
