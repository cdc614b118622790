"""Option errors in one form: one line naming the option, the value given and what is accepted; exit code 2.

Two kinds of error, one form:

- what the parser finds (jsonargparse, under LightningCLI for ``predict``, directly for ``plan``): an unknown option,
  named with the closest known one (``did you mean --model.block_size?``), or a value its type does not take, named
  with what the option accepts (read from the typed signature that declares it: ``Literal`` choices, ``bool``,
  ``int``, lists, ...). :class:`OneLineErrors`, the parsers' mixin, turns jsonargparse's error (usage text, then the
  message, then ``exit(2)``) into a :class:`ConfigurationError`, which the command line prints as one line;
- a value of the right type that means nothing (a negative ``--data.limit``, an empty stop string, no devices):
  the class that owns the option refuses it with :func:`bad_value`, in the same form.
"""

from __future__ import annotations

import difflib
import json
import re
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal, NoReturn

from star_lightning.errors import ConfigurationError

# jsonargparse's messages, as its parser raises them (jsonargparse 4.x): an unknown command-line token, an unknown
# key (of a nested class, or in a config file), a value its type rejects (nested: the innermost key is the one), the
# value it was given, and an unknown key of a subclass option (given to the option as a ``NestedArg``).
_UNRECOGNIZED = re.compile(r"^unrecognized arguments: (?P<tokens>.*)$", re.DOTALL)
_UNKNOWN_KEY = re.compile(
    r"Group '(?P<group>[^']+)' does not accept option '(?P<grouped>[^']+)'|Option '(?P<option>[^']+)' is not accepted"
)
_PARSER_KEY = re.compile(r'Parser key "(?P<key>[^"]+)"(?: element \d+)?:')
_GIVEN = re.compile(r"(?:Got value|Given value): (?P<value>[^\n]*)")
_NESTED = re.compile(r"Given value: NestedArg\(key='(?P<key>[^']+)'")


def bad_value(option: str, value: object, accepted: str) -> ConfigurationError:
    """The one form of a refused value: ``--data.limit -1: expected a positive number ...``."""
    return ConfigurationError(f"--{option} {shown(value)}: expected {accepted}")


def shown(value: object) -> str:
    """A value as the user would type it: strings bare (quoted when empty or spaced), the rest as JSON."""
    if isinstance(value, str):
        return value if value and not any(char.isspace() for char in value) else repr(value)
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)


def accepted(hint: Any) -> str:
    """What a type hint accepts, in words: ``one of star, ring, dense``, ``true or false``, ``an integer``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(str(choice) for choice in args)
    if origin in (typing.Union, types.UnionType):
        choices = [str(choice) for arg in args if typing.get_origin(arg) is Literal for choice in typing.get_args(arg)]
        others = [accepted(arg) for arg in args if typing.get_origin(arg) is not Literal and arg is not type(None)]
        words = (["one of " + ", ".join(dict.fromkeys(choices))] if choices else []) + others
        if type(None) in args:
            words.append("null")
        return " or ".join(words)
    if origin in (list, tuple, typing.Sequence, Iterable):
        item = accepted(args[0]) if args else "values"
        return f"a list of {_plural(item)} (JSON, e.g. {_LIST_EXAMPLES.get(args[0] if args else None, '[...]')})"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if hint in names:
        return names[hint]
    return f"a {getattr(hint, '__name__', str(hint))} (a name or a class path)"


_LIST_EXAMPLES: dict[Any, str] = {str: "'[\"###\"]'", int: "'[0, 1]'"}


def _plural(words: str) -> str:
    plural = {"a string": "strings", "an integer": "integers", "a number": "numbers", "true or false": "booleans"}
    return plural.get(words, words)


def _type_in_message(detail: str) -> str | None:
    """The accepted type as jsonargparse names it (``Expected a <class 'float'>``), for options without a signature
    here."""
    found = re.search(r"Expected an? (?:<class '(?P<cls>\w+)'>|(?P<literal>typing\.Literal\[[^\]]*\]))", detail)
    if found is None:
        return None
    if found["cls"]:
        return accepted({"int": int, "float": float, "bool": bool, "str": str}.get(found["cls"], found["cls"]))
    return "one of " + ", ".join(part.strip(" '\"") for part in found["literal"][15:-1].split(","))


class OneLineErrors:
    """A jsonargparse parser mixin (placed before the parser class): errors become one-line
    :class:`ConfigurationError` messages instead of the usage text and ``exit(2)``.

    ``option_classes`` maps a nested key to the class whose typed ``__init__`` declares its options when the parser
    does not know it beforehand (a subclass option such as ``trainer.strategy``: its class comes with the value);
    classes added with ``add_class_arguments`` / ``add_subclass_arguments`` are recorded on the way. The parsers
    jsonargparse makes inside (``exit_on_error=False``) keep raising its own errors, which reach the top one.
    """

    prog: str
    args: list[str]
    exit_on_error: bool
    _option_string_actions: dict[str, Any]

    def __init__(self, *args: Any, option_classes: Mapping[str, type] | None = None, **kwargs: Any) -> None:
        self._option_classes: dict[str, type] = dict(option_classes or {})
        self._subclass_keys: set[str] = set(self._option_classes)  # their options are not the parser's own
        super().__init__(*args, **kwargs)

    def add_class_arguments(self, theclass: type, nested_key: str | None = None, *args: Any, **kwargs: Any) -> Any:
        if nested_key:
            self._option_classes.setdefault(nested_key, theclass)
        return super().add_class_arguments(theclass, nested_key, *args, **kwargs)  # type: ignore[misc]

    def add_subclass_arguments(self, baseclass: Any, nested_key: str, *args: Any, **kwargs: Any) -> Any:
        if isinstance(baseclass, type):
            self._option_classes.setdefault(nested_key, baseclass)
            self._subclass_keys.add(nested_key)
        return super().add_subclass_arguments(baseclass, nested_key, *args, **kwargs)  # type: ignore[misc]

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # a parser jsonargparse made inside: the top one reports
            super().error(message, ex)  # type: ignore[misc]
        raise ConfigurationError(self.describe_error(message)) from None

    # -- the one line ---------------------------------------------------------------------------------------------

    def describe_error(self, message: str) -> str:
        """jsonargparse's message as one line naming the option, the value and what is accepted (or the closest
        known option)."""
        if message.strip().startswith("Unexpected config"):
            return self._describe_bad_config(message)
        unknown = self._unknown_options(message)
        if unknown:
            return "; ".join(self._describe_unknown(option) for option in unknown) + self._help_hint()
        keys = list(_PARSER_KEY.finditer(message))
        if keys and keys[-1]["key"] == "config":
            return "--config: " + " ".join(message[keys[-1].end() :].split())
        if keys:
            key, detail = self._full_key(keys[-1]["key"]), message[keys[-1].end() :]
            nested = _NESTED.search(detail)
            if nested is not None and len(keys) == 1:  # an unknown key of a subclass option
                return self._describe_unknown(self._typed_option(nested["key"]) or f"--{key}.{nested['key']}") + (
                    self._help_hint()
                )
            what = self._accepted_for(key) or _type_in_message(detail)
            if what is not None:
                given = self._given_value(key, detail)
                return f"--{key}{'' if given is None else ' ' + shown(given)}: expected {what}"
        return " ".join(message.split()) + self._help_hint()

    def _describe_bad_config(self, message: str) -> str:
        """A ``--config`` file that holds no mapping of options (empty, a list, a bare value), named by its path."""
        files = [value for name, value in zip(self.args, self.args[1:], strict=False) if name == "--config"]
        files += [token.partition("=")[2] for token in self.args if token.startswith("--config=")]
        held = message.strip().removeprefix("Unexpected config:").strip()
        what = "nothing (it is empty)" if not held else f"{'a YAML list' if held.startswith('- ') else 'no mapping'}"
        named = f" {files[-1]}" if files else ""
        return (
            f"--config{named}: the file holds {what}, not options; write them as a YAML mapping, e.g. "
            "'model: {block_size: 4096}'"
        )

    def _help_hint(self) -> str:
        return help_hint(self.prog)

    def _unknown_options(self, message: str) -> list[str]:
        """The unknown options a message is about, as the user wrote them (``--model.blocksize``)."""
        found = _UNRECOGNIZED.match(message.strip())
        if found is not None:
            return [token.partition("=")[0] for token in found["tokens"].split() if token.startswith("-")]
        key = _UNKNOWN_KEY.search(message)
        if key is None:
            return []
        if key["group"]:  # a config file's key
            return [f"{key['group']}.{key['grouped']}"]
        return [self._typed_option(key["option"]) or key["option"]]

    def _typed_option(self, leaf: str) -> str | None:
        """The command-line option whose last part is ``leaf`` (nested parsers name only that part)."""
        typed = [token.partition("=")[0] for token in self.args if token.startswith("--")]
        matches = [name for name in typed if name.rsplit(".", 1)[-1] == leaf]
        return matches[-1] if matches else None

    def _describe_unknown(self, option: str) -> str:
        return describe_unknown(option, self.known_options())

    def known_options(self) -> list[str]:
        """Every option this parser takes, as ``--group.name``: its own, and those of the subclass options."""
        names = {
            name for name in self._option_string_actions if name.startswith("--") and not name.endswith(("+", ".help"))
        }
        for key in self._subclass_keys:
            names.update(f"--{key}.{parameter}" for parameter in _init_parameters(self._option_classes[key]))
        return sorted(names)

    def _full_key(self, key: str) -> str:
        """A nested parser names its keys from its own root (``timeout_s``); the full key is the typed option's."""
        if f"--{key}" in self._option_string_actions or "." in key:
            return key
        typed = [token[2:].partition("=")[0] for token in self.args if token.startswith("--")]
        matches = [name.replace(".init_args.", ".") for name in typed if name.rsplit(".", 1)[-1] == key]
        return matches[-1] if matches else key

    def _given_value(self, key: str, detail: str) -> str | None:
        """The value as typed on the command line; else as jsonargparse shows it (from a config file)."""
        spellings = {f"--{key}", f"--{key.rsplit('.', 1)[0]}.init_args.{key.rsplit('.', 1)[-1]}"}
        given: str | None = None
        for position, token in enumerate(self.args):
            name, equals, value = token.partition("=")
            if name in spellings:
                given = value if equals else (self.args[position + 1] if position + 1 < len(self.args) else None)
        if given is None:
            found = _GIVEN.findall(detail)
            given = found[-1] if found else None
        return given

    def _accepted_for(self, key: str) -> str | None:
        """What the typed signature declaring ``key`` accepts (the class recorded for its longest prefix)."""
        prefix, _, name = key.replace(".init_args.", ".").rpartition(".")
        cls = self._option_classes.get(prefix)
        if cls is None:
            return None
        hint = _init_hints(cls).get(name)
        return None if hint is None else accepted(hint)


def help_hint(prog: str) -> str:
    """What ends a message about unknown options."""
    return f" ({prog} --help lists every option)"


def describe_unknown(option: str, known: list[str]) -> str:
    """An unknown option (``--model.blocksize`` typed, ``model.blocksize`` in a config) with the closest of the
    ``known`` ones; a parser's own message, and the cached parser's (:mod:`star_lightning.parser_cache`)."""
    flag = option if option.startswith("-") else f"--{option}"
    typed = flag.replace(".init_args.", ".")
    group, _, leaf = typed.rpartition(".")
    where = "" if option.startswith("-") else " (in the config)"
    if typed in known:  # an option of a class the value given to its group is not
        return f"option {flag}{where} does not apply to the value given to --{group.lstrip('-')}"
    siblings = {name.rpartition(".")[2]: name for name in known if name.rpartition(".")[0] == group}
    if siblings:  # compare within the group: the shared prefix would make every name look close
        close = [siblings[name] for name in difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)]
    else:
        close = difflib.get_close_matches(typed, known, n=1, cutoff=0.6)
    return f"unknown option {flag}{where}" + (f"; did you mean {close[0]}?" if close else "")


def _init_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls.__init__)  # type: ignore[misc]
    except (NameError, TypeError):
        return {}


def _init_parameters(cls: type) -> list[str]:
    """A class's options as jsonargparse reads them from its signature (``**kwargs`` followed into its bases)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "class", fail_untyped=False, sub_configs=True)
    return [name.removeprefix("--class.") for name in parser._option_string_actions if name.startswith("--class.")]


def closest(value: str, choices: Iterable[str]) -> str:
    """``; did you mean X?`` for the closest choice, or nothing."""
    close = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


DEVICES_ACCEPTED = (
    "a positive number of processes per node, -1 or auto (every device), or device indices such as '0,1' or [0, 1]"
)


def check_devices(devices: object, option: str = "trainer.devices") -> None:
    """Lightning's ``devices``: a positive count, ``-1`` / ``auto`` (every device), or device indices; checked here
    because Lightning's own refusal of ``0`` is a traceback from inside the Trainer."""
    if isinstance(devices, bool):
        raise bad_value(option, devices, DEVICES_ACCEPTED)
    if isinstance(devices, int) and (devices > 0 or devices == -1):
        return
    if isinstance(devices, str):
        text = devices.strip()
        parts = [part.strip() for part in text.split(",") if part.strip()]
        if text in ("auto", "-1") or (text.isdigit() and int(text) > 0):
            return
        if "," in text and parts and all(part.isdigit() for part in parts):
            return
    if isinstance(devices, list) and devices and all(isinstance(i, int) and not isinstance(i, bool) for i in devices):
        if all(index >= 0 for index in devices):
            return
    raise bad_value(option, devices, DEVICES_ACCEPTED)


# What a launcher (Lightning's own, torchrun, a manual launch) tells a process about its place in a job.
LAUNCH_VARIABLES = ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT")


def _device_count(devices: object) -> int | None:
    """The processes per node ``--trainer.devices`` asks for; None for every device (``auto``, ``-1``)."""
    if isinstance(devices, int) and not isinstance(devices, bool):
        return devices if devices > 0 else None
    if isinstance(devices, list):
        return len(devices)
    if isinstance(devices, str):
        text = devices.strip()
        if "," in text:
            return len([part for part in text.split(",") if part.strip()])
        return int(text) if text.isdigit() else None
    return None


class LaunchEnvironmentError(ConfigurationError):
    """The launcher variables are wrong: said by whichever rank the process takes itself for (it may be the only
    process, taking itself for rank 1)."""


def check_launch_environment(devices: object, num_nodes: object, environ: Mapping[str, str] | None = None) -> None:
    """Launcher variables left in the environment (a notebook, another launcher) that contradict the command, or
    are no numbers, refused in one line before any record is written: with them Lightning would take this process
    for one rank of a job started elsewhere (a hang, a crash, or no checks). SLURM's jobs read SLURM's variables."""
    import os

    env = os.environ if environ is None else environ
    if "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        return
    fix = "unset it if a notebook or an earlier launcher left it ({}), so that predict starts its own processes"
    values: dict[str, int] = {}
    for name in LAUNCH_VARIABLES:
        if name not in env:
            continue
        text = env[name].strip()
        number = int(text) if text.isdigit() else None
        if number is None or (name == "MASTER_PORT" and not 0 < number < 65536):
            accepted = "a port number (1-65535)" if name == "MASTER_PORT" else "a number (0, 1, ...)"
            raise LaunchEnvironmentError(
                f"the environment variable {name}={env[name]!r} is not {accepted}; {fix.format(f'unset {name}')}"
            )
        values[name] = number
    count, nodes = _device_count(devices), num_nodes if isinstance(num_nodes, int) else 1
    wrong: list[str] = []
    if values.get("NODE_RANK", 0) >= nodes:
        wrong.append(f"NODE_RANK={values['NODE_RANK']} (--trainer.num_nodes {nodes} has node ranks 0-{nodes - 1})")
    if "LOCAL_RANK" in values:
        local = values["LOCAL_RANK"]
        if count is not None and local >= count:
            wrong.append(f"LOCAL_RANK={local} (--trainer.devices {count} has local ranks 0-{count - 1})")
        if count is not None and "WORLD_SIZE" in values and values["WORLD_SIZE"] != count * nodes:
            wrong.append(f"WORLD_SIZE={values['WORLD_SIZE']} (the command makes {count * nodes} processes)")
        if (count is None or count * nodes > 1) and "MASTER_PORT" not in values and "TORCHELASTIC_RUN_ID" not in env:
            wrong.append(f"LOCAL_RANK={local} without MASTER_PORT (the ranks of a job launched elsewhere share one)")
    if wrong:
        names = " ".join(dict.fromkeys(item.split("=")[0] for item in wrong))
        raise LaunchEnvironmentError(
            f"the environment says this process is a rank of a job launched elsewhere, but {'; '.join(wrong)} "
            f"contradicts the command; {fix.format(f'unset {names}').replace('unset it', 'unset them')}, or launch "
            "every rank with matching --trainer.devices and --trainer.num_nodes"
        )


def _trimmed_formatter() -> type:
    """jsonargparse's help formatter without Lightning's lists of every known subclass (~80 lines of class paths)
    and without the inherited ``Default: ...`` sentences that contradict the defaults shown beside them; with the
    help given in :data:`HELP` for options whose inherited text is about training."""
    from jsonargparse import DefaultHelpFormatter

    class TrimmedHelpFormatter(DefaultHelpFormatter):
        def _get_help_string(self, action: Any) -> str:
            own = HELP.get(getattr(action, "dest", ""))
            if own is not None and not getattr(action, "_jsonargparse_preexpanded_help", False):
                action.help = own
            text = super()._get_help_string(action)
            text = re.sub(r", known subclasses: [^()]*\)$", ")", text, flags=re.DOTALL)
            return re.sub(r"\s*Default: ``[^`]*``\.", "", text)

    return TrimmedHelpFormatter


# Help for options whose inherited (Lightning) text speaks of training or of defaults this command replaces.
HOSTS_HELP = (
    "Hosts: each request is spread over --trainer.strategy.context_parallel_size processes (unset: all "
    "--trainer.devices x --trainer.num_nodes of them; 1 with --model.attention dense); the groups split the requests. "
    "--model.simulate_hosts N plays N hosts in one process."
)
HELP = {
    "trainer.strategy": "star_lightning's StarStrategy (the default) or a subclass; its options: "
    "--trainer.strategy.context_parallel_size (hosts per request), tensor_parallel_size, gpus_per_host, timeout_s "
    "(--trainer.strategy.help StarStrategy lists them)",
    "trainer.precision": "Lightning's precision plugin; unset: '32-true'. The weights' dtype is --model.dtype",
    "trainer.devices": "processes per node (each a host of a request, or of its own data-parallel group): a number, "
    "-1 or auto (every device), or device indices",
    "trainer.num_nodes": "nodes of the job (the processes are --trainer.devices x --trainer.num_nodes)",
    "trainer.enable_progress_bar": "the per-request progress bar on stderr (unset: shown)",
    "trainer.logger": "where the per-request phase timings go (TensorBoard under lightning_logs/predict by default); "
    "false: no logger",
    "trainer.callbacks": "extra Lightning callbacks (the prediction writer, profiler and progress are always added)",
    "trainer.profiler": "a Lightning profiler (simple, advanced, pytorch) for the whole run",
}


def help_formatter() -> type:
    """The formatter ``predict`` and ``plan`` print their help with (built on first use: jsonargparse is imported
    only by the commands)."""
    global _FORMATTER
    if _FORMATTER is None:
        _FORMATTER = _trimmed_formatter()
    return _FORMATTER


_FORMATTER: type | None = None
