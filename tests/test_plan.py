"""The cost model of ``star-lightning plan``: parameter counts, per-host bytes and FLOPs, fits and suggested fixes."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from model_zoo import FAMILIES, tiny_config
from star_lightning.errors import ConfigurationError
from star_lightning.partition import plan_blocks
from star_lightning.plan import (
    GpuSpec,
    Layout,
    ModelShape,
    Request,
    check_fits,
    costs,
    hardware,
    known_gpu,
    phase1_flops_per_host,
    plan_request,
    ring_spans,
    suggest_changes,
)

GIB = 1024**3
# A small Llama: 2 layers, width 64, 4 heads of 16, 2 KV heads, MLP 128, vocabulary 100, untied.
SMALL = LlamaConfig(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=100,
    tie_word_embeddings=False,
)
LLAMA_8B = LlamaConfig(
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=14336,
    vocab_size=128256,
    tie_word_embeddings=False,
)
# Memory and rates chosen so the numbers are easy to check; times are what they divide.
GPU = GpuSpec("test GPU", 80 * GIB, 1e15, 4e12, "given")


def _meta_model_params(config) -> tuple[int, int]:
    """(all parameters, projection weights of one layer) of transformers' own model, built on the meta device."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    layer = [p for n, p in model.named_parameters() if ".layers.0." in n and n.endswith("proj.weight")]
    return total, sum(p.numel() for p in layer)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("bias", [False, True])
def test_shape_counts_the_parameters_transformers_builds(family: str, bias: bool) -> None:
    config = tiny_config(family)
    if bias and hasattr(config, "attention_bias"):
        config.attention_bias = True
    if bias and hasattr(config, "mlp_bias"):
        config.mlp_bias = True
    if bias:
        config.tie_word_embeddings = True
    total, layer_matmul = _meta_model_params(config)
    shape = ModelShape.from_config(config, torch.bfloat16)
    assert shape.exact
    assert shape.total_params == total
    assert shape.layer_matmul_params == layer_matmul
    assert shape.bytes_per_element == 2 and shape.dtype == "bfloat16"
    assert shape.head_dim == getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    assert shape.weight_bytes == 2 * total


def test_shape_of_llama_3_1_8b() -> None:
    shape = ModelShape.from_config(LLAMA_8B, "bfloat16")
    assert shape.total_params == 8_030_261_248  # Llama-3.1-8B's published parameter count
    assert shape.kv_bytes_per_token == 131_072  # 32 layers x 2 x 8 heads x 128 x 2 bytes
    assert shape.decode_weight_bytes == (8_030_261_248 - 128256 * 4096) * 2  # all but the input embedding


def test_shape_refuses_a_mixture_of_experts() -> None:
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    config.num_local_experts = 8
    with pytest.raises(ConfigurationError, match="mixture of experts"):
        ModelShape.from_config(config)


def test_star_plan_by_hand() -> None:
    """1000 tokens, blocks of 256, anchor 128, 3 hosts: host 0 block 0, host 1 block 1, host 2 blocks 2 and 3."""
    shape = ModelShape.from_config(SMALL, "bfloat16")
    layout = Layout(method="star", hosts=3, block_size=256, anchor_block_size=128, anchor_source="host")
    request = Request(context_tokens=1000, query_tokens=16, max_new_tokens=8)
    plan = plan_request(shape, layout, request, GPU)

    blocks = plan_blocks(1000, 256, 3, 128)
    assert [h.blocks for h in plan.hosts] == [tuple(b.index for b in blocks.blocks_of(h)) for h in range(3)]
    assert [h.blocks for h in plan.hosts] == [(0,), (1,), (2, 3)]
    assert [h.context_tokens for h in plan.hosts] == [256, 256, 488]

    # Per layer: q 64x64, k and v 64x32, o 64x64, MLP 3 x 64x128 = 36864; lm_head 100 x 64; attention
    # 4 x 2 layers x 4 heads x 16 = 512 FLOPs per visible pair.
    def forward(tokens: int, prefix: int) -> int:
        return 2 * 2 * 36864 * tokens + 2 * 6400 + 512 * (tokens * prefix + tokens * (tokens + 1) // 2)

    assert forward(256, 0) == 54_604_288
    expected = [
        forward(256, 0),
        forward(128, 0) + forward(256, 128),
        forward(128, 0) + forward(256, 128) + forward(232, 128),
    ]
    assert [h.phase1_flops for h in plan.hosts] == expected
    assert phase1_flops_per_host(shape, layout, 1000) == expected

    # 256 bytes of K/V per token (2 layers x K,V x 32 x 2 bytes), and a stored token's int64 position per layer
    # (16 bytes); the query host also holds 16 + 8 tokens. The anchor, not stored, has no positions.
    assert [h.kv_context_bytes for h in plan.hosts] == [256 * 272, 256 * 272, 488 * 272]
    assert [h.kv_anchor_bytes for h in plan.hosts] == [0, 128 * 256, 128 * 256]
    assert [h.kv_query_bytes for h in plan.hosts] == [0, 0, 24 * 272]
    # 2 x (36864 + 2 norms of 64) + embedding + final norm + lm_head, 2 bytes each.
    assert all(h.weight_bytes == 2 * (2 * (36864 + 128) + 6400 + 64 + 6400) for h in plan.hosts)
    for host in plan.hosts:
        assert host.peak_bytes == host.weight_bytes + host.kv_bytes + host.activation_bytes
        assert host.phase1_bytes == 0
    # The largest forward of a non-first host is a block attended after the anchor (a merged prefix partial).
    assert plan.hosts[1].activation_bytes == round(costs.activation_bytes(shape, 256, merged=True))
    assert plan.fullest.host == 2


def _profiled_peak_bytes(fn) -> int:
    """Peak of the bytes ``fn`` holds allocated at once on the CPU, from the profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        fn()
    events = [e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
    alive = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        alive += event.nbytes()
        peak = max(peak, alive)
    return peak


@pytest.mark.parametrize(
    ("heads", "head_dim", "intermediate"),
    [(4, 64, 704), (16, 64, 128)],  # the MLP's moment is the peak; then the rotation of a wide q
)
def test_counted_activations_match_the_allocations_of_transformers_forward(
    heads: int, head_dim: int, intermediate: int
) -> None:
    """The count of live tensors against what transformers' Llama forward allocates (bf16, CPU, no weights counted)."""
    from transformers import LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=256,
        num_hidden_layers=3,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        head_dim=head_dim,
        intermediate_size=intermediate,
        vocab_size=1000,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    tokens = 1024
    ids = torch.randint(0, 1000, (1, tokens))

    def forward() -> None:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)  # K/V are then activations only

    forward()  # warm-up: lazy initialisation stays out of the measurement
    shape = ModelShape.from_config(config, torch.bfloat16)
    assert costs.counted_activation_bytes(shape, tokens) == pytest.approx(_profiled_peak_bytes(forward), rel=0.02)


def test_activation_bytes_scale_with_tokens_and_split_with_tensor_parallelism() -> None:
    shape = ModelShape.from_config(LLAMA_8B, "bfloat16")
    fixed = costs.ACTIVATION_FIXED_BYTES
    one, two = costs.activation_bytes(shape, 1000) - fixed, costs.activation_bytes(shape, 2000) - fixed
    assert two == pytest.approx(2 * one)
    small = ModelShape.from_config(SMALL, "bfloat16")  # narrow MLP: the merge's temporaries make the peak
    assert costs.activation_bytes(small, 1000, merged=True) > costs.activation_bytes(small, 1000)
    assert costs.activation_bytes(shape, 1000, tensor_parallel=2) < costs.activation_bytes(shape, 1000)


def test_ring_zigzag_balances_the_hosts_and_both_layouts_do_exact_causal_attention() -> None:
    shape = ModelShape.from_config(SMALL, "bfloat16")
    context, hosts = 10_003, 4
    zigzag = phase1_flops_per_host(shape, Layout(method="ring", hosts=hosts, ring_layout="zigzag"), context)
    contiguous = phase1_flops_per_host(shape, Layout(method="ring", hosts=hosts, ring_layout="contiguous"), context)
    chunk = context // (2 * hosts)
    assert max(zigzag) - min(zigzag) <= costs.forward_flops(shape, chunk)  # within one chunk's worth
    assert max(contiguous) - min(contiguous) > 10 * costs.forward_flops(shape, chunk)
    assert contiguous.index(max(contiguous)) == hosts - 1  # the last chunk sees every earlier one
    # Exact attention: every host's pairs together are the whole context's causal pairs (each host keeps one logit).
    dense = costs.forward_flops(shape, context)
    lm_head = 2 * shape.lm_head_params
    assert sum(zigzag) == pytest.approx(dense + (hosts - 1) * lm_head)
    assert sum(contiguous) == pytest.approx(dense + (hosts - 1) * lm_head)

    spans = ring_spans(context, hosts, "zigzag")
    chunks = [span for host in spans for span in host]
    assert sorted(chunks)[0][0] == 0 and sorted(chunks)[-1][1] == context
    assert sum(b - a for a, b in chunks) == context
    assert spans[0][1] == sorted(chunks)[-1]  # host 0 holds chunk 0 and chunk 2H-1


def test_ring_plan_holds_messages_and_sends_every_chunk_to_every_other_host() -> None:
    shape = ModelShape.from_config(SMALL, "bfloat16")
    request = Request(8000, 16, 8)
    ring = plan_request(shape, Layout(method="ring", hosts=4), request, GPU)
    # Every host's K/V travels to the H-1 others: the bytes sent add up to (H-1) x the context's K/V.
    assert sum(h.phase1_bytes for h in ring.hosts) == 3 * 8000 * shape.kv_bytes_per_token
    one_host = plan_request(shape, Layout(method="ring", hosts=1), request, GPU)
    assert one_host.hosts[0].phase1_bytes == 0
    with pytest.raises(ConfigurationError, match="too short"):
        plan_request(shape, Layout(method="ring", hosts=4), Request(7), GPU)


def test_anchor_sources_differ_in_flops_bytes_and_memory_as_the_engine_runs_them() -> None:
    shape = ModelShape.from_config(LLAMA_8B, "bfloat16")
    request = Request(131072, 32, 32)
    base = Layout(method="star", hosts=2, block_size=32768)  # 4 blocks: host 1 has blocks 2 and 3
    plans = {source: plan_request(shape, replace(base, anchor_source=source), request, GPU) for source in
             ("broadcast", "host", "block")}  # fmt: skip
    anchor = 32768
    anchor_forward = costs.forward_flops(shape, anchor)
    first = {source: plan.hosts[0] for source, plan in plans.items()}
    second = {source: plan.hosts[1] for source, plan in plans.items()}

    # FLOPs: broadcast runs no anchor forward; host runs it once; block recomputes it before every block.
    assert second["host"].phase1_flops - second["broadcast"].phase1_flops == pytest.approx(anchor_forward)
    assert second["block"].phase1_flops > second["host"].phase1_flops
    assert first["host"].phase1_flops - first["broadcast"].phase1_flops == 0  # host 0 computes its block anyway
    assert first["block"].phase1_flops > first["host"].phase1_flops  # its block 1 is recomputed after the anchor

    # Bytes sent: only host 0 under broadcast, the anchor's K/V to the one other host.
    assert first["broadcast"].phase1_bytes == anchor * shape.kv_bytes_per_token
    assert all(h.phase1_bytes == 0 for s in ("host", "block") for h in plans[s].hosts)
    assert second["broadcast"].phase1_bytes == 0

    # Memory: the anchor's K/V received (broadcast) or computed (host) is held in Phase 1; block keeps none but
    # runs larger forwards.
    assert second["broadcast"].kv_anchor_bytes == second["host"].kv_anchor_bytes == anchor * 131072
    assert second["block"].kv_anchor_bytes == 0
    assert second["block"].activation_bytes > second["host"].activation_bytes
    assert plans["block"].predicted_phase1_s > plans["host"].predicted_phase1_s > plans["broadcast"].predicted_phase1_s

    one_host = {s: plan_request(shape, replace(base, hosts=1, anchor_source=s), request, GPU) for s in plans}
    assert one_host["broadcast"].hosts == one_host["host"].hosts  # one host: nothing to broadcast


def test_floors_and_predictions() -> None:
    shape = ModelShape.from_config(LLAMA_8B, "bfloat16")
    request = Request(131072, 32, 32)
    plan = plan_request(shape, Layout(method="star", hosts=4, block_size=32768), request, GPU)
    assert plan.phase1_floor_s == pytest.approx(max(h.phase1_flops for h in plan.hosts) / GPU.matmul_flops)
    query_host_kv = (32768 + 64) * 131072
    assert plan.decode_floor_ms == pytest.approx(1e3 * (shape.decode_weight_bytes + query_host_kv) / 4e12)
    assert plan.predicted_phase1_s > plan.phase1_floor_s
    assert plan.predicted_decode_ms_per_token > plan.decode_floor_ms
    assert plan.predicted_ttft_s > plan.predicted_phase1_s
    record = plan.record()
    json.dumps(record)  # JSON-ready
    assert record["fits"] is True and len(record["hosts"]) == 4
    for key in ("blocks", "context_tokens", "kv_bytes", "weight_bytes", "peak_bytes", "phase1_s"):
        assert all(key in host for host in record["hosts"])
    for key in ("phase1_floor_s", "decode_floor_ms", "predicted_ttft_s", "predicted_peak_gib", "predicted_phase1_s"):
        assert record[key] is not None

    no_rates = plan_request(shape, plan.layout, request, GpuSpec("x", 80 * GIB, None, None, "given"))
    assert no_rates.predicted_ttft_s is None and no_rates.predicted_peak_gib == plan.predicted_peak_gib


def test_tensor_parallel_and_gpus_per_host_split_memory_per_gpu() -> None:
    shape = ModelShape.from_config(LLAMA_8B, "bfloat16")
    request = Request(131072, 32, 32)
    one = plan_request(shape, Layout(hosts=4, block_size=32768), request, GPU).hosts[3]
    tensor = plan_request(shape, Layout(hosts=4, block_size=32768, tensor_parallel_size=2), request, GPU).hosts[3]
    layers = plan_request(shape, Layout(hosts=4, block_size=32768, gpus_per_host=2), request, GPU).hosts[3]
    # The K/V heads split over T; each shard keeps every stored token's position (8 bytes per layer), whole.
    positions = (32768 + 64) * 8 * shape.layers
    assert tensor.kv_bytes == pytest.approx((one.kv_bytes - positions) / 2 + positions, abs=2)
    assert tensor.weight_bytes == pytest.approx(one.weight_bytes / 2, rel=1e-6)
    assert tensor.phase1_flops == one.phase1_flops and tensor.phase1_s < 0.6 * one.phase1_s
    assert layers.weight_bytes < 0.6 * one.weight_bytes and layers.kv_bytes == pytest.approx(one.kv_bytes / 2, abs=2)
    assert layers.phase1_s == pytest.approx(one.phase1_s)  # layers one after the other: the speed of one GPU
    assert layers.host_peak_bytes > layers.peak_bytes
    assert tensor.host_kv_bytes == pytest.approx(one.host_kv_bytes + positions, abs=4)
    assert layers.host_kv_bytes == pytest.approx(one.host_kv_bytes, abs=4)
    with pytest.raises(ConfigurationError, match="must divide"):
        plan_request(shape, Layout(hosts=4, block_size=32768, tensor_parallel_size=3), request, GPU)


def test_layout_errors_are_the_validators() -> None:
    shape = ModelShape.from_config(SMALL, "bfloat16")
    with pytest.raises(ConfigurationError, match="fewer than the 4 hosts"):
        plan_request(shape, Layout(hosts=4, block_size=512), Request(1000), GPU)
    with pytest.raises(ConfigurationError, match="one process"):
        plan_request(shape, Layout(method="dense", hosts=2), Request(1000), GPU)
    with pytest.raises(ConfigurationError, match="anchor_block_size"):
        plan_request(shape, Layout(block_size=128, anchor_block_size=256), Request(1000), GPU)


@pytest.mark.parametrize(
    "layout",
    [
        Layout(method="star", hosts=4, block_size=262144),  # activations and the anchor are too big
        Layout(method="star", hosts=2, block_size=32768),  # the context's K/V is too big
        Layout(method="ring", hosts=2),
        Layout(method="dense", hosts=1),
    ],
)
def test_suggested_changes_fit_and_are_the_smallest_of_their_kind(layout: Layout) -> None:
    shape = ModelShape.from_config(LLAMA_8B, "bfloat16")
    request = Request(1048576, 128, 128)
    h100 = known_gpu("H100")
    plan = plan_request(shape, layout, request, h100)
    assert not plan.fits
    suggestions = suggest_changes(shape, plan)
    assert suggestions
    for suggestion in suggestions:
        assert plan_request(shape, suggestion.layout, request, h100).fits
        options = dict(suggestion.options)
        if suggestion.change == "more hosts":
            fewer = replace(suggestion.layout, hosts=suggestion.layout.hosts - 1)
            assert fewer.hosts == layout.hosts or not plan_request(shape, fewer, request, h100).fits
            assert options["--trainer.strategy.context_parallel_size"] == str(suggestion.layout.hosts)
        if suggestion.change.startswith("smaller blocks"):
            assert int(options["--model.block_size"]) < layout.block_size
    assert [s.layout.gpus_per_request for s in suggestions] == sorted(s.layout.gpus_per_request for s in suggestions)
    if layout.method == "dense":
        assert dict(suggestions[-1].options).get("--model.attention") == "ring" or any(
            dict(s.options).get("--model.attention") == "ring" for s in suggestions
        )


def test_tensor_parallel_is_suggested_when_the_strategy_has_it() -> None:
    shape = ModelShape.from_config(LLAMA_8B, "bfloat16")
    plan = plan_request(shape, Layout(hosts=2, block_size=32768), Request(1048576), known_gpu("H100"))
    changes = {s.change: s for s in suggest_changes(shape, plan, max_tensor_parallel=8)}
    tensor = changes["tensor parallelism"]
    assert tensor.layout.tensor_parallel_size in (2, 4, 8) and tensor.plan.fits
    assert "layers over more GPUs per host" not in changes


def test_check_fits_names_the_host_the_bytes_and_the_fix() -> None:
    request = Request(1048576, 128, 128)
    layout = Layout(hosts=4, block_size=262144)
    h100 = known_gpu("H100")
    with pytest.raises(ConfigurationError) as error:
        check_fits(LLAMA_8B, dtype=torch.bfloat16, layout=layout, request=request, gpu=h100)
    message = str(error.value)
    assert "\n" not in message
    assert "host 3 needs" in message and "of the 79.6 GiB of NVIDIA H100 80GB HBM3" in message
    assert "weights 15.0, KV 64.1" in message and "--model.block_size" in message
    plan = check_fits(LLAMA_8B, dtype=torch.bfloat16, layout=replace(layout, hosts=8, block_size=131072),
                      request=request, gpu=h100)  # fmt: skip
    assert plan.fits


def test_known_gpus_and_the_rates_cache(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    h100 = known_gpu("H100")
    assert h100.memory_gib == pytest.approx(79.65, abs=0.01) and h100.matmul_flops == 798e12
    assert known_gpu("NVIDIA H200").copy_bytes_per_s == 4.19e12
    assert "datasheet" in known_gpu("A100-40GB").source
    with pytest.raises(ConfigurationError, match="unknown GPU"):
        known_gpu("TPU v5")

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert hardware.rates_cache_path() == tmp_path / "star_lightning" / "gpu_rates.json"
    assert hardware.read_cached_rates("NVIDIA H200") is None
    hardware.write_cached_rates("NVIDIA H200", "bfloat16", {"matmul_flops": 7e14, "copy_bytes_per_s": 4e12})
    hardware.write_cached_rates("NVIDIA A100-SXM4-80GB", "bfloat16", {"matmul_flops": 2.9e14, "copy_bytes_per_s": 1e12})
    assert hardware.read_cached_rates("NVIDIA H200")["matmul_flops"] == 7e14
    assert hardware.read_cached_rates("NVIDIA H200", "float32") is None
    assert set(json.loads(hardware.rates_cache_path().read_text())) == {"NVIDIA H200", "NVIDIA A100-SXM4-80GB"}
    hardware.rates_cache_path().write_text("{ torn")
    assert hardware.read_cached_rates("NVIDIA H200") is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_measure_rates_on_this_gpu(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    gpu = hardware.measure_rates()
    assert gpu.matmul_flops > 1e13 and gpu.copy_bytes_per_s > 1e11
    assert hardware.read_cached_rates(gpu.name)["matmul_flops"] == gpu.matmul_flops
    assert hardware.measure_rates() == gpu  # the second call reads the cache


def test_a_lookback_adds_its_rows_to_every_later_block_and_nothing_else() -> None:
    """``lookback_tokens`` W: each non-first block's forward recomputes min(W, its start past the anchor) more rows,
    causal among themselves after the anchor, the block's rows seeing them too; nothing is sent, nothing more kept."""
    shape = ModelShape.from_config(LLAMA_8B, "bfloat16")
    request = Request(131072, 32, 32)
    base = Layout(method="star", hosts=4, block_size=16384)  # 8 blocks, anchor = block: 2 a host
    lookback = 4096
    star = plan_request(shape, base, request, GPU)
    wider = plan_request(shape, replace(base, lookback_tokens=lookback), request, GPU)
    prefix = 16384
    for host, (a, b) in enumerate(zip(star.hosts, wider.hosts, strict=True)):
        extra = 0.0
        for index in a.blocks:
            if index < 2:  # the first block, and the second, whose lookback is the anchor itself
                continue
            rows = 16384 + lookback
            before = costs.linear_flops(shape, 16384) + costs.attention_flops(shape, costs.causal_pairs(16384, prefix))
            after = costs.linear_flops(shape, rows) + costs.attention_flops(shape, costs.causal_pairs(rows, prefix))
            extra += after - before
        assert b.phase1_flops - a.phase1_flops == pytest.approx(extra), f"host {host}"
        assert (b.phase1_bytes, b.kv_context_bytes) == (a.phase1_bytes, a.kv_context_bytes)
    assert wider.hosts[0].phase1_flops - star.hosts[0].phase1_flops == 0  # blocks 0 and 1: no lookback
    assert wider.predicted_ttft_s > star.predicted_ttft_s
    assert plan_request(shape, replace(base, lookback_tokens=0), request, GPU) == star
