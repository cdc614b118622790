"""``predict --help``, ``plan --help``, ``generate --help`` and an unknown option answer without torch: ``predict`` and
``plan`` from the parser description the first run keeps (star_lightning.parser_cache), ``generate`` from its own
light parser. The kept help is the real one, the error the parser's own line, and a stale description is made again.
(How fast they answer is measured with farm-bench, not here.)"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from star_lightning import parser_cache
from star_lightning.cli import COMMANDS, _load, main
from star_lightning.errors import ConfigurationError

HEAVY = ("torch", "lightning", "transformers", "jsonargparse")
# Runs the CLI's main in a fresh interpreter, then says which heavy libraries it imported (on stderr's last line).
_PROBE = """
import sys
from star_lightning.cli import COMMANDS, _load, main
from star_lightning.errors import ConfigurationError
try:
    code = main(sys.argv[1:])
except SystemExit as stop:
    code = stop.code
sys.stdout.flush()
print("imported:", ",".join(name for name in {heavy!r} if name in sys.modules), file=sys.stderr)
sys.exit(code)
"""


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache folder, and a fixed terminal width (the help is wrapped to it, and it is part of the key)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("STAR_LIGHTNING_CACHE", str(folder))
    monkeypatch.setenv("COLUMNS", "100")
    return folder


def _fresh(*args: str) -> tuple[int, str, str, list[str]]:
    """``star-lightning ARGS`` in a new interpreter: exit code, stdout, stderr less the probe's line, heavy imports."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE.format(heavy=HEAVY), *args], env=env, capture_output=True, text=True, timeout=120
    )
    *lines, probe = done.stderr.splitlines()
    assert probe.startswith("imported:"), done.stderr
    imported = [name for name in probe.removeprefix("imported:").strip().split(",") if name]
    return done.returncode, done.stdout, "\n".join(lines), imported


def _in_process(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[object, str, str]:
    try:
        code: object = main(list(args))
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _real(capsys: pytest.CaptureFixture[str], command: str, *args: str) -> tuple[object, str, str]:
    """The command's own entry point, its parser built (no cache on the way): exit code, help, one-line error."""
    try:
        code: object = _load(COMMANDS[command].entry)(list(args))
        error = ""
    except SystemExit as stop:
        code, error = stop.code, ""
    except ConfigurationError as refused:
        code, error = 2, f"star-lightning {command}: error: {refused}"
    return code, capsys.readouterr().out, error


def test_predict_help_is_kept_and_answered_without_torch(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, real, _ = _real(capsys, "predict", "--help")
    assert code == 0
    for option in ("--model.block_size", "--model.attention {star,ring,dense}", "--data.path", "--trainer.devices"):
        assert option in real
    assert "Run Star Attention (or the exact ring / dense baselines)" in real
    assert not cache.exists()
    for flag in ("--help", "-h"):  # described (nothing kept yet), then kept
        assert _in_process(capsys, "predict", flag) == (0, real, "")
        assert len(list((cache / "parsers").glob("predict-*.json"))) == 1
    code, printed, err, imported = _fresh("predict", "--help")
    assert (code, printed, err, imported) == (0, real, "", [])


@pytest.mark.parametrize(
    ("command", "args"),
    [
        ("predict", ["--model.block_sze", "4"]),
        ("predict", ["--model.block_sze=4", "--data.path", "x.jsonl", "--trainer.devcies", "2"]),
        ("plan", ["--length", "1024", "--gpu", "H100", "--lenght", "5"]),
    ],
)
def test_an_unknown_option_gets_the_parsers_own_line_without_torch(
    cache: Path, capsys: pytest.CaptureFixture[str], command: str, args: list[str]
) -> None:
    code, _, real = _real(capsys, command, *args)  # the parser's own message
    assert code == 2 and real.startswith(f"star-lightning {command}: error: unknown")
    assert real.endswith(f"(star-lightning {command} --help lists every option)")
    assert _in_process(capsys, command, *args) == (2, "", real + "\n")  # described, then answered from it
    code, out, err, imported = _fresh(command, *args)
    assert (code, out, err, imported) == (2, "", real, [])


def test_plan_help_is_kept_and_generate_help_needs_no_cache(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, real, _ = _real(capsys, "plan", "--help")
    assert code == 0 and "--length LENGTH" in real and "--model.block_size" in real and "--gpu_memory_gib" in real
    assert _in_process(capsys, "plan", "--help")[0] == 0  # described and kept
    code, printed, _, imported = _fresh("plan", "--help")
    assert code == 0 and imported == []
    # the help shows --format's type as a function's address, which differs between processes
    address = r"0x[0-9a-f]+"
    assert re.sub(address, "", printed) == re.sub(address, "", real)
    code, printed, _, imported = _fresh("generate", "--help")
    assert code == 0 and imported == [] and "--benchmark {ruler,babilong}" in printed and "niah_single_1" in printed
    assert not list((cache / "parsers").glob("generate-*"))  # nothing to keep: its parser is light


def test_generate_option_errors_are_argparses_without_torch(cache: Path) -> None:
    code, out, err, imported = _fresh("generate", "--benchmark", "ruler", "--bogus", "1")
    assert code == 2 and imported == [] and out == ""
    assert err.splitlines()[-1].startswith("star-lightning generate: error: ")


def test_a_stale_description_is_made_again(
    cache: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Another key (here another terminal width; likewise another source file or library version) finds nothing
    kept: the real parser answers and its description replaces the stale one; a kept one is what is answered."""
    _in_process(capsys, "predict", "--help")
    (first,) = (cache / "parsers").glob("predict-*.json")
    monkeypatch.setenv("COLUMNS", "140")
    assert parser_cache.load("predict") is None
    code, wide, _ = _in_process(capsys, "predict", "--help")
    (second,) = (cache / "parsers").glob("predict-*.json")
    assert code == 0 and second != first and max(len(line) for line in wide.splitlines()) > 100
    kept = parser_cache.load("predict")
    assert kept is not None and kept.help == wide
    parser_cache.store("predict", parser_cache.ParserDescription("star-lightning predict", "kept\n", (), ()))
    assert _in_process(capsys, "predict", "--help")[:2] == (0, "kept\n")
    # the key follows every source file's content
    sources = tmp_path / "star_lightning"
    shutil.copytree(Path(parser_cache.__file__).parent, sources, ignore=shutil.ignore_patterns("__pycache__"))
    before = parser_cache.cache_key("predict", sources)
    with (sources / "attention" / "kernels.py").open("a") as file:
        file.write("\n")
    assert parser_cache.cache_key("predict", sources) != before


def test_only_lines_decided_by_option_names_are_answered() -> None:
    description = parser_cache.ParserDescription(
        "star-lightning predict",
        "",
        ("--config", "--model", "--model.block_size", "--output", "--overwrite", "--trainer.logger"),
        ("trainer.logger",),
    )
    unknown = parser_cache.unknown_options
    assert unknown(description, ["--model.block_sze", "4", "--output=o.jsonl", "--data.limt=3"]) == [
        "--model.block_sze",
        "--data.limt",
    ]
    assert unknown(description, ["--model.block_size", "4", "--output", "o.jsonl"]) == []
    for line in (
        ["--config", "c.yaml", "--model.block_sze", "4"],  # a config file may hold other errors, found first
        ["--model", "m.yaml", "--model.block_sze", "4"],  # a group's config
        ["--trainer.logger.init_args.foo", "1"],  # a subclass option's own options
        ["--trainer.logger.foo", "1"],
        ["--model.block_sze", "-4"],  # a value like an option
        ["--model.block_siz", "4"],  # an abbreviation (jsonargparse 4 expands it, with a warning)
        ["--overwrite", "--model.block_sze", "4"],  # a flag without its value
        ["-c", "c.yaml", "--model.block_sze", "4"],
        ["--trainer.callbacks+", "x", "--model.block_sze", "4"],
    ):
        assert unknown(description, line) == [], line
