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

from star_lightning import __version__
from star_lightning.errors import ConfigurationError
from star_lightning.parallel.lifetime import Stopped, job_lifetime, signal_name

USAGE = """usage: star-lightning {predict,plan,generate,score,table,export,tune} ... | --version

  predict   run Star Attention (or ring/dense) over a JSONL file of requests
  plan      before launch: per-host memory and predicted times of a layout, and whether it fits (no weights)
  generate  write a benchmark request set (RULER, BABILong) as JSONL
  score     score a predictions JSONL file
  table     tabulate and plot prediction files: task x length x attention method
  export    write predictions in the reference implementation's format (its evaluators read them)
  tune      the fastest Star configuration that keeps a target share of dense's accuracy, as a predict config

Run 'star-lightning COMMAND --help' for a command's options.
"""


# Each command's entry point, ``module:function``, imported only when the command runs.
COMMANDS = {
    "predict": "star_lightning.predict_cli:run_predict",
    "plan": "star_lightning.plan.command:run",
    "generate": "star_lightning.bench.generate:main",
    "score": "star_lightning.bench.scoring:main",
    "table": "star_lightning.bench.results:main",
    "export": "star_lightning.bench.export:main",
    "tune": "star_lightning.tune.command:run",
}


def _run(command: str, rest: list[str]) -> int | None:
    """The command's exit status; None for an unknown command."""
    if command not in COMMANDS:
        return None
    module, function = COMMANDS[command].split(":")
    entry: Callable[[list[str]], int] = getattr(importlib.import_module(module), function)
    return entry(rest)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``star-lightning`` and ``python -m star_lightning``; user errors exit 2 with one message."""
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
