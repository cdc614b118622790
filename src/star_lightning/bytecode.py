"""Compiled bytecode for the libraries a command imports, kept in the cache folder where their install keeps none.

A ``predict`` process imports some 4,000 modules (torch, Lightning, transformers, torchmetrics). Python keeps each
one's compiled bytecode beside its source (``__pycache__``) when the install wrote it or the process may write it.
An image whose torch was installed without bytecode (``pip install --no-compile``) and which sets
``PYTHONDONTWRITEBYTECODE=1`` (many container images do) has none and writes none, so every process of every job
compiles torch again. Measured on a lent H100 image (torch 2.11: 0 of its 2,141 modules compiled,
``PYTHONDONTWRITEBYTECODE=1``): importing ``predict``'s modules took 16.4-17.6 s a process; with the bytecode kept in
a cache folder (``PYTHONPYCACHEPREFIX``) 9.9 s, after one run of 30 s that wrote it (`benchmarks/NOTES.md`).

So before a command imports them (:func:`keep_in_cache`): when a probed library has no bytecode beside its source and
none can be written there (``PYTHONDONTWRITEBYTECODE`` set, or its folder read-only), this process and the processes
it starts (Lightning's ranks) keep bytecode under ``CACHE/pycache`` (``sys.pycache_prefix``, and
``PYTHONPYCACHEPREFIX`` in the environment; the cache folder of :mod:`star_lightning.parser_cache`). The first run
writes it, every later one reads it; the source folders are never written to. Left as it is: an install that has its
bytecode, a process that may write it, a ``PYTHONPYCACHEPREFIX`` the user set, ``STAR_LIGHTNING_BYTECODE_CACHE=0``,
and a cache folder that cannot be written. Standard library only: it runs before the heavy imports.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from star_lightning.parser_cache import cache_folder, cache_switched_off

PROBES = ("torch", "transformers", "lightning")
"""The libraries whose bytecode is looked at: the bulk of what a command imports."""
SWITCH = "STAR_LIGHTNING_BYTECODE_CACHE"
"""``0`` (or ``false``, ``off``, ``no``): never keep bytecode in the cache folder."""


def missing(probes: Sequence[str] = PROBES) -> list[str]:
    """The probed libraries that every process compiles from source: no bytecode for their ``__init__`` beside it,
    and none can be written there (``sys.dont_write_bytecode``, or a read-only folder). Located, not imported."""
    out = []
    for name in probes:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        origin = spec.origin if spec is not None else None
        if origin is None or not origin.endswith(".py"):
            continue
        cached = importlib.util.cache_from_source(origin)  # beside the source: no prefix is set here
        if os.path.exists(cached) or (not sys.dont_write_bytecode and _can_write(os.path.dirname(cached))):
            continue  # compiled already, or this process compiles it once for every later one
        out.append(name)
    return out


def _can_write(pycache: str) -> bool:
    if os.path.isdir(pycache):
        return os.access(pycache, os.W_OK)
    return os.access(os.path.dirname(pycache), os.W_OK)


def folder() -> Path:
    return cache_folder() / "pycache"


def keep_in_cache(probes: Sequence[str] = PROBES) -> Path | None:
    """Keep bytecode under :func:`folder` for this process and its children where :func:`missing` finds a library
    compiled from source every time; the folder used, or None (left as it was)."""
    if cache_switched_off(SWITCH):
        return None
    if sys.pycache_prefix is not None or os.environ.get("PYTHONPYCACHEPREFIX"):
        return None  # the user's own choice
    if not missing(probes):
        return None
    target = folder()
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    if not os.access(target, os.W_OK):
        return None
    sys.pycache_prefix = str(target)
    sys.dont_write_bytecode = False
    os.environ["PYTHONPYCACHEPREFIX"] = str(target)  # the ranks Lightning starts, and their imports
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    return target
