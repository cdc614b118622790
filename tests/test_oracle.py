"""The frontier's oracle (bench/oracle*.py, scripts/fidelity_oracle.py): its masked forward against the engine, every
cell at its limit against its reference, the cost model's extras, and the script's resume."""

from __future__ import annotations

import json

import pytest
import torch

from script_loader import load_script
from star_lightning.assets import default_model_path
from star_lightning.bench.oracle import register_oracle_attention, star_mask
from star_lightning.bench.oracle_cells import Request, encode_cells, parse_cell, run_request
from star_lightning.bench.oracle_costs import extra_cost, llama_8b_scale
from star_lightning.engine.encode import encode_context
from star_lightning.engine.forward import num_layers
from star_lightning.engine.request import answer
from star_lightning.engine.settings import GenerationSettings, StarSettings
from star_lightning.models import load_model, load_tokenizer
from star_lightning.parallel.group import SingleHostGroup
from star_lightning.partition import plan_blocks
from star_lightning.tokens import context_ids, query_ids

BLOCK = 40
TEXT = (
    "The grass is green. The sky is blue. One of the special magic numbers for quiet-river is: 4817263. "
    "The sun is yellow. Here we go. " * 2
)
QUESTION = "What is the special magic number for quiet-river mentioned in the provided text? The number is"


def _model(dtype: torch.dtype, oracle: bool = True):
    model = load_model(str(default_model_path()), dtype=dtype, devices=[torch.device("cpu")], attention="star")
    if oracle:
        register_oracle_attention(model)
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(default_model_path()))


@pytest.fixture(scope="module")
def model32():
    return _model(torch.float32)


@pytest.fixture(scope="module")
def engine32():
    """The engine's own model (Star Attention's function, not the oracle's)."""
    return _model(torch.float32, oracle=False)


@pytest.fixture(scope="module")
def model64():
    return _model(torch.float64)


def _request(tokenizer) -> tuple[Request, object]:
    context = torch.tensor([context_ids(tokenizer, TEXT)])  # [1, T]
    question = torch.tensor([query_ids(tokenizer, QUESTION)])  # [1, q]
    settings = GenerationSettings(max_new_tokens=6, eos_token_ids=frozenset([tokenizer.eos_token_id]))
    plan = plan_blocks(context.shape[1], BLOCK, 1, BLOCK)
    return Request("test/0", context, question, question, settings), plan


def _engine_kv(model, request: Request, star: StarSettings) -> tuple[list, list[int]]:
    extra = request.query.shape[1] + request.settings.max_new_tokens
    with torch.inference_mode():
        context = encode_context(model, request.context, SingleHostGroup(), star, extra_capacity=extra)
        assert context.store is not None
        kv = [tuple(t.clone() for t in context.store.view(layer)) for layer in range(num_layers(model))]
        tokens, _ = answer(model, context, request.query, SingleHostGroup(), star, request.settings)
    return kv, tokens


def _close(a: list, b: list, atol: float) -> float:
    worst = max(float((x - y).abs().max()) for pa, pb in zip(a, b, strict=True) for x, y in zip(pa, pb, strict=True))
    assert worst <= atol, worst
    return worst


def test_oracle_star_and_dense_match_the_engine(model32, engine32, tokenizer):
    """Star's Phase 1 as one masked forward = the engine's star with one played host per block (K/V within float32
    tolerance, the same answer); the oracle's dense = the engine's dense."""
    request, plan = _request(tokenizer)
    assert plan.num_blocks >= 4
    cells = [parse_cell("star"), parse_cell("dense")]
    oracle = dict(encode_cells(model32, request, plan, cells))
    answers = run_request(model32, request, plan, cells)
    star = StarSettings(attention="star", block_size=BLOCK, anchor_block_size=BLOCK, simulated_hosts=0, decode="eager")
    star_kv, star_tokens = _engine_kv(engine32, request, star)
    _close(oracle["star"], star_kv, 2e-5)
    assert answers["star"] == star_tokens
    dense_kv, dense_tokens = _engine_kv(engine32, request, StarSettings(attention="dense", decode="eager"))
    _close(oracle["dense"], dense_kv, 2e-5)
    assert answers["dense"] == dense_tokens
    # Star really differs from dense here (else the comparisons above could not tell them apart).
    assert max(float((s[0] - d[0]).abs().max()) for s, d in zip(star_kv, dense_kv, strict=True)) > 1e-3


def test_every_cell_at_its_limit_equals_its_reference(model64, tokenizer):
    """float64: every token replaced (any chooser) and Delta with gamma = 1 give dense's K/V and answer; nothing
    replaced and a wider context of 0 tokens give star's K/V to the bit."""
    request, plan = _request(tokenizer)
    to_dense = ["oracle_r100", "attn_sum_r100", "attn_max_r100", "random_r100", "first_r100", "delta_g1"]
    to_star = ["oracle_r0", "attn_sum_r0", "attn_max_r0", "random_r0", "first_r0", f"wider_b{BLOCK + 1}"]
    cells = [parse_cell(name) for name in ["dense", "star", *to_dense, *to_star]]
    kv = dict(encode_cells(model64, request, plan, cells))
    answers = run_request(model64, request, plan, [parse_cell("dense"), parse_cell("star")])
    for name in to_dense:
        _close(kv[name], kv["dense"], 1e-10)
    for name in to_star:
        assert all(
            torch.equal(a, b) for pa, pb in zip(kv[name], kv["star"], strict=True) for a, b in zip(pa, pb, strict=True)
        ), name
    # The engine's lookback of 0 tokens (block // (block + 1)) is the engine's star: the masked star's K/V, to float64.
    engine = dict(
        encode_cells(model64, request, plan, [parse_cell(f"lookback_b{BLOCK + 1}"), parse_cell("lookback_b2")])
    )
    _close(engine[f"lookback_b{BLOCK + 1}"], kv["star"], 1e-10)
    assert not torch.allclose(engine["lookback_b2"][-1][0], kv["star"][-1][0])
    from star_lightning.bench.oracle import answer_over

    assert answer_over(model64, kv["oracle_r100"], request.query, request.settings) == answers["dense"]
    assert answer_over(model64, kv["delta_g1"], request.query, request.settings) == answers["dense"]
    assert answer_over(model64, kv["random_r0"], request.query, request.settings) == answers["star"]
    # Between the limits the cells differ from both (they are not star or dense under another name).
    partial = dict(encode_cells(model64, request, plan, [parse_cell("oracle_r20"), parse_cell("delta_g4")]))
    for name in partial:
        assert not torch.equal(partial[name][-1][0], kv["star"][-1][0])
        assert not torch.equal(partial[name][-1][0], kv["dense"][-1][0])


def test_masks_of_the_cells():
    """Star's mask: the anchor and the own block causally; the wider context adds the previous block's tail only."""
    plan = plan_blocks(40, 10, 1, 10)
    star = star_mask(plan, 3)
    assert star[25].nonzero().squeeze(1).tolist() == [*range(10), 20, 21, 22, 23, 24, 25]
    wider = star_mask(plan, 3, tail=4)
    assert wider[25].nonzero().squeeze(1).tolist() == [*range(10), 16, 17, 18, 19, 20, 21, 22, 23, 24, 25]
    assert torch.equal(wider[:20], star[:20])  # the second block's previous block is the anchor
    aq = star_mask(plan, 3, prefix_question="anchor")
    assert aq[25, 43:].all() and not aq[25, 40:43].any() and not aq[43, 10:40].any()
    spava = star_mask(plan, 3, prefix_question="context")
    assert spava[43, :40].all()


def test_extra_costs_at_the_8b_scale():
    """Nothing exact costs nothing; more replaced tokens or smaller gamma cost more; every cell's extra stays below
    dense's."""
    scale = llama_8b_scale()
    cost = {name: extra_cost(parse_cell(name), scale) for name in
            ["star", "random_r0", "random_r10", "random_r20", "delta_g16", "delta_g4", "wider_b8", "wider_b2", "dense",
             "spava", "aq", "lookback_b8", "lookback_b2"]}  # fmt: skip
    assert cost["star"]["extra_flops"] == cost["random_r0"]["extra_flops"] == 0
    assert 0 < cost["random_r10"]["extra_phase1"] < cost["random_r20"]["extra_phase1"]
    assert 0 < cost["delta_g16"]["extra_phase1"] < cost["delta_g4"]["extra_phase1"]
    assert 0 < cost["wider_b8"]["extra_phase1"] < cost["wider_b2"]["extra_phase1"]
    assert all(c["extra_phase1"] < cost["dense"]["extra_phase1"] for n, c in cost.items() if n != "dense")
    assert cost["spava"]["extra_bytes"] > 0 and cost["aq"]["extra_flops"] > 0
    # A lookback recomputes its tokens (their projections too) where the wider mask only attends: it costs more, and
    # sends nothing.
    assert 0 < cost["lookback_b8"]["extra_phase1"] < cost["lookback_b2"]["extra_phase1"]
    assert cost["lookback_b8"]["extra_phase1"] > cost["wider_b8"]["extra_phase1"]
    assert cost["lookback_b8"]["extra_bytes"] == cost["lookback_b2"]["extra_bytes"] == 0


def test_bad_cell_names_are_refused():
    for name in ["oracle_r101", "delta_g0", "nonsense", "wider_b0", "lookback_b0"]:
        with pytest.raises(ValueError):
            parse_cell(name)


def _script():
    return load_script("fidelity_oracle")


def test_the_script_resumes_without_redoing_cells(tmp_path, monkeypatch):
    """A run stopped after one request resumes with the next; a torn last line is redone; other settings over the same
    work folder are refused (exit 2)."""
    script = _script()
    calls: list[tuple[str, list[str]]] = []
    real = script.run_request

    def counting(model, request, plan, cells):
        calls.append((request.key, [c.name for c in cells]))
        return real(model, request, plan, cells)

    monkeypatch.setattr(script, "run_request", counting)
    work, out = tmp_path / "work", tmp_path / "frontier"
    common = ["--length", "1024", "--tasks", "niah_single_1", "--num-samples", "3", "--cells", "dense", "star",
              "--work", str(work), "--out", str(out)]  # fmt: skip
    assert script.main([*common, "--requests", "1"]) == 0
    assert [len(c) for _, c in calls] == [2]
    results = work / "results.jsonl"
    lines = results.read_text().splitlines()
    assert len(lines) == 2
    results.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # killed while writing the second cell
    calls.clear()
    assert script.main([*common, "--requests", "2"]) == 0
    assert [c for _, c in calls] == [[json.loads(lines[1])["cell"]], ["dense", "star"]]
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.endswith("}")]
    assert sorted((r["cell"], r["index"]) for r in rows) == [("dense", 0), ("dense", 1), ("star", 0), ("star", 1)]
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["cells"]["dense"]["tasks"]["niah_single_1"]["n"] == 2
    assert {r["device"] for r in rows} == {"cpu"} and summary["device"] == "cpu"  # where the answers were made
    assert "(cpu, float32, greedy)" in out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit) as stopped:
        script.main([*common, "--block-divisor", "4"])
    assert stopped.value.code == 2


def test_a_model_with_windows_or_soft_caps_is_refused_before_its_weights(tmp_path, capsys):
    """The oracle's masked forward models global attention only: a Gemma-like model is one line, exit 2, before any
    request file or weights (a folder holding only its config)."""
    from model_zoo import tiny_config

    script = _script()
    for family, overrides, named in (
        ("gemma3", {"sliding_window": 16}, "sliding-window attention (1 layers of"),
        ("gemma2", {"sliding_window": None}, "soft-capped attention logits (5.0)"),
    ):
        folder = tmp_path / family
        tiny_config(family, **overrides).save_pretrained(folder)
        with pytest.raises(SystemExit) as stopped:
            script.main(["--model", str(folder), "--length", "1024", "--work", str(tmp_path / "w"), "--out",
                         str(tmp_path / "f")])  # fmt: skip
        assert stopped.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and named in err[0], err
    assert not (tmp_path / "w").exists()
