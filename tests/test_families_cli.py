"""Every supported family through ``star-lightning predict``: tiny models built from configs, saved with a tokenizer
as a user's folder, loaded by the CLI for dense, ring and star.

Each family keeps what makes it itself: Mistral a sliding window that cuts, Gemma-2 soft-capping with alternating
sliding-window layers that cut, Gemma-3 its hybrid stack (a sliding-window layer that cuts, then a global one, with
a rope per layer type and q/k norms), Phi-3 longrope with prompts longer than its original length, Granite its
attention multiplier, Qwen-3 and OLMo-2 their q/k norms. Dense runs as one block on one host through the engine, so
the independent reference is the model's own: transformers' greedy decoding with its eager attention.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from model_zoo import FAMILIES, tiny_config
from star_lightning.cli import main
from star_lightning.engine.request import generate
from star_lightning.engine.settings import StarSettings
from star_lightning.models import load_model, load_tokenizer
from star_lightning.module import StarAttentionLM
from star_lightning.parallel.group import SingleHostGroup
from test_cli import _predict_args, _read, _run_cli
from tokenizer_factory import BOS, build_tokenizer

CONTEXTS = [
    "The grass is green. The sky is blue. " * 12 + "The secret code is 4711.",  # 139 tokens
    BOS + "Mary moved to the bathroom. John went to the hallway. " * 8,  # begins with the BOS text
]
QUERY = " What is the number?"
WINDOW = 32  # below every context: the windows cut
FAMILY_OVERRIDES: dict[str, dict] = {
    "mistral": {"sliding_window": WINDOW},
    "gemma2": {"sliding_window": WINDOW},
    "gemma3": {"sliding_window": WINDOW},
    "phi3": {
        "original_max_position_embeddings": 64,
        "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
                            "long_factor": [1.0 + i / 2 for i in range(8)], "original_max_position_embeddings": 64,
                            "partial_rotary_factor": 1.0},
    },
}  # fmt: skip
STAR_BLOCKS = ["--model.block_size", "40", "--model.anchor_block_size", "24"]


def _save_family(family: str, directory: Path) -> Path:
    tokenizer = build_tokenizer(directory)
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    config = tiny_config(family, vocab_size=len(tokenizer), **special, **FAMILY_OVERRIDES.get(family, {}))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # sharper attention: a wrong mask changes the generated text
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "qkv_proj.weight")):
                param.mul_(4.0)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {family: _save_family(family, tmp_path_factory.mktemp(family)) for family in FAMILIES}


@pytest.fixture(scope="module")
def requests_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("requests") / "in.jsonl"
    rows = [{"input_context": c, "input_query": QUERY, "index": i, "outputs": ["x"]} for i, c in enumerate(CONTEXTS)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _predict(model_dir: Path, data: Path, output: Path, *extra: str) -> dict[int, str]:
    assert main(_predict_args(model_dir, data, output, "--trainer.devices", "1", *extra)) == 0
    return {index: row["pred"] for index, row in _read(output).items()}


def _own_predictions(model_dir: Path) -> dict[int, str]:
    """What the model itself writes: transformers' greedy decoding with its own (eager) attention, 6 new tokens."""
    model = load_model(str(model_dir), dtype=torch.float64, devices=[torch.device("cpu")], attention="dense")
    model.set_attn_implementation("eager")
    module = StarAttentionLM(pretrained=str(model_dir), max_new_tokens=6, dtype="float64")
    module.model, module.tokenizer = model, load_tokenizer(str(model_dir))
    eos = sorted(module.generation_settings(0).eos_token_ids)
    out = {}
    for index, context in enumerate(CONTEXTS):
        context_ids, query_ids = module.encode_request({"input_context": context, "input_query": QUERY})
        prompt = torch.cat([context_ids, query_ids], dim=1)
        with torch.no_grad():
            generated = model.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                eos_token_id=eos, pad_token_id=module.tokenizer.pad_token_id,
            )  # fmt: skip
        tokens = [t for t in generated[0, prompt.shape[1] :].tolist() if t not in eos]
        out[index] = module.decode_text(tokens)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_family_runs_through_the_cli(family: str, family_dirs: dict[str, Path], requests_file: Path, tmp_path) -> None:
    """dense, ring and one-block star write what the model itself writes (transformers' own attention and greedy
    decoding); star with several blocks writes what the engine generates on the same loaded model (the CLI adds no
    difference of its own)."""
    model_dir = family_dirs[family]
    dense = _predict(model_dir, requests_file, tmp_path / "dense.jsonl", "--model.attention", "dense")
    assert dense == _own_predictions(model_dir)
    assert _predict(model_dir, requests_file, tmp_path / "ring.jsonl", "--model.attention", "ring") == dense
    assert _predict(model_dir, requests_file, tmp_path / "one.jsonl", "--model.block_size", "100000") == dense
    blocks = _predict(model_dir, requests_file, tmp_path / "blocks.jsonl", *STAR_BLOCKS)

    model = load_model(str(model_dir), dtype=torch.float64, devices=[torch.device("cpu")], attention="star")
    module = StarAttentionLM(pretrained=str(model_dir), max_new_tokens=6, dtype="float64")
    module.model, module.tokenizer = model, load_tokenizer(str(model_dir))
    star = StarSettings(block_size=40, anchor_block_size=24)
    for index, context in enumerate(CONTEXTS):
        context_ids, query_ids = module.encode_request({"input_context": context, "input_query": QUERY})
        with torch.no_grad():
            result = generate(model, context_ids, query_ids, SingleHostGroup(), star, module.generation_settings(0))
        assert module.decode_text(result.token_ids) == blocks[index]


def test_two_hosts_write_what_one_host_writes_for_gemma2(
    family_dirs: dict[str, Path], requests_file: Path, tmp_path: Path
) -> None:
    """Soft-capping and cutting windows over 2 real hosts (gloo): the same predictions as one host."""
    model_dir = family_dirs["gemma2"]
    one = _predict(model_dir, requests_file, tmp_path / "one.jsonl", *STAR_BLOCKS)
    two_out = tmp_path / "two.jsonl"
    args = _predict_args(model_dir, requests_file, two_out, *STAR_BLOCKS, "--trainer.devices", "2")
    result = _run_cli(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {index: row["pred"] for index, row in _read(two_out).items()} == one


def test_gemma3_on_one_to_three_hosts_writes_what_one_host_and_dense_write(
    family_dirs: dict[str, Path], requests_file: Path, tmp_path: Path
) -> None:
    """Gemma-3's hybrid stack over real gloo processes: the ring over 3 == dense on one (exact); star's blocks over 3
    hosts == the same blocks on one host (the anchor's window cut by true positions on every host; 2 hosts: the
    Gemma-2 test above)."""
    model_dir = family_dirs["gemma3"]
    dense = _predict(model_dir, requests_file, tmp_path / "dense.jsonl", "--model.attention", "dense")
    one = _predict(model_dir, requests_file, tmp_path / "one.jsonl", *STAR_BLOCKS)
    for hosts, extra, expected in (("3", ("--model.attention", "ring"), dense), ("3", STAR_BLOCKS, one)):
        out = tmp_path / f"{extra[1]}_{hosts}.jsonl"
        result = _run_cli(_predict_args(model_dir, requests_file, out, *extra, "--trainer.devices", hosts), tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert {index: row["pred"] for index, row in _read(out).items()} == expected, (hosts, extra)


def test_a_context_that_begins_with_bos_gets_no_second_one(family_dirs: dict[str, Path]) -> None:
    module = StarAttentionLM(pretrained=str(family_dirs["llama"]))
    module.tokenizer = load_tokenizer(str(family_dirs["llama"]))
    bos = module.tokenizer.bos_token_id
    for text in (BOS + "Mary moved to the bathroom.", "Mary moved to the bathroom."):
        context, _ = module.encode_request({"input_context": text, "input_query": QUERY})
        ids = context[0].tolist()
        assert ids[0] == bos and ids[1] != bos  # exactly one BOS, whether the text brought it or the tokenizer
        assert ids[1:] == module.tokenizer(text.removeprefix(BOS), add_special_tokens=False)["input_ids"]


def test_a_tokenizer_without_bos_leaves_the_context_alone(tmp_path: Path) -> None:
    """A tokenizer that adds no BOS (and has none): the context is tokenized as it is."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2, "?": 3}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    assert tokenizer.bos_token is None
    module = StarAttentionLM()
    module.tokenizer = tokenizer
    context, query = module.encode_request({"input_context": "a b a", "input_query": "?"})
    assert context[0].tolist() == [1, 2, 1] and query[0].tolist() == [3]


def test_a_missing_gguf_file_or_another_file_is_named(
    requests_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "model.gguf"
    assert main(_predict_args(missing, requests_file, tmp_path / "o.jsonl", "--trainer.devices", "1")) == 2
    assert "GGUF file" in capsys.readouterr().err
    pickle = tmp_path / "pytorch_model.bin"
    pickle.write_bytes(b"not loaded")
    assert main(_predict_args(pickle, requests_file, tmp_path / "o.jsonl", "--trainer.devices", "1")) == 2
    assert "is a file" in capsys.readouterr().err
