"""``star-lightning``: ``predict`` (LightningCLI, omegaconf mode), plus ``generate`` and ``score``.

``predict`` takes the model (``--model.*``), the requests (``--data.*``), the trainer (``--trainer.*``, with the
``star`` strategy by default) and ``--output``; any of them can come from ``--config configs/*.yaml``.

Configs use OmegaConf interpolation (``anchor_block_size: ${model.block_size}``), resolved after the command line
is merged (jsonargparse's ``omegaconf+`` mode), so a value given on the command line also changes the values that
derive from it.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from star_lightning.callbacks.prediction_writer import JsonlPredictionWriter
from star_lightning.callbacks.profiling import PhaseProfiler
from star_lightning.callbacks.progress import RequestProgress
from star_lightning.data.datamodule import RequestDataModule
from star_lightning.errors import ConfigurationError
from star_lightning.module import StarAttentionLM

USAGE = """usage: star-lightning {predict,plan,generate,score,table,export} ...

  predict   run Star Attention (or ring/dense) over a JSONL file of requests
  plan      before launch: per-host memory and predicted times of a layout, and whether it fits (no weights)
  generate  write a benchmark request set (RULER, BABILong) as JSONL
  score     score a predictions JSONL file
  table     tabulate and plot prediction files: task x length x attention method
  export    write predictions in the reference implementation's format (its evaluators read them)

Run 'star-lightning COMMAND --help' for a command's options.
"""

TRAINER_DEFAULTS: dict[str, Any] = {
    "strategy": {"class_path": "star_lightning.parallel.strategy.StarStrategy"},
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "lightning_logs", "name": "predict"},
    },
}


class StarLightningCLI(LightningCLI):
    """LightningCLI with the ``--output`` option and the resumable JSONL writer attached for ``predict``."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"predict": {"model", "dataloaders", "datamodule"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--output",
            type=str,
            default="predictions.jsonl",
            help="JSONL file of predictions; an existing file is resumed (its requests are skipped)",
        )

        # The data module skips what the output holds: it learns the path here, not from an attribute set later.
        parser.link_arguments("output", "data.output")

    def before_predict(self) -> None:
        output = self.config["predict"]["output"]
        writer = JsonlPredictionWriter(output)
        callbacks: list[Any] = self.trainer.callbacks  # type: ignore[attr-defined]
        callbacks.extend([writer, PhaseProfiler(), RequestProgress()])


# Lightning warnings that are expected here: one request per batch (no batch indices to infer), non-query hosts
# return no prediction, and a dependency's own deprecation inside Lightning.
_EXPECTED_WARNINGS = (
    "Couldn't infer the batch indices",
    "predict returned None",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)


def run_predict(argv: list[str] | None) -> int:
    """``argv`` None: LightningCLI reads the process's own command line (``star-lightning predict ...``)."""
    # Interpolations written from the config's root (``${model.block_size}``) resolve against the merged config.
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    for message in _EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    StarLightningCLI(
        StarAttentionLM,
        RequestDataModule,
        args=None if argv is None else ["predict", *argv],
        parser_kwargs={"parser_mode": "omegaconf+"},
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_callback=None,
        auto_configure_optimizers=False,
        seed_everything_default=0,  # sampling has its own --model.seed; this only silences "no seed found"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``star-lightning`` and ``python -m star_lightning``; user errors exit 2 with one message."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    try:
        if command == "predict":
            return run_predict(None if argv is None else rest)
        if command == "plan":
            from star_lightning.plan.command import run as plan_main

            return plan_main(rest)
        if command == "generate":
            from star_lightning.bench.generate import main as generate_main

            return generate_main(rest)
        if command == "score":
            from star_lightning.bench.scoring import main as score_main

            return score_main(rest)
        if command == "table":
            from star_lightning.bench.results import main as table_main

            return table_main(rest)
        if command == "export":
            from star_lightning.bench.export import main as export_main

            return export_main(rest)
    except ConfigurationError as error:
        print(f"star-lightning {command}: error: {error}", file=sys.stderr)
        return 2
    print(f"star-lightning: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


def console_main() -> None:
    sys.exit(main())
