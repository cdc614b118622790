"""``star-lightning plan`` end to end through ``main``: text and JSON, fitting and not, configs, layout errors."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from star_lightning.cli import main
from star_lightning.partition import plan_blocks

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def llama_8b_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An 8B Llama's config.json alone (no weights): all the plan reads. Its positions reach 2M (a long-context
    variant), so the plans up to 1M tokens are requests predict would run."""
    directory = tmp_path_factory.mktemp("llama-3.1-8b")
    LlamaConfig(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
        max_position_embeddings=2**21,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    ).save_pretrained(directory)
    return directory


def _plan(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["plan", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_lists_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--length", "--model.block_size", "--model.attention", "--trainer.strategy", "--trainer.devices",
                   "--gpu_memory_gib", "--gpu", "--matmul_flops", "--format", "--config"):  # fmt: skip
        assert option in text
    with pytest.raises(SystemExit):
        main(["plan", "--trainer.strategy.help", "StarStrategy"])
    strategy_help = capsys.readouterr().out
    assert "--trainer.strategy.context_parallel_size" in strategy_help and "gpus_per_host" in strategy_help
    assert main(["--help"]) == 0 and "plan" in capsys.readouterr().out


def test_a_fitting_layout_in_text_and_json(llama_8b_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--model.pretrained", str(llama_8b_dir), "--length", "131072", "--model.block_size", "32768",
            "--trainer.strategy.context_parallel_size", "4", "--trainer.devices", "8", "--gpu", "H200"]  # fmt: skip
    code, text, _ = _plan(capsys, *args)
    assert code == 0
    assert "fits: the fullest host (3)" in text and "2 request(s) at a time" in text
    assert "8.03B parameters" in text and "NVIDIA H200" in text

    code, out, _ = _plan(capsys, *args, "--format", "json")
    assert code == 0
    record = json.loads(out)
    assert record["fits"] is True
    hosts = record["hosts"]
    blocks = plan_blocks(131072, 32768, 4)
    assert [h["blocks"] for h in hosts] == [[b.index for b in blocks.blocks_of(i)] for i in range(4)]
    assert [h["context_tokens"] for h in hosts] == [32768] * 4
    for host in hosts:
        assert host["peak_bytes"] < 139 * 1024**3 and host["weight_bytes"] == 8_030_261_248 * 2
        assert host["kv_bytes"] >= 32768 * 131072 and host["phase1_s"] > 0
    assert record["layout"]["data_parallel_size"] == 2 and record["suggestions"] == []
    # anchor_source broadcast (the default): hosts 1-3 hold the received anchor during Phase 1, host 0 its sent copy;
    # host 3 stores 128 query + 32 new tokens. Stored tokens also keep their position: 8 bytes per layer.
    stored = 131072 + 160
    assert record["totals"]["kv_bytes"] == stored * (131072 + 32 * 8) + 4 * 32768 * 131072
    assert record["predicted_ttft_s"] > record["phase1_floor_s"] > 0


def test_a_layout_that_does_not_fit_names_the_host_and_a_fix_that_fits(
    llama_8b_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--model.pretrained", str(llama_8b_dir), "--length", "1048576", "--model.block_size", "262144",
            "--trainer.strategy.context_parallel_size", "4", "--gpu", "H100"]  # fmt: skip
    code, text, _ = _plan(capsys, *base)
    assert code == 2
    assert "does not fit: host 3 needs" in text and "of the 79.6 GiB of NVIDIA H100 80GB HBM3" in text
    assert "smallest changes that fit:" in text

    code, out, err = _plan(capsys, *base, "--format", "json")
    assert code == 2
    record = json.loads(out)
    assert record["fits"] is False and not record["hosts"][3]["fits"]
    assert err.count("\n") == 1 and "host 3 needs" in err
    assert record["suggestions"]
    for suggestion in record["suggestions"]:
        fixed = [*base, *(part for pair in suggestion["options"].items() for part in pair), "--format", "json"]
        code, out, _ = _plan(capsys, *fixed)
        assert code == 0, suggestion
        assert json.loads(out)["fits"] is True


def test_a_predict_config_is_accepted(llama_8b_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = REPO / "configs" / "ruler" / "llama-3.1-8b-128k.yaml"
    args = ["--config", str(config), "--model.pretrained", str(llama_8b_dir), "--length", "131072", "--gpu", "H200",
            "--format", "json"]  # fmt: skip
    code, out, _ = _plan(capsys, *args)
    assert code == 0
    record = json.loads(out)
    assert record["layout"]["hosts"] == 4 and record["layout"]["block_size"] == 32768
    assert record["layout"]["anchor_length"] == 32768  # anchor_block_size: ${model.block_size}
    assert record["request"]["max_new_tokens"] == 128
    # The command line after the config changes the interpolated anchor too.
    code, out, _ = _plan(capsys, *args, "--model.block_size", "16384")
    assert code == 0
    assert json.loads(out)["layout"]["anchor_length"] == 16384
    # A 70B config plans with 2 GPUs per host.
    code, out, _ = _plan(capsys, "--config", str(REPO / "configs/ruler/llama-3.1-70b-64k.yaml"),
                         "--model.pretrained", str(llama_8b_dir), "--length", "65536", "--gpu", "H100")  # fmt: skip
    assert code == 0 and "layers over 2 GPUs" in out


def test_the_shipped_model_is_the_default(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _plan(capsys, "--length", "4096", "--model.block_size", "1024",
                         "--trainer.strategy.context_parallel_size", "2", "--gpu", "A100-40GB")  # fmt: skip
    assert code == 0 and "tiny_lm" in out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--trainer.devices", "6", "--trainer.strategy.context_parallel_size", "4"], "not divisible"),
        (["--trainer.strategy.context_parallel_size", "8", "--model.block_size", "2048"], "fewer than the 8 hosts"),
        (["--model.attention", "dense", "--trainer.strategy.context_parallel_size", "2"], "one process"),
        (["--model.block_size", "many"], "model.block_size"),
        (["--trainer.accelerator", "cpu"], "plan predicts GPU runs"),
        (["--config", "no/such/config.yaml"], "is not a file"),
        (["--phase1_efficiency", "0"], "efficiency must be a fraction"),
        (["--gpu_memory_gib", "-1"], "--gpu_memory_gib must be positive"),
        (["--trainer.strategy", "ddp"], "plan models the star strategy"),
    ],
)
def test_layout_errors_are_one_line_and_exit_2(
    llama_8b_dir: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    code, out, err = _plan(capsys, "--model.pretrained", str(llama_8b_dir), "--length", "8192", "--gpu", "H100", *extra)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and message in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU to measure")
def test_without_a_gpu_the_gpu_must_be_named_or_given(llama_8b_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--model.pretrained", str(llama_8b_dir), "--length", "8192", "--model.block_size", "4096"]
    code, _, err = _plan(capsys, *args)
    assert code == 2 and "--gpu" in err and "--gpu_memory_gib" in err
    code, out, _ = _plan(capsys, *args, "--gpu_memory_gib", "40", "--format", "json")
    record = json.loads(out)
    assert code == 0 and record["gpu"]["memory_bytes"] == 40 * 1024**3 and record["predicted_ttft_s"] is None
    given = shlex.split("--gpu_memory_gib 40 --matmul_flops 3e14 --copy_bytes_per_s 1.5e12 --format json")
    code, out, _ = _plan(capsys, *args, *given)
    record = json.loads(out)
    assert code == 0 and record["gpu"]["matmul_flops"] == 3e14 and record["predicted_ttft_s"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_predict_on_a_gpu_refuses_a_layout_that_cannot_fit_before_any_weights_load(tmp_path: Path) -> None:
    """A 405B-shaped model on one GPU: predict's preflight plans the host against this GPU's memory and refuses it in
    one line naming the host, the GPU and the bytes, exit 2, before loading anything (the folder's one safetensors
    file holds a single tiny tensor: loading it would fail differently)."""
    import shutil
    import subprocess
    import sys

    from safetensors.torch import save_file

    from star_lightning.assets import default_model_path

    directory = tmp_path / "405b"  # 0.8 TB of bf16 weights: more than any one GPU (a 70B's 131 GiB fit an H200)
    LlamaConfig(hidden_size=16384, num_hidden_layers=126, num_attention_heads=128, num_key_value_heads=8,
                intermediate_size=53248, vocab_size=128256, max_position_embeddings=131072,
                tie_word_embeddings=False).save_pretrained(directory)  # fmt: skip
    save_file({"placeholder": torch.zeros(1)}, str(directory / "model.safetensors"))
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_path() / file, directory / file)
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"index": 0, "input_context": "a b c " * 200, "input_query": "d?"}) + "\n")
    command = [sys.executable, "-m", "star_lightning", "predict", "--model.pretrained", str(directory),
               "--data.path", str(requests), "--output", str(tmp_path / "out.jsonl"),
               "--trainer.accelerator", "gpu", "--trainer.devices", "1"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    refusal = [line for line in result.stderr.splitlines() if "does not fit" in line]
    assert result.returncode == 2 and len(refusal) == 1, result.stderr[-2000:]
    assert "host 0" in refusal[0] and torch.cuda.get_device_name(0) in refusal[0] and "GiB" in refusal[0]
    assert "Traceback" not in result.stderr and not (tmp_path / "out.jsonl").exists()
