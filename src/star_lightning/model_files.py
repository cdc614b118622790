"""A model folder's files, inspected without loading them: weight files checked, the model fingerprinted.

A truncated or corrupted ``*.safetensors`` file is found here from its header and its size, before any process
loads weights, so the user gets one line naming the file instead of a ``SafetensorError`` traceback per rank.

The fingerprint identifies the model in a run record (``OUT.jsonl.run.json``). Hashing every weight of an 8B model
(16 GB) would cost minutes at every start, so weight files are fingerprinted cheaply: name, size, the whole
safetensors header (every tensor's name, dtype, shape and offsets, and the metadata) and a few 64 KiB samples of the
tensor data. Re-saved or fine-tuned weights change the sampled bytes; a change that spares every sample (a few
edited weights) is not detected. Every other file of the folder that can change a prediction (config,
generation config, tokenizer, model code) is hashed whole.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Any

from star_lightning.errors import ConfigurationError

WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth")
# Files that cannot change a prediction: documentation and licences (editing a model card must not block a resume).
_IGNORED_SUFFIXES = (".md", ".txt.license", ".gitattributes")
_IGNORED_NAMES = ("LICENSE", "LICENSE.txt", "NOTICE", "USE_POLICY.md")
_SAMPLES = 5
_SAMPLE_BYTES = 64 * 1024
_LARGE_FILE = 64 * 2**20
# Bytes per element of safetensors dtypes (sub-byte float formats are left out of the size check).
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the header's size


def safetensors_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The weight files a model folder names: the shards of ``model.safetensors.index.json``, else every
    ``*.safetensors`` file. A shard the index names but the folder lacks is reported."""
    root = Path(folder)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ConfigurationError(
                f"{index} is not a valid safetensors index ({error}); download the model again"
            ) from None
        missing = [name for name in shards if not (root / name).is_file()]
        if missing:
            raise ConfigurationError(
                f"{root} lacks {len(missing)} weight file(s) that model.safetensors.index.json names "
                f"({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}); download the model again"
            )
        return [root / name for name in shards]
    return sorted(root.glob("*.safetensors"))


def read_safetensors_header(path: Path) -> tuple[bytes, dict[str, Any]]:
    """The raw header and its parsed form, after checking that the file holds every byte the header describes."""
    size = path.stat().st_size
    fix = f"{path} is truncated or corrupt"
    hint = "download or copy the model again"
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ConfigurationError(f"{fix}: {size} bytes, too short for a safetensors file; {hint}")
        (header_length,) = struct.unpack("<Q", prefix)
        if header_length > min(_MAX_HEADER, size - 8):
            raise ConfigurationError(
                f"{fix}: its header length field says {header_length} bytes, the file holds {size}; {hint}"
            )
        raw = handle.read(header_length)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except ValueError as error:
        raise ConfigurationError(f"{fix}: its header is not valid JSON ({error}); {hint}") from None
    data_bytes = size - 8 - header_length
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = (int(offset) for offset in info["data_offsets"])
            shape = [int(dim) for dim in info["shape"]]
            dtype = str(info["dtype"])
        except (KeyError, TypeError, ValueError):
            raise ConfigurationError(f"{fix}: the header entry of tensor {name!r} is malformed; {hint}") from None
        element_bytes = _DTYPE_BYTES.get(dtype)
        if stop < begin or (element_bytes is not None and stop - begin != math.prod(shape) * element_bytes):
            raise ConfigurationError(
                f"{fix}: tensor {name!r} ({dtype} {shape}) has offsets [{begin}, {stop}] that do not match its size; "
                f"{hint}"
            )
        end = max(end, stop)
    if end != data_bytes:
        raise ConfigurationError(
            f"{fix}: its header describes {end} bytes of tensor data, the file holds {data_bytes}; {hint}"
        )
    return raw, header


def check_weight_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Every safetensors file of a local model folder, checked from its header and size (no tensor is read)."""
    files = safetensors_files(folder)
    if not files:
        pickled = sorted(path.name for path in Path(folder).iterdir() if path.suffix in (".bin", ".pt", ".pth"))
        found = f" (it holds {', '.join(pickled)}: pickled weights are never loaded)" if pickled else ""
        raise ConfigurationError(
            f"could not load model weights from {str(folder)!r}: no *.safetensors file{found}; convert the weights "
            "to safetensors (transformers: model.save_pretrained(folder, safe_serialization=True))"
        )
    for path in files:
        read_safetensors_header(path)
    return files


def _hash_samples(digest: Any, path: Path, start: int, size: int) -> None:
    """Feed ``_SAMPLES`` evenly spaced chunks of ``path[start:size]`` (the whole range when it is small)."""
    length = size - start
    with path.open("rb") as handle:
        if length <= _SAMPLES * _SAMPLE_BYTES:
            handle.seek(start)
            digest.update(handle.read(length))
            return
        for i in range(_SAMPLES):
            handle.seek(start + (length - _SAMPLE_BYTES) * i // (_SAMPLES - 1))
            digest.update(handle.read(_SAMPLE_BYTES))


def _ignored(path: Path) -> bool:
    return path.name.startswith(".") or path.name in _IGNORED_NAMES or path.name.endswith(_IGNORED_SUFFIXES)


def fingerprint_folder(folder: str | os.PathLike[str]) -> str:
    """``sha256:<hex>`` of a local model folder (see the module docstring for what it covers)."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).iterdir()):
        if not path.is_file() or _ignored(path):
            continue
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        if path.suffix == ".safetensors":
            raw, _ = read_safetensors_header(path)
            digest.update(raw)
            _hash_samples(digest, path, 8 + len(raw), size)
        elif path.suffix in WEIGHT_SUFFIXES or size > _LARGE_FILE:
            _hash_samples(digest, path, 0, size)
        else:
            digest.update(path.read_bytes())
    return f"sha256:{digest.hexdigest()}"


def fingerprint_file(path: str | os.PathLike[str]) -> str:
    """``sha256:<hex>`` of one weights file (a GGUF): its name, size and sampled bytes, as a folder's weights."""
    target = Path(path)
    digest = hashlib.sha256()
    size = target.stat().st_size
    digest.update(f"{target.name}\0{size}\0".encode())
    _hash_samples(digest, target, 0, size)
    return f"sha256:{digest.hexdigest()}"
