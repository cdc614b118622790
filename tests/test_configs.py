"""The ready-made configs: up to date with their generator, parseable by ``predict``, values derived as documented."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from script_loader import load_script
from star_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def _make_configs():
    return load_script("make_configs")


def _print_config(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", *args, "--print_config"])
    out = capsys.readouterr().out
    assert exit_info.value.code in (0, None), out
    return yaml.safe_load(out)


def test_committed_configs_are_what_the_generator_writes() -> None:
    make_configs = _make_configs()
    assert set(make_configs.all_configs()) == set(CONFIGS)
    assert make_configs.main(["--check"]) == 0, "configs/ is stale: run python scripts/make_configs.py"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_config_parses_with_the_documented_layout(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _print_config(capsys, "--config", str(path))
    model, strategy = config["model"], config["trainer"]["strategy"]["init_args"]
    if path.name == "demo.yaml":
        assert model["pretrained"] is None  # the shipped model
        return
    length = int(path.stem.split("-")[3].removesuffix("k")) * 1024
    method = model["attention"]
    assert path.stem.endswith(method) or method == "star"
    assert model["dtype"] == "bfloat16"
    if method == "star":
        assert model["block_size"] == model["anchor_block_size"] == length // 4  # the paper's setting
    assert strategy["context_parallel_size"] == (1 if method == "dense" else 4)
    assert config["output"].endswith(f"/{method}.jsonl")
    assert f"/{length // 1024}k" in config["data"]["path"]


def test_interpolated_values_follow_command_line_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    path = REPO / "configs" / "ruler" / "llama-3.1-8b-32k.yaml"
    config = _print_config(capsys, "--config", str(path), "--model.block_size", "4096", "--model.attention", "ring")
    assert config["model"]["anchor_block_size"] == 4096
    assert config["output"] == "outputs/ruler/llama-3.1-8b/32k/ring.jsonl"
    assert config["trainer"]["logger"]["init_args"]["version"] == "ring"
