"""Phase 1 blocks replayed as CUDA graphs (``--model.prefill``) and the store buffers they need: a store's buffers go
to the next request's store (never to a living one's), a block's padding changes nothing before it, the anchor read
from the host's own store is the anchor, and a replayed Phase 1 equals the uncaptured one (GPU)."""

from __future__ import annotations

import gc

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from model_zoo import random_tokens, tiny_model
from star_lightning.attention.kernels import KernelChoice
from star_lightning.cache import KVStore, StorePool
from star_lightning.engine.encode import encode_context
from star_lightning.engine.forward import forward, position_ids
from star_lightning.engine.prefill import block_forward
from star_lightning.engine.prefill_graph import resolve_prefill_mode
from star_lightning.engine.request import generate
from star_lightning.engine.settings import GenerationSettings, StarSettings
from star_lightning.engine.star_setup import star_run
from star_lightning.engine.static_decoder import StaticDecoder
from star_lightning.models import use_star_attention
from star_lightning.parallel.group import SingleHostGroup
from star_lightning.partition import plan_blocks

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _model(family: str = "llama", dtype: torch.dtype = torch.float64, device: str = "cpu") -> torch.nn.Module:
    model = tiny_model(family, dtype=dtype).to(device)
    use_star_attention(model)
    return model


def test_a_store_gets_the_buffers_of_the_last_store_that_died_and_never_a_living_ones() -> None:
    pool = StorePool(bucket=64)
    first = KVStore(2, 100, pool)
    assert first.capacity == 128  # rounded up to the bucket
    first.append(0, torch.ones(1, 2, 5, 4), torch.ones(1, 2, 5, 4), torch.arange(5))
    allocation = first.allocation
    living = KVStore(2, 100, pool)  # the first is alive: its buffers are not handed out
    assert living.allocation is not allocation
    del first
    gc.collect()
    again = KVStore(2, 120, pool)  # the same bucket: the dead store's buffers, empty
    assert again.allocation is allocation and again.length == 0 and pool.reused == 1
    del again
    other = KVStore(2, 1000, pool)  # another capacity: the free set is dropped, not kept beside it
    assert other.allocation is not allocation and pool.free is None


def test_a_pooled_buffer_of_another_shape_is_replaced_not_written_into() -> None:
    pool = StorePool(bucket=64)
    store = KVStore(1, 64, pool)
    store.append(0, torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4), torch.arange(3))
    store.allocation.graphs["a graph"] = object()
    del store
    gc.collect()
    wider = KVStore(1, 64, pool)
    wider.append(0, torch.zeros(1, 4, 3, 8, dtype=torch.float64), torch.zeros(1, 4, 3, 8, dtype=torch.float64),
                 torch.arange(3))  # fmt: skip
    keys, _ = wider.view(0)
    assert keys.shape == (1, 4, 3, 8) and keys.dtype == torch.float64
    assert not wider.allocation.graphs  # captured over the old buffers: gone with them


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_requests_over_pooled_buffers_answer_as_a_fresh_engine(family: str) -> None:
    """Three requests on one engine (each store gets the last one's buffers, which hold its K/V) answer exactly as
    each request on an engine of its own."""
    model = _model(family, dtype=torch.float32)
    star, settings = StarSettings(block_size=64, decode="static"), GenerationSettings(max_new_tokens=6)
    kernels = KernelChoice()
    with torch.no_grad():
        for seed in range(3):
            context, query = random_tokens(200 + seed, seed=seed), random_tokens(5, seed=10 + seed)
            pooled = generate(model, context, query, SingleHostGroup(), star, settings, kernels=kernels)
            fresh = generate(model, context, query, SingleHostGroup(), star, settings)
            assert pooled.token_ids == fresh.token_ids
            for layer in range(2):
                assert pooled.context.store is not None and fresh.context.store is not None
                assert torch.equal(pooled.context.store.view(layer)[0], fresh.context.store.view(layer)[0])
            del pooled, fresh
            gc.collect()
    assert kernels.stores.reused == 2


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_padding_a_block_changes_nothing_before_it(family: str) -> None:
    """The ragged last block is replayed padded to a full block: its real rows' K/V (what the store keeps) are those
    of the unpadded forward, on a windowed family too (float64, CPU)."""
    model = _model(family)
    context = random_tokens(230, seed=1)
    plan = plan_blocks(230, 64, 1, None, True)
    kept = {}
    for pad in (0, 25):
        store = KVStore(2, 400)
        run = star_run(
            model, context, plan, SingleHostGroup(), store, anchor_source="broadcast", kernels=KernelChoice(),
            query_ids=None, query_positions="after_anchor", passing=None,
        )  # fmt: skip
        with torch.no_grad():
            for block in run.blocks:
                ids, positions, step, start = block_forward(run, block)
                if block is run.blocks[-1] and pad:
                    ids = torch.cat([ids, ids[:, -1:].expand(1, pad)], dim=1)
                    positions = torch.cat([positions, position_ids(230, 230 + pad, ids.device)], dim=1)
                forward(model, ids, positions, step, start=start)
        kept[pad] = [store.view(layer)[0][:, :, :230].clone() for layer in range(2)]
    assert run.stored is not None  # the anchor was read from the host's own store
    for layer in range(2):
        torch.testing.assert_close(kept[25][layer], kept[0][layer], rtol=1e-12, atol=1e-12)


def test_auto_replays_only_where_every_block_is_on_one_gpu() -> None:
    cpu, gpu = [torch.device("cpu")], [torch.device("cuda", 0)]
    assert resolve_prefill_mode(StarSettings(), cpu) == "eager"
    assert resolve_prefill_mode(StarSettings(), gpu) == "graph"
    assert resolve_prefill_mode(StarSettings(block_size=32768), gpu) == "eager"  # compute-bound: nothing to win
    assert resolve_prefill_mode(StarSettings(block_size=32768, prefill="graph"), gpu) == "graph"
    assert resolve_prefill_mode(StarSettings(anchor_query=True), gpu) == "eager"
    assert resolve_prefill_mode(StarSettings(simulated_hosts=2), gpu) == "eager"
    assert resolve_prefill_mode(StarSettings(prefill="eager"), gpu) == "eager"
    assert resolve_prefill_mode(StarSettings(), gpu, length_dependent_rope=True) == "eager"
    with pytest.raises(ValueError, match=r"cannot capture this model's rope"):
        resolve_prefill_mode(StarSettings(prefill="graph"), gpu, length_dependent_rope=True)
    with pytest.raises(ValueError, match=r"--model\.prefill graph captures CUDA graphs on one GPU"):
        resolve_prefill_mode(StarSettings(prefill="graph"), cpu)


@needs_cuda
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "mistral"])
def test_a_replayed_phase1_equals_the_uncaptured_one(family: str) -> None:
    """Requests of one length class on one engine: the first runs its blocks as they are, the second captures them,
    the third replays them (the ragged last block padded); every request's K/V and answer equal the eager engine's."""
    overrides = {"sliding_window": 48} if family in ("mistral", "gemma3") else {}
    model = tiny_model(family, dtype=torch.float32, **overrides).cuda()
    use_star_attention(model)
    graphed, eager = KernelChoice(), KernelChoice()
    settings = GenerationSettings(max_new_tokens=6)
    with torch.no_grad():
        for seed in range(4):
            context = random_tokens(300 - seed, seed=seed).cuda()  # ragged last blocks of 44..41 tokens
            query = random_tokens(5, seed=20 + seed).cuda()
            runs = []
            for kernels, prefill in ((graphed, "graph"), (eager, "eager")):
                star = StarSettings(block_size=64, prefill=prefill, decode="graph")
                runs.append(generate(model, context, query, SingleHostGroup(), star, settings, kernels=kernels))
            assert runs[0].token_ids == runs[1].token_ids
            for layer in range(model.config.num_hidden_layers):
                a, b = runs[0].context.store, runs[1].context.store
                assert a is not None and b is not None and a.length == b.length
                torch.testing.assert_close(a.view(layer)[0], b.view(layer)[0], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(a.view(layer)[1], b.view(layer)[1], rtol=1e-5, atol=1e-5)
                assert torch.equal(a.positions(layer), b.positions(layer))
            del runs, a, b  # a store kept alive keeps its buffers from the next request
            gc.collect()
    assert graphed.prefill_failure is None
    assert graphed.prefill_captures == 5  # five blocks of 64 (the last padded), captured at the second request
    assert graphed.prefill_replays == 5 * 3  # from the second request on
    assert eager.prefill_captures == eager.prefill_replays == 0


def test_a_kept_decode_step_is_keyed_by_what_the_window_decides_not_by_the_exact_length() -> None:
    """Requests of other lengths replay the step kept with the buffers; only whether a sliding window can cut
    something (the last position against the window) tells steps apart."""
    group = SingleHostGroup()
    plain, windowed = tiny_model("llama"), tiny_model("mistral", sliding_window=8)
    assert StaticDecoder.key(plain, group, "graph", 300) == StaticDecoder.key(plain, group, "graph", 5)
    assert StaticDecoder.key(windowed, group, "graph", 300) == StaticDecoder.key(windowed, group, "graph", 250)
    assert StaticDecoder.key(windowed, group, "graph", 7) != StaticDecoder.key(windowed, group, "graph", 8)
    # every one-host group captures alike (no collective in the step); a group of another kind is its own
    assert StaticDecoder.key(plain, group, "graph", 300) == StaticDecoder.key(plain, SingleHostGroup(), "graph", 300)
    other = type("OtherGroup", (SingleHostGroup,), {})()
    assert StaticDecoder.key(plain, group, "graph", 300) != StaticDecoder.key(plain, other, "graph", 300)
    assert StaticDecoder.key(plain, group, "graph", 300) != StaticDecoder.key(plain, group, "compile", 300)


@needs_cuda
@pytest.mark.parametrize(
    ("family", "dtype"), [("llama", torch.float32), ("mistral", torch.float32), ("mistral", torch.bfloat16)]
)
def test_the_decode_step_captured_for_one_request_replays_for_the_next(family: str, dtype: torch.dtype) -> None:
    """The next request's store gets the last one's buffers, and with them its captured decode step: no capture,
    for contexts of other lengths too, and with a sliding window (mistral, window 8; in bf16 its windowed calls take
    the split-KV kernel and, in a captured block, sdpa_masked) the same tokens."""
    model = tiny_model(family, dtype=dtype, **({"sliding_window": 8} if family == "mistral" else {}))
    use_star_attention(model)
    model = model.cuda()
    star, settings = StarSettings(block_size=64, decode="graph"), GenerationSettings(max_new_tokens=8)
    kernels, group = KernelChoice(), SingleHostGroup()  # one engine, one group: as a predict process serves
    setups = []
    with torch.no_grad():
        for seed, length in enumerate((200, 190, 180)):
            context, query = random_tokens(length, seed=seed).cuda(), random_tokens(5, seed=30 + seed).cuda()
            result = generate(model, context, query, group, star, settings, kernels=kernels)
            fresh = generate(model, context, query, SingleHostGroup(), star, settings)
            assert result.token_ids == fresh.token_ids
            setups.append(result.stats.decode_setup_s)
            del result, fresh
            gc.collect()
    assert setups[0] > 0 and setups[1] == setups[2] == 0.0


def test_encode_context_on_cpu_runs_blocks_eagerly() -> None:
    model = _model()
    kernels = KernelChoice()
    with torch.no_grad():
        encode_context(model, random_tokens(200, seed=0), SingleHostGroup(), StarSettings(block_size=64),
                       extra_capacity=8, kernels=kernels)  # fmt: skip
    assert kernels.prefill_captures == kernels.prefill_replays == 0


class _HostSyncs(TorchDispatchMode):
    """Counts the ops that bring a device value to the host (a sync on a GPU: ``.item()``, ``nonzero``, ...)."""

    SYNCS = ("aten._local_scalar_dense", "aten.nonzero", "aten.equal", "aten.is_nonzero", "aten.item")

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if str(func).startswith(self.SYNCS):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("attention", ["star", "dense"])
def test_phase1_brings_nothing_back_to_the_host(attention: str) -> None:
    """No host sync anywhere in a one-host Phase 1 (a captured block cannot have one, and an eager one would drain the
    launch queue at every layer): counted as the ops that would sync on a GPU."""
    model = _model("llama", dtype=torch.float32)
    star = StarSettings(attention=attention, block_size=64 if attention == "star" else 300)
    context = random_tokens(300, seed=0)
    with torch.no_grad(), _HostSyncs() as syncs:
        encode_context(model, context, SingleHostGroup(), star, extra_capacity=8)
    assert syncs.seen == []
