"""``star-lightning``: ``predict`` (:mod:`star_lightning.predict_cli`), ``plan``, ``generate``, ``score``, ``table``
and ``export``.

This module imports only what dispatching needs, so ``star-lightning --help`` and ``--version`` answer at once
(no torch); each command imports its own module when it runs. Exit codes: 0 done, 1 a rank of the job failed (one
line names it), 2 bad input or settings (one line on stderr naming the problem and the fix), 130 Ctrl-C, ``128 + N``
stopped by signal N. The signals are handled from the first line (:mod:`star_lightning.parallel.lifetime`).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from star_lightning import __version__, bytecode, parser_cache, startup
from star_lightning.errors import ConfigurationError
from star_lightning.parallel.lifetime import Stopped, job_lifetime, signal_name


@dataclass(frozen=True)
class Command:
    """One subcommand: what it does (one line of the usage), its entry point ``module:function`` (imported only when
    the command runs), and, for a command whose parser imports torch or Lightning to be built, the ``module:function``
    that describes the parser (:func:`star_lightning.parser_cache.describe`): its ``--help`` and option errors are
    then answered from the cached description without the import. ``ranks``: the command may run as several ranks,
    of which rank 0 alone reports an option error."""

    summary: str
    entry: str
    parser: str | None = None
    ranks: bool = False


# The subcommands, in the usage's order. A new one is one entry here; give ``parser`` where building its parser is
# heavy (its ``--help`` then answers from the cache; keep the parser's own module light otherwise, as ``generate``).
COMMANDS: dict[str, Command] = {
    "predict": Command(
        "run Star Attention (or ring/dense) over a JSONL file of requests",
        "star_lightning.predict_cli:run_predict",
        parser="star_lightning.predict_cli:describe_parser",
        ranks=True,
    ),
    "plan": Command(
        "before launch: per-host memory and predicted times of a layout, and whether it fits (no weights)",
        "star_lightning.plan.command:run",
        parser="star_lightning.plan.command:describe_parser",
    ),
    "generate": Command(
        "write a benchmark request set (RULER, BABILong) as JSONL", "star_lightning.bench.generate:main"
    ),
    "score": Command("score a predictions JSONL file", "star_lightning.bench.scoring:main"),
    "table": Command(
        "tabulate and plot prediction files: task x length x attention method", "star_lightning.bench.results:main"
    ),
    "export": Command(
        "write predictions in the reference implementation's format (its evaluators read them)",
        "star_lightning.bench.export:main",
    ),
    "tune": Command(
        "the fastest Star configuration that keeps a target share of dense's accuracy, as a predict config",
        "star_lightning.tune.command:run",
    ),
}

USAGE = (
    f"usage: star-lightning {{{','.join(COMMANDS)}}} ... | --version\n\n"
    + "".join(f"  {name:<9} {command.summary}\n" for name, command in COMMANDS.items())
    + "\nRun 'star-lightning COMMAND --help' for a command's options.\n"
)


def _load(path: str) -> Callable[..., Any]:
    module, function = path.split(":")
    loaded: Callable[..., Any] = getattr(importlib.import_module(module), function)
    return loaded


def _run(name: str, rest: list[str]) -> int | None:
    """The command's exit status; None for an unknown command.

    A command with a cached parser description answers ``--help`` and unknown options from it; where none is kept
    (the first run, or star_lightning or a library changed), the parser is described again before the command runs.
    """
    if name not in COMMANDS:
        return None
    command = COMMANDS[name]
    if command.parser is not None:
        parser_cache.answer(name, rest, ranks=command.ranks)
    bytecode.keep_in_cache()  # before torch & co. are imported: an install without their bytecode compiles them once
    entry: Callable[[list[str]], int] = _load(command.entry)
    startup.mark("imported")
    if command.parser is not None and parser_cache.load(name) is None and parser_cache.writable():
        parser_cache.store(name, _load(command.parser)())
        parser_cache.answer(name, rest, ranks=command.ranks)  # now kept: --help needs no second parser
    return entry(rest)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``star-lightning`` and ``python -m star_lightning``; user errors exit 2 with one message."""
    startup.reset()
    startup.mark("entry")
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        print(f"star-lightning {__version__}")
        return 0
    command, rest = args[0], args[1:]
    kept = "; what --output holds is kept: rerun the same command to resume" if command == "predict" else ""
    try:
        with job_lifetime(command):
            status = _run(command, rest)
    except ConfigurationError as error:
        print(f"star-lightning {command}: error: {error}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"star-lightning {command}: stopped by Ctrl-C{kept}", file=sys.stderr, flush=True)
        return 130
    except Stopped as stop:
        print(f"star-lightning {command}: stopped by {signal_name(stop.signum)}{kept}", file=sys.stderr, flush=True)
        return 128 + stop.signum
    if status is None:
        print(f"star-lightning: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return status


def console_main() -> None:
    try:
        status = main()
        sys.stdout.flush()
    except BrokenPipeError:  # the reader went away (``star-lightning score x | head``): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        status = 0
    sys.exit(status)
