"""Write ``star_fe2f9e1.json``: what Star Attention computed at main fe2f9e1, before query-aware anchors and passing
tokens existed (float64, tiny models, 1-3 gloo ranks, every anchor source).

``tests/test_star_golden_distributed.py`` checks that star with ``anchor_query false`` and ``passing_tokens 0``
still computes exactly this: each host's Phase 1 KV, the merged first-token logits and the greedy tokens. Run from
the repository root, at the commit whose numbers the file should hold:

    python tests/golden/make_star_golden.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from distributed_utils import run_on_ranks  # noqa: E402
from model_zoo import random_tokens, tiny_model  # noqa: E402
from star_lightning.cache import KVStore  # noqa: E402
from star_lightning.engine.decode import encode_query  # noqa: E402
from star_lightning.engine.forward import num_layers  # noqa: E402
from star_lightning.engine.prefill import prefill_star  # noqa: E402
from star_lightning.engine.request import generate  # noqa: E402
from star_lightning.engine.settings import GenerationSettings, StarSettings  # noqa: E402
from star_lightning.models import use_star_attention  # noqa: E402
from star_lightning.parallel.group import SingleHostGroup  # noqa: E402
from star_lightning.parallel.torch_group import DistributedContextGroup  # noqa: E402
from star_lightning.partition import plan_blocks  # noqa: E402

CONTEXT, QUERY, NEW, BLOCK = 70, 5, 6, 16
# name: (family, model overrides, anchor_block_size, anchor on)
CASES = {
    "llama/anchor12": ("llama", {}, 12, True),
    "llama/anchor_block": ("llama", {}, None, True),
    "llama/no_anchor": ("llama", {}, None, False),
    "gemma2_window24/anchor12": ("gemma2", {"sliding_window": 24}, 12, True),
}
SOURCES = ("broadcast", "host", "block")


def hexes(tensor: torch.Tensor) -> list[str]:
    return [float(x).hex() for x in tensor.detach().double().flatten().tolist()]


def kv_fingerprint(kv: torch.Tensor) -> torch.Tensor:
    """``[layers, 1, Hkv, T, 2D]`` -> ``[layers, Hkv, T]``: every stored key and value projected on one fixed random
    direction (any change to a stored vector changes its projection; the file stays small)."""
    direction = torch.randn(kv.shape[-1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return (kv[:, 0] @ direction).contiguous()


def host_results(rank: int, world_size: int) -> dict:
    group = SingleHostGroup() if world_size == 1 else DistributedContextGroup(None, list(range(world_size)), "cpu")
    context, query = random_tokens(CONTEXT, seed=1), random_tokens(QUERY, seed=2)
    out: dict = {}
    with torch.no_grad():
        for name, (family, overrides, anchor, use_anchor) in CASES.items():
            model = tiny_model(family, **overrides)
            use_star_attention(model)
            plan = plan_blocks(CONTEXT, BLOCK, world_size, anchor, use_anchor)
            for source in SOURCES:
                store = KVStore(num_layers(model), plan.local_context_length(rank) + QUERY + NEW)
                prefill_star(model, context, plan, group, store, anchor_source=source)
                kv = torch.stack([torch.cat(store.view(layer), dim=-1) for layer in range(store.num_layers)])
                logits = encode_query(model, store, query, CONTEXT, group)
                star = StarSettings(block_size=BLOCK, anchor_block_size=anchor, use_anchor=use_anchor,
                                    anchor_source=source)  # fmt: skip
                tokens = generate(model, context, query, group, star, GenerationSettings(NEW)).token_ids
                out[f"{name}/{source}"] = {"kv": hexes(kv_fingerprint(kv)), "kv_shape": list(kv.shape),
                                           "logits": hexes(logits), "tokens": tokens}  # fmt: skip
    return out


def main() -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    golden: dict = {"commit": commit, "context": CONTEXT, "query": QUERY, "new": NEW, "block": BLOCK, "hosts": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for world_size in (1, 2, 3):
            ranks = run_on_ranks(host_results, world_size, Path(tmp))
            golden["hosts"][str(world_size)] = ranks
    (HERE / f"star_{commit}.json").write_text(json.dumps(golden) + "\n")


if __name__ == "__main__":
    main()
