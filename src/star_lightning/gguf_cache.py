"""A GGUF file's config and tokenizer, read from the file once and kept as a small model folder.

Why: transformers reads a GGUF file's metadata with ``gguf``'s reader, which builds a numpy view per element of the
tokenizer's arrays (Gemma-3's 262,144 tokens, scores and types): 15-20 s per read on a CPU core, and ``predict``
read it four times before its first request (the config in the checks and again for the weights, the tokenizer, the
weights themselves). The config and the tokenizer do not change while the file does not, so the first read saves
them with transformers' own ``save_pretrained`` into ``$XDG_CACHE_HOME/star_lightning/gguf/<key>/`` (``~/.cache``
by default; a few MB, the tokenizer's ``tokenizer.json``), keyed by the file's fingerprint (name, size, sampled
bytes: :func:`star_lightning.model_files.fingerprint_file`) and the transformers version, and every later load of
either reads that folder. The weights are still read from the GGUF file, once per process.

Where the cache cannot be written (a read-only home), the file is read as before.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from star_lightning.model_files import fingerprint_file

# Written last, listing every file with its SHA-256: a folder without it is a half-written one (another process, or a
# crash), and one whose files differ from it was cut short or corrupted on disk.
_COMPLETE = "complete"


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/star_lightning/gguf`` (``~/.cache/...`` when XDG_CACHE_HOME is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "star_lightning" / "gguf"


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
