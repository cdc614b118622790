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
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
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
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    assert gguf_cache.metadata_folder(GGUF) is None
    assert load_config(str(GGUF)).model_type == "llama"


def test_a_truncated_cache_entry_is_rebuilt_not_blamed_on_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(Two reads of the GGUF file: ~30 s on a CPU core.)"""
    assert GGUF is not None
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    config = load_config(str(GGUF))
    (folder,) = gguf_cache.cache_root().iterdir()
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text[: len(text) // 2])  # cut short on disk, its marker intact
    assert load_config(str(GGUF)).to_dict() == config.to_dict()
    assert (folder / "config.json").read_text() == text
