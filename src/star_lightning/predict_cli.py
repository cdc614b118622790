"""``star-lightning predict``: LightningCLI (omegaconf mode) over the model, the requests, the trainer and ``--output``.

Any option can come from ``--config configs/*.yaml``. Configs use OmegaConf interpolation
(``anchor_block_size: ${model.block_size}``), resolved after the command line is merged (jsonargparse's
``omegaconf+`` mode), so a value given on the command line also changes the values that derive from it.

The CLI is built with ``run=False`` so that the run has three visible steps: parse and instantiate (every rank),
:func:`star_lightning.preflight.check_run` (the one process that speaks for the job, before any weights or process
group), then ``trainer.predict``. Only the Trainer options that mean something for inference are offered.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import warnings
from typing import TYPE_CHECKING, Any, NoReturn

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from star_lightning import startup

# The callbacks are imported with the parser: its help lists the Callback classes known when it is built.
from star_lightning.callbacks.prediction_writer import JsonlPredictionWriter
from star_lightning.callbacks.profiling import PhaseProfiler
from star_lightning.callbacks.progress import RequestProgress
from star_lightning.data.datamodule import RequestDataModule
from star_lightning.data.jsonl import OutputWriteError
from star_lightning.errors import ConfigurationError
from star_lightning.module import StarAttentionLM
from star_lightning.options import (
    HOSTS_HELP,
    LaunchEnvironmentError,
    OneLineErrors,
    bad_value,
    check_devices,
    check_launch_environment,
    closest,
    help_formatter,
)
from star_lightning.parallel.lifetime import kill_launched_ranks, lost_peer, watch_ranks
from star_lightning.parallel.strategy import StarStrategy
from star_lightning.parser_cache import ParserDescription, describe

if TYPE_CHECKING:
    from star_lightning.preflight import RunPlan

DESCRIPTION = (
    "Run Star Attention (or the exact ring / dense baselines) over a JSONL file of requests and write one "
    "prediction per request to --output. An existing output is resumed only by the run that made it (same "
    "prediction settings in its run record OUTPUT.run.json); --overwrite true starts it over. Exit codes: 0 done, "
    "1 a rank died or hung (one line names it), 2 bad input or settings (one line on stderr), 130 Ctrl-C, 128+N "
    "stopped by signal N (rerun to resume). " + HOSTS_HELP
)

TRAINER_DEFAULTS: dict[str, Any] = {
    "strategy": {"class_path": f"{StarStrategy.__module__}.{StarStrategy.__name__}"},
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "lightning_logs", "name": "predict"},
    },
}
# The Trainer options offered by ``predict``; the others (epochs, gradient clipping, validation, checkpointing, ...)
# mean nothing for inference and keep Lightning's defaults.
TRAINER_OPTIONS = (
    "accelerator",
    "strategy",
    "devices",
    "num_nodes",
    "precision",
    "plugins",
    "logger",
    "callbacks",
    "profiler",
    "enable_progress_bar",
    "default_root_dir",
)

# Lightning's messages that are noise here: expected warnings (one request per batch, no prediction from
# non-query hosts, a dependency's deprecation inside Lightning, our own use of ``args``), the srun hint (it fires
# on any machine with SLURM's tools whenever a run is not an srun task, as every direct run is; slurm/predict.sh
# runs its tasks with srun), advertising, and accelerator lines the start line replaces.
_EXPECTED_WARNINGS = (
    "Couldn't infer the batch indices",
    "predict returned None",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    "LightningCLI's args parameter is intended",
    "The `srun` command is available on your system but is not used",
)
_QUIET_INFO = ("💡 Tip:", "GPU available:", "TPU available:", "HPU available:", "\nDetected KeyboardInterrupt")
# The Trainer options whose value may be a class, which brings its own options (``--trainer.logger.init_args.*``).
_CLASS_OPTIONS = ("trainer.strategy", "trainer.logger", "trainer.callbacks", "trainer.plugins", "trainer.profiler")
_RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_QUIET_INFO)


class PredictParser(OneLineErrors, LightningArgumentParser):
    """``predict``'s parser: an option error is one line (:mod:`star_lightning.options`), not the usage text."""


class StarLightningCLI(LightningCLI):
    """LightningCLI for ``predict``: ``--output`` / ``--overwrite``, inference-only Trainer options, no seeding."""

    @override
    def add_default_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Sampling has its own --model.seed (per request); global seeding would only print "Seed set to 0".
        parser.add_argument("--seed_everything", type=bool | int, default=False, help=argparse.SUPPRESS)

    @override
    def _set_seed(self) -> None:
        """No global seeding, whatever the config holds (a config file left it None, which Lightning seeded with 0
        and two lines per rank): sampling has its own --model.seed per request."""

    @override
    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        import inspect

        training_only = set(inspect.signature(Trainer.__init__).parameters) - {"self", *TRAINER_OPTIONS}
        parser.add_class_arguments(
            Trainer, "trainer", fail_untyped=False, instantiate=False, sub_configs=True, skip=training_only
        )
        assert parser.groups is not None
        parser.groups["trainer"].title = "Lightning Trainer options that matter for inference"
        parser.set_defaults({f"trainer.{key}": value for key, value in self.trainer_defaults.items()})
        parser.add_lightning_class_args(StarAttentionLM, "model")
        parser.add_lightning_class_args(RequestDataModule, "data")

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--output",
            type=str,
            default="predictions.jsonl",
            help="JSONL file of predictions, one line per request. An existing one is resumed (its requests are "
            "skipped) when its run record OUTPUT.run.json shows the same prediction settings; otherwise the run is "
            "refused, naming what differs",
        )
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="start --output over: its predictions and run record are deleted (after every check passed)",
        )
        # The data module skips what the output holds: it learns the path here, not from an attribute set later.
        parser.link_arguments("output", "data.output")

    @override
    def instantiate_classes(self) -> None:
        """LightningCLI's own, through jsonargparse's ``instantiate`` (``instantiate_classes`` goes in v5)."""
        self.config_init = self.parser.instantiate(self.config)
        self.datamodule = self._get(self.config_init, "data")
        self.model = self._get(self.config_init, "model")
        _check_trainer_options(self.config["trainer"])
        try:
            self.trainer = self.instantiate_trainer()
        except (MisconfigurationException, ValueError) as error:  # what Lightning refuses that the checks let by
            raise ConfigurationError(f"the --trainer.* options: {' '.join(str(error).split())}") from None
        from star_lightning.preflight import follow_attention

        follow_attention(self.trainer.strategy, self.model.hparams)
        watch_ranks(lambda: [(rank, child.pid) for rank, child in self._launched_ranks()])

    def _launched_ranks(self) -> list[tuple[int, Any]]:
        """``(global rank, Popen)`` of the ranks Lightning's launcher started from this process (none elsewhere)."""
        children = getattr(self.trainer.strategy.launcher, "procs", None) or []
        first_rank = self.trainer.node_rank * self.trainer.num_devices + 1  # children are local ranks 1, 2, ...
        return list(enumerate(children, start=first_rank))

    def check(self) -> RunPlan | None:
        """The checks before any weights or process group, in the process that speaks for the job (None elsewhere)."""
        from star_lightning.preflight import check_run, speaks_for_job  # the run's, not the parser's: imported here

        if not speaks_for_job(self.trainer):
            return None
        return check_run(
            module=self.model,
            datamodule=self.datamodule,
            trainer=self.trainer,
            output=self.config["output"],
            overwrite=self.config["overwrite"],
        )

    def predict(self, plan: RunPlan | None) -> int:
        output = self.config["output"]
        writer = JsonlPredictionWriter(output)
        callbacks: list[Any] = self.trainer.callbacks  # type: ignore[attr-defined]
        callbacks.extend([writer, PhaseProfiler(), RequestProgress()])
        if plan is not None:
            print(plan.start_line(), file=sys.stderr, flush=True)
            if plan.tokenizer is not None and self.model.tokenizer is None:
                self.model.tokenizer = plan.tokenizer
        if not self._nothing_to_start(plan):
            try:
                self.trainer.predict(self.model, datamodule=self.datamodule, return_predictions=False)
            except SystemExit as stop:
                if stop.code == 1 and self.trainer.interrupted and writer.interrupted:
                    # Lightning's Ctrl-C handling (teardown, then exit 1): the conventional 130, and how to resume.
                    if self.trainer.is_global_zero:
                        hint = f"star-lightning predict: stopped by Ctrl-C; {writer.resume_hint()}"
                        print(hint, file=sys.stderr, flush=True)
                    raise SystemExit(130) from None
                raise
            except OutputWriteError as error:
                _output_write_failed(error)
            except ConfigurationError:  # an input changed after the checks: every rank finds it, rank 0 says so
                kill_launched_ranks()
                if not self.trainer.is_global_zero:
                    raise SystemExit(2) from None
                raise
            except Exception as error:
                # A rank that died or hung fails every other rank's next collective: one line names it, and the
                # others' echoes (gloo's "connection closed", their tracebacks) are not printed.
                if self._name_dead_ranks(writer) or self._name_lost_peer(error, writer):
                    kill_launched_ranks()
                    raise SystemExit(1) from None
                raise
        skipped = plan.skipped_line() if plan is not None else None
        if skipped:
            print(skipped, file=sys.stderr, flush=True)
        return 0

    def _name_dead_ranks(self, writer: JsonlPredictionWriter) -> bool:
        """The ranks Lightning's launcher started that died: this rank's error (a collective failing) is only their
        echo. Lightning names them too, but only if its observer thread looks before this process ends."""
        named = False
        for rank, child in self._launched_ranks():
            code = child.poll()
            if code:
                how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
                message = f"rank {rank} (pid {child.pid}) ended ({how}), so the job stops; {writer.resume_hint()}"
                print(f"star-lightning predict: {message}", file=sys.stderr, flush=True)
                named = True
        return named

    def _name_lost_peer(self, error: Exception, writer: JsonlPredictionWriter) -> bool:
        """A collective failed because another rank ended or hung, and this process cannot tell which (ranks SLURM
        or torchrun started): global rank 0 says so in one line, the others exit quietly."""
        reason = lost_peer(error)
        if reason is None:
            return False
        if self.trainer.is_global_zero:
            message = (
                f"a collective failed ({reason}): another rank of the job ended or stopped answering, so the job "
                f"stops; {writer.resume_hint()}"
            )
            print(f"star-lightning predict: {message}", file=sys.stderr, flush=True)
        return True

    def _nothing_to_start(self, plan: RunPlan | None) -> bool:
        """Every request is done or skipped, and no rank waits for this process (Lightning would start the others
        itself): no process, model or log folder is started for nothing."""
        if plan is None or plan.todo:
            return False
        environment = getattr(self.trainer.strategy, "cluster_environment", None)
        others_started = environment is not None and environment.creates_processes_externally
        return not (others_started and self.trainer.world_size > 1)


def _output_write_failed(error: OutputWriteError) -> NoReturn:
    """A prediction could not be appended (full disk, the output replaced or deleted): one line, exit 1; the lines
    written before stay whole."""
    print(
        f"star-lightning predict: {error}; the job stops (what was written before stays)", file=sys.stderr, flush=True
    )
    kill_launched_ranks()
    raise SystemExit(1) from None


def _check_trainer_options(trainer: Any) -> None:
    """The Trainer options Lightning would refuse with a traceback from inside the Trainer, refused in one line."""
    from lightning.pytorch.accelerators import AcceleratorRegistry
    from lightning.pytorch.strategies import StrategyRegistry

    check_devices(trainer["devices"])
    check_launch_environment(trainer["devices"], trainer["num_nodes"])
    if isinstance(trainer["num_nodes"], int) and trainer["num_nodes"] < 1:
        raise bad_value("trainer.num_nodes", trainer["num_nodes"], "a positive number of nodes")
    for option, names in (
        ("accelerator", ["auto", "gpu", *AcceleratorRegistry.available_accelerators()]),
        ("strategy", ["auto", *StrategyRegistry.available_strategies()]),
    ):
        value = trainer[option]
        if isinstance(value, str) and value not in names and "." not in value:
            choices = ", ".join(sorted(set(names)))
            raise bad_value(f"trainer.{option}", value, f"one of {choices} (or a class path){closest(value, names)}")


def _quiet_lightning() -> None:
    for message in _EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    for name in _RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _DropInfo) for existing in logger.filters):
            logger.addFilter(_DropInfo())


def run_predict(argv: list[str]) -> int:
    """``star-lightning predict ARGV``; bad input raises :class:`ConfigurationError` (printed by ``main``).

    An error found while parsing and checking is the same on every rank: only global rank 0 reports it, the others
    exit 2 quietly, so it is printed once.
    """
    try:
        cli = _build(StarLightningCLI, argv)
        startup.mark("parsed")
        plan = cli.check()
        startup.mark("checked")
    except ConfigurationError as error:
        if getattr(rank_zero_only, "rank", 0) != 0 and not isinstance(error, LaunchEnvironmentError):
            raise SystemExit(2) from None
        raise
    try:
        return cli.predict(plan)
    finally:
        if plan is not None:
            plan.release()


def _build(cli_class: type[StarLightningCLI], argv: list[str]) -> StarLightningCLI:
    """The CLI over ``argv``: parsed and instantiated (``run=False``: nothing runs yet)."""
    from jsonargparse import set_parsing_settings

    # Interpolations written from the config's root (``${model.block_size}``) resolve against the merged config.
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    _quiet_lightning()
    from lightning.pytorch.loggers import TensorBoardLogger

    # Subclass options take their class with their value: the defaults' classes name them for the suggestions.
    option_classes = {"trainer.strategy": StarStrategy, "trainer.logger": TensorBoardLogger}
    return cli_class(
        StarAttentionLM,
        RequestDataModule,
        args=argv,
        run=False,
        parser_class=PredictParser,
        parser_kwargs={
            "parser_mode": "omegaconf+",
            "prog": "star-lightning predict",
            "description": DESCRIPTION,
            "option_classes": option_classes,
            "formatter_class": help_formatter(),
        },
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_callback=None,
        auto_configure_optimizers=False,
        load_from_checkpoint_support=False,
    )


class _Built(Exception):
    """Raised with the parser once it is built, before it parses anything (:func:`describe_parser`)."""

    def __init__(self, parser: LightningArgumentParser) -> None:
        super().__init__("parser built")
        self.parser = parser


class _DescribingCLI(StarLightningCLI):
    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        raise _Built(parser)


def describe_parser() -> ParserDescription:
    """``predict``'s parser, built as a run builds it, described for the cache (:mod:`star_lightning.parser_cache`):
    its help text and option names. The Trainer options that take a class with their value take their own options
    with it: those names are the parser's to judge."""
    try:
        _build(_DescribingCLI, [])
    except _Built as built:
        return describe(built.parser, open_keys=_CLASS_OPTIONS)
    raise RuntimeError("LightningCLI parsed without calling parse_arguments")
