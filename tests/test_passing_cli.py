"""The query in the anchor and passing tokens through ``star-lightning predict``: two real processes write what one
process playing two hosts writes, the run record carries the options (a resume with other ones is refused), a
context with the query in its anchor is never reused for another query, and bad values are one line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model_zoo import random_tokens, tiny_model
from star_lightning.cli import main
from star_lightning.engine.request import generate
from star_lightning.engine.settings import GenerationSettings, StarSettings
from star_lightning.models import use_star_attention
from star_lightning.parallel.group import SingleHostGroup
from test_cli import _predict_args, _read, _run_cli
from test_families_cli import CONTEXTS, QUERY, _save_family

BLOCKS = ["--model.block_size", "40", "--model.anchor_block_size", "24"]
QUERY_AWARE = ["--model.anchor_query", "true", "--model.passing_tokens", "4", "--model.passing_selection", "per_head"]


@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_family("gemma2", tmp_path_factory.mktemp("gemma2"))


@pytest.fixture(scope="module")
def requests_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("requests") / "in.jsonl"
    rows = [{"input_context": c, "input_query": QUERY, "index": i, "outputs": ["x"]} for i, c in enumerate(CONTEXTS)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _predictions(path: Path) -> dict[int, str]:
    return {index: row["pred"] for index, row in _read(path).items()}


def test_two_processes_write_what_two_played_hosts_write(gemma2_dir: Path, requests_file: Path, tmp_path: Path) -> None:
    """Soft-capping, cutting windows, the query in the anchor and per-head passing tokens over 2 real hosts (gloo)."""
    played = tmp_path / "played.jsonl"
    args = _predict_args(gemma2_dir, requests_file, played, *BLOCKS, *QUERY_AWARE, "--model.simulate_hosts", "2")
    assert main([*args, "--trainer.devices", "1"]) == 0
    two = tmp_path / "two.jsonl"
    result = _run_cli(_predict_args(gemma2_dir, requests_file, two, *BLOCKS, *QUERY_AWARE, "--trainer.devices", "2"),
                      tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert _predictions(two) == _predictions(played)
    record = json.loads(Path(f"{two}.run.json").read_text())["prediction_settings"]
    assert record["anchor_query"] is True and record["passing_tokens"] == 4 and record["hosts"] == 2
    assert json.loads(Path(f"{played}.run.json").read_text())["prediction_settings"]["hosts"] == 2
    # Another query-aware setting is another run: refused, naming it.
    again = _run_cli(_predict_args(gemma2_dir, requests_file, two, *BLOCKS, "--trainer.devices", "1"), tmp_path)
    assert again.returncode == 2 and "anchor_query true -> false" in again.stderr, again.stderr[-2000:]


def test_a_context_with_the_query_in_its_anchor_answers_only_that_query() -> None:
    model = tiny_model("llama")
    use_star_attention(model)
    context, first, second = random_tokens(70, seed=1), random_tokens(5, seed=2), random_tokens(5, seed=3)
    star = StarSettings(block_size=16, anchor_block_size=12, anchor_query=True)
    with torch.no_grad():
        kept = generate(model, context, first, SingleHostGroup(), star, GenerationSettings(4))
        other = generate(model, context, second, SingleHostGroup(), star, GenerationSettings(4), kept=kept.context)
        fresh = generate(model, context, second, SingleHostGroup(), star, GenerationSettings(4))
        same = generate(model, context, first, SingleHostGroup(), star, GenerationSettings(4), kept=other.context)
    assert not other.stats.context_reused and other.token_ids == fresh.token_ids
    assert same.stats.context_reused is False  # the kept context is the second query's now
    again = generate(model, context, first, SingleHostGroup(), star, GenerationSettings(4), kept=kept.context)
    assert again.stats.context_reused and again.token_ids == kept.token_ids


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (["--model.passing_tokens", "-1"], "--model.passing_tokens -1: expected 0 (off) or a positive number"),
        (
            ["--model.passing_tokens", "41"],
            "--model.passing_tokens 41: expected at most a block's tokens",
        ),
        (["--model.attention", "ring", "--model.anchor_query", "true"], "--model.anchor_query true applies to star"),
        (["--model.attention", "dense", "--model.passing_tokens", "4"], "--model.passing_tokens 4 applies to star"),
        (["--model.anchor", "false", "--model.passing_tokens", "4"], "needs the anchor"),
        (["--model.passing_pool_kernel", "4"], "--model.passing_pool_kernel 4: expected an odd number"),
        (["--model.simulate_hosts", "-1"], "--model.simulate_hosts -1: expected 1 (off), more hosts, or 0"),
        (["--model.simulate_hosts", "2", "--trainer.devices", "2"], "plays every host in one process"),
    ],
)
def test_bad_query_aware_options_are_one_line(
    options: list[str], needle: str, requests_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _predict_args(tmp_path / "no-model-needed", requests_file, tmp_path / "o.jsonl", "--model.block_size", "40")
    args = [a for a in args if a not in ("--model.pretrained", str(tmp_path / "no-model-needed"))]
    assert main([*args, *options]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
