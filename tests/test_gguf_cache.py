"""A GGUF file's config and tokenizer are read from the file once, then from the folder they were saved to."""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers

from star_lightning import gguf_cache
from star_lightning.models import load_config, load_tokenizer
from test_gguf import GGUF, pytestmark  # noqa: F401 -- the same skips: the file and the gguf extra

TEXTS = ["The grass is green. The special magic number is 4711.", "ünïcödé 数字 🎉 <|im_start|>user\nhi<|im_end|>"]


def test_the_metadata_is_read_from_the_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert GGUF is not None
    monkeypatch.setenv("STAR_LIGHTNING_CACHE", str(tmp_path / "cache"))
    reference_config = transformers.AutoConfig.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
    reference_tokenizer = transformers.AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)

    config = load_config(str(GGUF))  # the first read: from the file, saved
    folders = list(gguf_cache.cache_root().iterdir())
    assert len(folders) == 1 and (folders[0] / "config.json").is_file() and (folders[0] / "tokenizer.json").is_file()

    reads: list[str] = []
    for auto in (transformers.AutoConfig, transformers.AutoTokenizer):
        original = auto.from_pretrained

        def counting(*args, _original=original, **kwargs):
            if "gguf_file" in kwargs:
                reads.append(kwargs["gguf_file"])
            return _original(*args, **kwargs)

        monkeypatch.setattr(auto, "from_pretrained", counting)
    tokenizer = load_tokenizer(str(GGUF))
    assert load_config(str(GGUF)).to_dict() == config.to_dict()
    assert reads == []  # the second load and the tokenizer came from the saved folder

    assert config.to_dict() == {**reference_config.to_dict(), "_name_or_path": str(GGUF.parent)}
    assert type(tokenizer) is type(reference_tokenizer)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (
        reference_tokenizer.bos_token_id,
        reference_tokenizer.eos_token_id,
    )
    assert tokenizer.chat_template == reference_tokenizer.chat_template
    for text in TEXTS:
        for special in (True, False):
            ids = tokenizer(text, add_special_tokens=special)["input_ids"]
            assert ids == reference_tokenizer(text, add_special_tokens=special)["input_ids"]
            assert tokenizer.decode(ids) == reference_tokenizer.decode(ids)


def test_an_unwritable_cache_reads_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert GGUF is not None
    blocked = tmp_path / "file"
    blocked.write_text("")  # the cache's parent is a file: nothing can be made under it
    monkeypatch.setenv("STAR_LIGHTNING_CACHE", str(blocked / "star_lightning"))
    assert gguf_cache.metadata_folder(GGUF) is None
    assert load_config(str(GGUF)).model_type == "llama"


def test_a_truncated_cache_entry_is_rebuilt_not_blamed_on_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(Two reads of the GGUF file: ~30 s on a CPU core.)"""
    assert GGUF is not None
    monkeypatch.setenv("STAR_LIGHTNING_CACHE", str(tmp_path / "cache"))
    config = load_config(str(GGUF))
    (folder,) = gguf_cache.cache_root().iterdir()
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text[: len(text) // 2])  # cut short on disk, its marker intact
    assert load_config(str(GGUF)).to_dict() == config.to_dict()
    assert (folder / "config.json").read_text() == text


def test_the_weights_are_dequantized_once_then_read_from_their_safetensors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first load reads the GGUF file and saves its dequantized weights; the second reads only those, and holds
    the same tensors bit for bit (and answers the same logits); a weights file cut short is not read."""
    import torch

    from star_lightning.models import load_model

    assert GGUF is not None
    monkeypatch.setenv("STAR_LIGHTNING_CACHE", str(tmp_path / "cache"))
    cpu = [torch.device("cpu")]
    first = load_model(str(GGUF), dtype=torch.bfloat16, devices=cpu, attention="dense")
    folder = gguf_cache.weights_folder(GGUF, "bfloat16")
    assert folder is not None and (folder / "model.safetensors").is_file()
    assert gguf_cache.weights_folder(GGUF, "float32") is None  # one dtype's weights are not another's

    reads: list[str] = []
    original = transformers.AutoModelForCausalLM.from_pretrained

    def counting(*args, **kwargs):
        reads.append(str(kwargs.get("gguf_file")))
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", counting)
    second = load_model(str(GGUF), dtype=torch.bfloat16, devices=cpu, attention="dense")
    assert reads == ["None"]  # one load, from the cached folder, no GGUF file
    assert second.config._name_or_path == first.config._name_or_path == str(GGUF.parent)
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    assert second.get_output_embeddings().weight.data_ptr() == second.get_input_embeddings().weight.data_ptr()
    ids = torch.tensor([[1, 504, 3458, 314, 2380, 30, 378, 2656, 314]])
    for model in (first, second):
        model.set_attn_implementation("sdpa")  # outside the engine: transformers' own attention
    with torch.no_grad():
        assert torch.equal(first(ids).logits, second(ids).logits)

    weights = folder / "model.safetensors"
    with weights.open("r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)  # cut short on disk, its marker intact
    assert gguf_cache.weights_folder(GGUF, "bfloat16") is None  # read from the file again, and saved again
    monkeypatch.setenv(gguf_cache.WEIGHTS_CACHE_ENV, "0")
    assert gguf_cache.save_weights(GGUF, first, "bfloat16") is None  # turned off: nothing written or read
    assert gguf_cache.weights_folder(GGUF, "bfloat16") is None
    monkeypatch.delenv(gguf_cache.WEIGHTS_CACHE_ENV)
    assert gguf_cache.save_weights(GGUF, first, "float32") is None  # tensors not of the asked dtype: not saved
    assert gguf_cache.save_weights(GGUF, first, "bfloat16") == folder and gguf_cache.weights_folder(GGUF, "bfloat16")
