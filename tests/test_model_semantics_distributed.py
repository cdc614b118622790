"""The model's own semantics over real hosts (2 gloo processes): a sliding window that cuts across ring hops and
across star's hosts, and a longrope regime set by the prompt length on every host."""

from __future__ import annotations

import torch

from distributed_utils import run_on_ranks
from star_lightning.engine.decode import encode_query
from star_lightning.engine.encode import encode_context
from star_lightning.engine.request import generate
from star_lightning.engine.settings import GenerationSettings, StarSettings
from star_lightning.models import use_star_attention
from star_lightning.parallel.group import SingleHostGroup
from star_lightning.parallel.torch_group import DistributedContextGroup
from test_model_semantics import CONTEXT, PROMPT, QUERY, _hf_logits, _tol, random_tokens, rope_model, windowed_model

CASES = ("mistral", "gemma2", "longrope")
SETTINGS = {
    "ring/zigzag": StarSettings(attention="ring", ring_layout="zigzag"),
    "ring/contiguous": StarSettings(attention="ring", ring_layout="contiguous"),
    "star": StarSettings(attention="star", block_size=16, anchor_block_size=16),
}
NEW = 6


def _model(case: str):
    return rope_model(case) if case == "longrope" else windowed_model(case)


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    return random_tokens(CONTEXT, seed=21), random_tokens(QUERY, seed=22)


def _host_results(group) -> dict:
    """First-token logits and greedy tokens of every case and setting, as this host sees them."""
    context, query = _inputs()
    out: dict = {}
    with torch.no_grad():
        for case in CASES:
            for name, star in SETTINGS.items():
                model = _model(case)
                use_star_attention(model)
                encoded = encode_context(model, context, group, star, extra_capacity=QUERY, prompt_length=PROMPT)
                assert encoded.store is not None
                logits = encode_query(model, encoded.store, query, CONTEXT, group)
                tokens = generate(_star_model(case), context, query, group, star, GenerationSettings(NEW)).token_ids
                out[f"{case}/{name}"] = (logits, tokens)
    return out


def _star_model(case: str):
    model = _model(case)
    use_star_attention(model)
    return model


def _on_host(rank: int, world_size: int) -> dict:
    return _host_results(DistributedContextGroup(None, list(range(world_size)), torch.device("cpu")))


def test_ring_hops_and_star_hosts_keep_windows_and_rope_regime(tmp_path) -> None:
    """Ring over 2 hosts (both layouts) == transformers' dense forward; star over 2 hosts == star on one host (same
    blocks), logits on every host and greedy tokens."""
    single = _host_results(SingleHostGroup())
    context, query = _inputs()
    prompt = torch.cat([context, query], dim=1)
    dense = {case: _hf_logits(_model(case), prompt) for case in CASES}
    for case in CASES:
        tol = _tol(_model(case))
        # On one host the ring is dense attention (the float64 checks of test_model_semantics.py).
        torch.testing.assert_close(single[f"{case}/ring/zigzag"][0], dense[case], **tol)
    for result in run_on_ranks(_on_host, 2, tmp_path):
        for case in CASES:
            tol = _tol(_model(case))
            for layout in ("zigzag", "contiguous"):
                logits, tokens = result[f"{case}/ring/{layout}"]
                torch.testing.assert_close(logits, dense[case], **tol)
                assert tokens == single[f"{case}/ring/{layout}"][1]
            logits, tokens = result[f"{case}/star"]
            torch.testing.assert_close(logits, single[f"{case}/star"][0], **tol)
            assert tokens == single[f"{case}/star"][1]
