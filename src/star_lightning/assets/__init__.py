"""Files shipped inside the package: the tiny default model used when no ``--model.pretrained`` is given."""

from __future__ import annotations

import pathlib

DEFAULT_MODEL_DIR: pathlib.Path = pathlib.Path(__file__).resolve().parent / "tiny_lm"

__all__ = ["DEFAULT_MODEL_DIR", "default_model_path"]


def default_model_path() -> pathlib.Path:
    """Folder of the shipped tiny Llama (weights, tokenizer, model card).

    Raises FileNotFoundError naming the folder when the package was installed without its assets, so the
    failure points at packaging rather than at transformers' hub lookup.
    """
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"The shipped default model is missing: no config.json in {DEFAULT_MODEL_DIR}. "
            "Reinstall star_lightning with its package data (assets/**), or pass --model.pretrained DIR."
        )
    return DEFAULT_MODEL_DIR
