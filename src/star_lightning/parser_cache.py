"""Each command's parser, described once and kept on disk, so ``--help`` and a mistyped option answer without torch.

``predict`` and ``plan`` build their parsers from the typed signatures of the module, the strategy and Lightning's
Trainer: building them imports torch, Lightning and transformers (8-25 s on a small CPU machine). What a user most
often asks of a parser needs none of that once it has been built: its ``--help`` text, and whether an option exists.
So the first run of a command writes its :class:`ParserDescription` (the help exactly as ``--help`` prints it, and
every option name) to the cache folder, keyed by everything that can change it: star_lightning's version and the
hash of its source files, the versions of the libraries the parser is built from, Python's, and the terminal width
the help is wrapped to. A later ``COMMAND --help`` prints the kept text; a command line with an unknown option gets
the parser's own one-line message (:func:`star_lightning.options.describe_unknown`) before anything heavy is
imported. A stale key is a miss: the command runs its real parser, which describes itself again.

Only what is decided by option names alone is answered here; a command line that needs its values or a config file
read (or has an option this cannot judge: one under a subclass option, whose options come with the class given)
runs the real parser. This module imports the standard library only.

The folder: ``$STAR_LIGHTNING_CACHE``, else ``$XDG_CACHE_HOME/star_lightning``, else ``~/.cache/star_lightning``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import os
import shutil
import sys
import tempfile
from contextlib import redirect_stdout
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from star_lightning import __version__
from star_lightning.errors import ConfigurationError
from star_lightning.options import describe_unknown, help_hint

# The libraries a parser is built from: a new version of one may change an option or a help line.
_LIBRARIES = ("jsonargparse", "lightning", "torch", "transformers", "omegaconf")
# The environment variables that decide which rank a process is (as Lightning's ``rank_zero_only`` reads them).
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
_HELP = ("-h", "--help")


@dataclass(frozen=True)
class ParserDescription:
    """What a command's parser answers without its values: its help text, its option names and program name.

    ``open_keys``: options whose own options come with the value given to them (subclass options such as
    ``trainer.logger``): a name under one of them is not judged here."""

    prog: str
    help: str
    options: tuple[str, ...]
    open_keys: tuple[str, ...]


def describe(parser: Any, open_keys: tuple[str, ...] = ()) -> ParserDescription:
    """The description of a built parser (argparse or jsonargparse, with :class:`~star_lightning.options.OneLineErrors`
    or not): its ``--help`` output exactly as that option prints it."""
    printed = io.StringIO()
    with redirect_stdout(printed):
        try:
            parser.parse_args(["--help"])
        except SystemExit:
            pass
    known = getattr(parser, "known_options", None)
    options = known() if known is not None else sorted(name for name in parser._option_string_actions)
    subclass_keys = tuple(sorted(getattr(parser, "_subclass_keys", ())))
    return ParserDescription(
        parser.prog, printed.getvalue(), tuple(options), tuple(sorted({*open_keys, *subclass_keys}))
    )


def cache_folder() -> Path:
    if os.environ.get("STAR_LIGHTNING_CACHE"):
        return Path(os.environ["STAR_LIGHTNING_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "star_lightning"


def cache_switched_off(variable: str) -> bool:
    """Whether the environment variable ``variable`` turns one of the cache folder's caches off (``0``, ``false``,
    ``no`` or ``off``, in any case; unset or anything else: on)."""
    return os.environ.get(variable, "").strip().lower() in ("0", "false", "no", "off")


def cache_key(command: str, package: Path | None = None) -> str:
    """The hash of everything a command's description depends on (read in a few milliseconds); ``package``: the
    folder of star_lightning's sources (this one's by default)."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parent if package is None else package
    digest.update(f"{command}\0{__version__}\0{package}\0{sys.version}\0".encode())
    for library in _LIBRARIES:
        try:
            version = importlib.metadata.version(library)
        except importlib.metadata.PackageNotFoundError:
            version = "-"
        digest.update(f"{library}={version}\0".encode())
    digest.update(f"columns={shutil.get_terminal_size().columns}\0".encode())
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:32]


def writable() -> bool:
    """Whether descriptions can be kept (else describing a parser would be work for nothing, on every run)."""
    folder = cache_folder() / "parsers"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def _path(command: str, key: str) -> Path:
    return cache_folder() / "parsers" / f"{command}-{key}.json"


def load(command: str) -> ParserDescription | None:
    """The kept description of ``command``, if one matches the current key."""
    path = _path(command, cache_key(command))
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        return ParserDescription(
            prog=record["prog"],
            help=record["help"],
            options=tuple(record["options"]),
            open_keys=tuple(record["open_keys"]),
        )
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or unreadable: the real parser answers
        return None


def store(command: str, description: ParserDescription) -> None:
    """Keep ``description`` under the current key (written atomically; older keys of the command removed). Best
    effort: a folder that cannot be written only means the next call builds the parser again."""
    path = _path(command, cache_key(command))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f"{command}-*.json"):
            if stale != path:
                stale.unlink(missing_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{command}-", suffix=".json")
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(asdict(description), file)
        os.replace(temporary, path)
    except OSError:
        return


def answer(command: str, argv: list[str], *, ranks: bool = False) -> None:
    """Answer ``command argv`` from the kept description where its option names alone decide, as the parser would:
    ``--help`` prints the help and raises ``SystemExit(0)``; unknown options raise :class:`ConfigurationError` with
    the parser's own message (for a command launched as several ``ranks``, ``SystemExit(2)`` quietly on a rank
    other than 0, which Lightning reads from the environment). Returns (the command must run) when
    no description is kept or the command line needs its parser."""
    if not argv or (len(argv) > 1 and any(token in _HELP for token in argv)):
        return
    description = load(command)
    if description is None:
        return
    if argv[0] in _HELP:  # as the parser's help option ends: printed, then SystemExit(0)
        sys.stdout.write(description.help)
        raise SystemExit(0)
    unknown = unknown_options(description, argv)
    if not unknown:
        return
    if ranks and _rank() != 0:  # rank 0 says it, once
        raise SystemExit(2)
    known = list(description.options)
    raise ConfigurationError(
        "; ".join(describe_unknown(option, known) for option in unknown) + help_hint(description.prog)
    )


def _rank() -> int:
    """This process's global rank as Lightning's ``rank_zero_only`` reads it (the first variable set), else 0."""
    for name in _RANK_VARIABLES:
        if name in os.environ:
            return int(os.environ[name])
    return 0


def unknown_options(description: ParserDescription, argv: list[str]) -> list[str]:
    """The unknown options of a command line made of ``--name value`` and ``--name=value`` pairs only, in order;
    empty when the line has another shape (flags, config files, values that look like options), an option under a
    subclass option or a group's own value, an abbreviation of a known option, or no unknown option: then the real
    parser judges it. (A line with an unknown option and a bad value of a known one gets the unknown option's line
    here; the parser would name the value first.)"""
    known = set(description.options)
    groups = {option.rpartition(".")[0] for option in known}  # options with options under them (--model, --trainer)
    unknown: list[str] = []
    position = 0
    while position < len(argv):
        name, equals, _ = argv[position].partition("=")
        if not name.startswith("--") or name in ("--", "--config", "--print_config") or ".init_args." in name:
            return []  # a short option, config files, a subclass option's class-qualified name: the parser reads it
        if name.endswith(("+", ".help")):  # appending to a list, a class's help: options known_options leaves out
            return []
        if not equals:
            if position + 1 >= len(argv) or argv[position + 1].startswith("-"):
                return []
            position += 1
        position += 1
        if name in known:
            if name in groups:  # a group's or a class option's own value (a config, a class): the parser reads it
                return []
            continue
        key = name[2:]
        if any(key.startswith(open_key + ".") for open_key in description.open_keys):
            return []
        if any(option.startswith(name) for option in known):  # an abbreviation, which the parser may expand
            return []
        unknown.append(name)
    return unknown
