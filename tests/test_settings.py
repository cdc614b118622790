"""The one settings type of a request (:class:`StarSettings`): each bad combination refused there, once, with the
line the command line prints; the module, ``plan`` and ``predict`` refuse through it alike."""

from __future__ import annotations

import ast
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from star_lightning.cli import main
from star_lightning.engine.settings import StarSettings, settings_from_options
from star_lightning.errors import ConfigurationError
from star_lightning.module import StarAttentionLM
from star_lightning.plan.hosts import Layout

# (settings fields, the line ``predict`` prints for them today)
REFUSED: list[tuple[dict[str, Any], str]] = [
    ({"attention": "RING"}, "--model.attention must be star, ring or dense, got 'RING'"),
    ({"block_size": 0}, "block_size must be a positive number of tokens, got 0; set --model.block_size N"),
    ({"anchor_block_size": 0}, "anchor_block_size must be a positive number of tokens, got 0"),
    ({"block_size": 64, "anchor_block_size": 128}, "anchor_block_size (128) is larger than block_size (64)"),
    ({"anchor_source": "everywhere"}, "anchor_source must be broadcast, host or block, got 'everywhere'"),
    ({"ring_layout": "spiral"}, "ring_layout must be zigzag or contiguous, got 'spiral'"),
    ({"anchor_query_positions": "first"}, "--model.anchor_query_positions first: expected one of after_anchor"),
    ({"passing_selection": "all"}, "--model.passing_selection all: expected one of shared, per_head"),
    ({"decode": "fast"}, "--model.decode fast: expected one of auto, eager, static, graph, compile"),
    ({"passing_tokens": -1}, "--model.passing_tokens -1: expected 0 (off) or a positive number of tokens"),
    ({"block_size": 40, "passing_tokens": 41}, "--model.passing_tokens 41: expected at most a block's tokens"),
    ({"passing_pool_kernel": 4}, "--model.passing_pool_kernel 4: expected an odd number of positions"),
    ({"simulated_hosts": -1}, "--model.simulate_hosts -1: expected 1 (off), more hosts, or 0"),
    ({"attention": "ring", "anchor_query": True}, "--model.anchor_query true applies to star attention only"),
    ({"attention": "dense", "passing_tokens": 4}, "--model.passing_tokens 4 applies to star attention only"),
    ({"attention": "ring", "simulated_hosts": 2}, "--model.simulate_hosts 2 applies to star attention only"),
    ({"use_anchor": False, "passing_tokens": 4}, "--model.passing_tokens 4 needs the anchor"),
    ({"use_anchor": False, "anchor_query": True}, "--model.anchor_query true needs the anchor"),
    ({"backend": "fastest"}, "unknown attention backend 'fastest'"),
    ({"max_new_tokens": 0}, "--model.max_new_tokens must be positive, got 0"),
    ({"stop_strings": ("",)}, '--model.stop_strings [""]: expected non-empty strings'),
    ({"hosts": 0}, "the number of hosts must be positive, got 0"),
    ({"tensor_parallel_size": 0}, "tensor_parallel_size (0) and gpus_per_host (1) must be positive numbers of GPUs"),
    ({"simulated_hosts": 2, "hosts": 2}, "--model.simulate_hosts 2 plays every host in one process, but the"),
    ({"attention": "dense", "hosts": 2}, "dense attention runs each request in one process, but the"),
    ({"prefill": "always"}, "--model.prefill always: expected one of auto, eager, graph"),
    ({"attention": "ring", "prefill": "graph"}, "--model.prefill graph replays star's Phase 1 blocks on one GPU"),
    ({"prefill": "graph", "hosts": 2}, "--model.prefill graph replays star's Phase 1 blocks on one GPU holding them"),
    ({"prefill": "graph", "anchor_query": True}, "--model.prefill graph replays star's Phase 1 blocks on one GPU"),
    ({"prefill": "graph", "passing_tokens": 4}, "--model.prefill graph replays star's Phase 1 blocks on one GPU"),
    ({"prefill": "graph", "simulated_hosts": 2}, "--model.prefill graph replays star's Phase 1 blocks on one GPU"),
]
_OPTION = {"use_anchor": "anchor", "simulated_hosts": "simulate_hosts", "stop_strings": "stop_strings"}
_LAYOUT = ("hosts", "tensor_parallel_size", "gpus_per_host")


def _refusal(make: Any) -> str:
    with pytest.raises(ValueError) as refused:  # ConfigurationError, or the kernel choice's ValueError
        make()
    return str(refused.value)


@pytest.mark.parametrize(("given", "line"), REFUSED, ids=[line.split(":")[0][:40] for _, line in REFUSED])
def test_the_settings_refuse_each_bad_combination_with_the_command_lines_line(given: dict[str, Any], line: str) -> None:
    message = _refusal(lambda: StarSettings(**given))
    assert line in message and "\n" not in message, message
    if not given.get("backend"):
        assert isinstance(ConfigurationError(message), ValueError)
    # The module's arguments and a layout reach the same check: the same line, not a second copy of it.
    options = {_OPTION.get(name, name): value for name, value in given.items() if name not in _LAYOUT}
    layout = {name: value for name, value in given.items() if name in _LAYOUT}
    assert _refusal(lambda: settings_from_options(options, **layout)) == message
    if not layout:
        assert _refusal(lambda: StarAttentionLM(**options)) == message


def test_good_settings_round_trip_through_the_layout() -> None:
    settings = StarSettings(block_size=256, anchor_block_size=128, anchor_source="host", hosts=3, anchor_query=True)
    layout = Layout.from_settings(settings)
    assert (layout.method, layout.hosts, layout.block_size, layout.anchor_source) == ("star", 3, 256, "host")
    again = layout.settings()
    assert all(getattr(again, f.name) == getattr(settings, f.name) for f in fields(Layout) if hasattr(again, f.name))
    # The module's defaults are the settings' defaults: no second list of them.
    assert StarAttentionLM().star_settings == StarSettings()


def test_plan_refuses_what_predict_refuses_for_played_hosts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--model.simulate_hosts`` on a group of two hosts: ``plan`` said it fits where ``predict`` refused."""
    layout = ["--model.simulate_hosts", "2", "--trainer.devices", "2", "--model.block_size", "256"]
    assert main(["plan", "--length", "1024", "--gpu", "H100", *layout]) == 2
    planned = capsys.readouterr()
    requests = tmp_path / "in.jsonl"
    requests.write_text(json.dumps({"index": 0, "input_context": "a b c", "input_query": "q", "outputs": ["x"]}) + "\n")
    predict = ["--data.path", str(requests), "--output", str(tmp_path / "out.jsonl"), "--trainer.accelerator", "cpu"]
    assert main(["predict", *predict, "--trainer.logger", "false", *layout]) == 2
    predicted = capsys.readouterr()
    assert planned.out == "" and predicted.out == ""
    plan_lines, predict_lines = planned.err.splitlines(), predicted.err.splitlines()
    assert len(plan_lines) == 1 and len(predict_lines) == 1, (plan_lines, predict_lines)
    assert "plays every host in one process" in plan_lines[0]
    assert plan_lines[0].split(": ", 1)[1] == predict_lines[0].split(": ", 1)[1]


def test_the_engine_imports_nothing_above_it_and_no_module_imports_in_a_cycle() -> None:
    """``engine/`` never imports the module, the callbacks, the preflight, ``plan`` or ``bench``; and the package's
    module-level imports form no cycle."""
    source = Path(__file__).resolve().parents[1] / "src"
    imports: dict[str, set[str]] = {}
    files = {
        ".".join(path.relative_to(source).with_suffix("").parts).removesuffix(".__init__"): path
        for path in (source / "star_lightning").rglob("*.py")
    }
    for name, path in files.items():
        found = set()
        for node in ast.parse(path.read_text()).body:  # module level: what importing it imports (not lazy imports)
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("star_lightning"):
                # ``from package import submodule`` imports the submodule (its package is being set up, not a cycle)
                found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                          for a in node.names}  # fmt: skip
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names if alias.name.startswith("star_lightning")}
        imports[name] = found
    forbidden = ("star_lightning.module", "star_lightning.callbacks", "star_lightning.preflight",
                 "star_lightning.plan", "star_lightning.bench")  # fmt: skip
    for name, found in imports.items():
        if name.startswith("star_lightning.engine"):
            assert not [f for f in found if f.startswith(forbidden)], (name, found)
    edges = {name: {f for f in found if f in imports and f != name} for name, found in imports.items()}
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for other in edges[name]:
            assert state.get(other) != 1, " -> ".join([*path, name, other])
            if other not in state:
                visit(other, [*path, name])
        state[name] = 2

    for name in edges:
        if name not in state:
            visit(name, [])


def test_a_module_without_a_context_parallel_strategy_is_one_host_of_its_own() -> None:
    """No strategy handed a context over (a plain Lightning strategy, or no trainer): one host that writes."""
    module = StarAttentionLM()
    assert module.context_group().size == 1 and module.context_info.writes_predictions
    assert module.context_info.gather_in_world("x") == ["x"] and module.context_info.agree_max_in_context_group(3) == 3
