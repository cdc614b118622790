"""A GGUF file's config and tokenizer, read from the file once and kept as a small model folder.

Why: transformers reads a GGUF file's metadata with ``gguf``'s reader, which builds a numpy view per element of the
tokenizer's arrays (Gemma-3's 262,144 tokens, scores and types): 15-20 s per read on a CPU core, and ``predict``
read it four times before its first request (the config in the checks and again for the weights, the tokenizer, the
weights themselves). The config and the tokenizer do not change while the file does not, so the first read saves
them with transformers' own ``save_pretrained`` into ``gguf/<key>/`` of star_lightning's cache folder
(:func:`cache_root`; a few MB, the tokenizer's ``tokenizer.json``), keyed by the file's fingerprint (name, size,
sampled bytes: :func:`star_lightning.model_files.fingerprint_file`) and the transformers version, and every later
load of either reads that folder.

The weights: reading them from the GGUF file costs as much again (the reader parses every metadata field before the
tensors, then each tensor is dequantized and renamed: 14 s for SmolLM2-135M, 22-35 s for Qwen2.5-Coder-0.5B on a
CPU core), for a result that depends only on the file, the dtype and the transformers version. So the first load in
a dtype writes the dequantized weights as ``model.safetensors`` (with a config.json without the GGUF quantization
entry) into ``<key>-weights-<dtype>/`` beside the metadata folder, and later loads read that folder instead (0.4 s for
SmolLM2-135M): the same tensors, bit for bit (tested). It takes the dequantized size on disk (2 bytes a parameter in
bfloat16: 1 GB for a 0.5B model); ``STAR_LIGHTNING_GGUF_WEIGHTS_CACHE=0`` turns it off.

Where the cache cannot be written (a read-only home), the file is read as before.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from star_lightning.model_files import fingerprint_file
from star_lightning.parser_cache import cache_folder, cache_switched_off

WEIGHTS_CACHE_ENV = "STAR_LIGHTNING_GGUF_WEIGHTS_CACHE"
_WEIGHTS = "model.safetensors"

# Written last, listing every file with its SHA-256: a folder without it is a half-written one (another process, or a
# crash), and one whose files differ from it was cut short or corrupted on disk.
_COMPLETE = "complete"


def cache_root() -> Path:
    """``gguf/`` in star_lightning's cache folder (``$STAR_LIGHTNING_CACHE``, else ``$XDG_CACHE_HOME/star_lightning``,
    else ``~/.cache/star_lightning``)."""
    return cache_folder() / "gguf"


def _key(path: Path) -> str:
    import transformers

    return hashlib.sha256(f"{fingerprint_file(path)}\0{transformers.__version__}".encode()).hexdigest()[:24]


def metadata_folder(path: str | os.PathLike[str], *, trust_remote_code: bool = False) -> Path | None:
    """The folder holding the GGUF file's ``config.json`` and tokenizer files, made on first use; None where it
    cannot be written (the caller then reads the file)."""
    source = Path(path)
    folder = cache_root() / _key(source)
    if _whole(folder):
        return folder
    try:  # where nothing can be written, nothing is read twice: find out before reading
        folder.parent.mkdir(parents=True, exist_ok=True)
        if folder.exists():  # not whole: left half-copied by hand, cut short or corrupted on disk, not by a writer
            shutil.rmtree(folder)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".staging."))
    except OSError:
        return None
    from transformers import AutoConfig, AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": source.name, "trust_remote_code": trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(str(source.parent), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), **kwargs)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "source.txt").write_text(f"{source.resolve()}\n", encoding="utf-8")  # for a reader of the cache
        manifest = {item.name: _sha256(item) for item in sorted(staging.iterdir()) if item.is_file()}
        (staging / _COMPLETE).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        try:
            os.replace(staging, folder)
        except OSError:  # another process finished first: its folder is the same
            if not _whole(folder):
                raise
    except OSError:
        return None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _whole(folder: Path) -> bool:
    """The entry holds every file its marker lists, byte for byte (a few MB to hash): a truncated or corrupted entry
    is rebuilt from the GGUF file, rather than read and blamed on the file."""
    try:
        manifest = json.loads((folder / _COMPLETE).read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or "config.json" not in manifest:
            return False
        return all(_sha256(folder / name) == digest for name, digest in manifest.items())
    except (OSError, ValueError):
        return False


def weights_cache_enabled() -> bool:
    return not cache_switched_off(WEIGHTS_CACHE_ENV)


def _weights_folder(path: Path, dtype_name: str) -> Path:
    return cache_root() / f"{_key(path)}-weights-{dtype_name}"


def weights_folder(path: str | os.PathLike[str], dtype_name: str) -> Path | None:
    """The folder of the file's weights dequantized to ``dtype_name`` (``config.json`` and ``model.safetensors``),
    where an earlier load saved them whole; None otherwise (or with the cache turned off)."""
    if not weights_cache_enabled():
        return None
    folder = _weights_folder(Path(path), dtype_name)
    try:
        manifest = json.loads((folder / _COMPLETE).read_text(encoding="utf-8"))
        whole = (
            isinstance(manifest, dict)
            and manifest.get("config.json") == _sha256(folder / "config.json")
            and manifest.get(_WEIGHTS) == (folder / _WEIGHTS).stat().st_size  # a GB: its size, not its hash
        )
    except (OSError, ValueError):
        return None
    return folder if whole else None


def save_weights(path: str | os.PathLike[str], model: Any, dtype_name: str) -> Path | None:
    """Save ``model`` (just loaded from the GGUF file ``path`` in ``dtype_name``) as the file's cached weights, where
    every tensor it holds is a plain one of that dtype (transformers dequantized them all); None where it did not, the
    cache is off or cannot be written. Written into a staging folder and renamed whole: a reader never sees half."""
    import torch
    from safetensors.torch import save_model

    if not weights_cache_enabled():
        return None
    tensors = list(model.state_dict().values())
    dtype = getattr(torch, dtype_name)
    if not all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.dtype == dtype for t in tensors):
        return None  # weights kept quantized, or mixed dtypes: nothing to gain, or not the same model on reload
    folder = _weights_folder(Path(path), dtype_name)
    if weights_folder(path, dtype_name) is not None:
        return folder  # saved by another process while this one read the file
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".staging."))
    except OSError:
        return None
    try:
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the file holds plain tensors: nothing to dequantize on reload
        config.save_pretrained(staging)
        save_model(model, str(staging / _WEIGHTS))  # tied weights saved once, as transformers saves them
        manifest = {"config.json": _sha256(staging / "config.json"), _WEIGHTS: (staging / _WEIGHTS).stat().st_size}
        (staging / _COMPLETE).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        if weights_folder(path, dtype_name) is not None:
            return folder  # another process (a rank of the same host) saved them meanwhile: the same tensors
        if folder.exists():
            shutil.rmtree(folder)  # not whole: cut short on disk, replaced
        os.replace(staging, folder)
    except Exception as error:  # a full disk, a race with another writer: the run goes on, from the file next time
        if not weights_folder(path, dtype_name):
            warnings.warn(f"could not cache the dequantized weights in {folder} ({error}); the next load reads the "
                          "GGUF file again", stacklevel=2)  # fmt: skip
        return None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
