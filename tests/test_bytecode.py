"""Bytecode kept in the cache folder where an install has none and may not write it (star_lightning.bytecode): found
without importing the library, used by the process and the processes it starts, never written beside the source, and
left alone where the install has it, the process may write it, the user set a prefix or switched it off."""

from __future__ import annotations

import importlib.util
import os
import py_compile
import subprocess
import sys
from pathlib import Path

import pytest

from star_lightning import bytecode, cli

SRC = Path(__file__).resolve().parents[1] / "src"


def _package(root: Path, name: str = "fakelib") -> Path:
    """A package with two modules, as an install without bytecode leaves it."""
    package = root / name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("from . import part\nVALUE = part.VALUE + 1\n")
    (package / "part.py").write_text("VALUE = 41\n")
    return package


def _pycs(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.pyc"))


def test_a_library_without_bytecode_that_may_not_be_written_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = _package(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    assert bytecode.missing(["fakelib", "no_such_library_here"]) == ["fakelib"]
    assert "fakelib" not in sys.modules  # located, not imported
    monkeypatch.setattr(sys, "dont_write_bytecode", False)  # the process writes it itself: nothing to do
    assert bytecode.missing(["fakelib"]) == []
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    init = package / "__init__.py"
    py_compile.compile(str(init), cfile=importlib.util.cache_from_source(str(init)))  # an install with bytecode
    assert bytecode.missing(["fakelib"]) == []


def _run(code: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONPYCACHEPREFIX", "PYTHONDONTWRITEBYTECODE")}
    environment.update(
        PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), str(SRC)]),
        PYTHONDONTWRITEBYTECODE="1",
        STAR_LIGHTNING_CACHE=str(tmp_path / "cache"),
        **env,
    )
    return subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=60)


CHILD = "import subprocess, sys; print(subprocess.run([sys.executable, '-c', 'import sys, fakelib; print(sys.pycache_prefix, sys.flags.dont_write_bytecode)'], capture_output=True, text=True).stdout.strip())"  # noqa: E501
SCRIPT = f"""
from star_lightning import bytecode
print(bytecode.keep_in_cache(("fakelib",)))
import fakelib
assert fakelib.VALUE == 42
{CHILD}
"""


def test_the_process_and_its_children_keep_the_bytecode_in_the_cache_folder(tmp_path: Path) -> None:
    package = _package(tmp_path / "site")
    done = _run(SCRIPT, tmp_path)
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "cache" / "pycache"
    chosen, child = done.stdout.splitlines()
    assert chosen == str(folder)
    assert child == f"{folder} 0"  # a rank started by this process: the same prefix, bytecode written
    kept = {path.name.split(".")[0] for path in _pycs(folder)}
    assert {"__init__", "part"} <= kept  # both modules, under the prefix
    assert _pycs(package) == []  # never beside the source
    again = _run(SCRIPT, tmp_path)  # a later process reads it (and finds the same folder)
    assert again.returncode == 0 and again.stdout.splitlines()[0] == str(folder)


@pytest.mark.parametrize("env", [{"STAR_LIGHTNING_BYTECODE_CACHE": "0"}, {"PYTHONPYCACHEPREFIX": "USER"}])
def test_switched_off_or_the_users_own_prefix_is_left_alone(tmp_path: Path, env: dict[str, str]) -> None:
    _package(tmp_path / "site")
    if env.get("PYTHONPYCACHEPREFIX") == "USER":
        env = {"PYTHONPYCACHEPREFIX": str(tmp_path / "mine")}
    done = _run(SCRIPT, tmp_path, **env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "None"
    assert not (tmp_path / "cache" / "pycache").exists()


def test_a_command_looks_for_missing_bytecode_before_it_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(bytecode, "keep_in_cache", lambda: calls.append(len(sys.modules)))
    status = cli.main(["score", str(tmp_path / "missing.jsonl")])
    assert status == 2 and len(calls) == 1
