"""Every option error is one line on stderr naming the option, the value and what is accepted (or the closest known
option), exit code 2, before any model loads: the parser's own errors and the values the classes refuse alike."""

from __future__ import annotations

from pathlib import Path

import pytest

from star_lightning.cli import main


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--model.attention", "RING"], "--model.attention RING: expected one of star, ring, dense"),
        (["--model.blocksize", "64"], "unknown option --model.blocksize; did you mean --model.block_size?"),
        (["--data.limt", "3"], "unknown option --data.limt; did you mean --data.limit?"),
        (
            ["--trainer.strategy.context_paralel_size", "2"],
            "did you mean --trainer.strategy.context_parallel_size?",
        ),
        (["--model.stop_strings", ""], "--model.stop_strings '': expected a list of strings"),
        (["--model.stop_strings", '[""]'], '--model.stop_strings [""]: expected non-empty strings'),
        (["--model.anchor", "maybe"], "--model.anchor maybe: expected true or false"),
        (["--trainer.strategy.timeout_s", "soon"], "--trainer.strategy.timeout_s soon: expected a number"),
        (["--trainer.devices", "0"], "--trainer.devices 0: expected a positive number of processes per node"),
        (["--trainer.accelerator", "gpuu"], "--trainer.accelerator gpuu: expected one of"),
        (["--data.limit", "-1"], "--data.limit -1: expected a positive number of requests"),
        (["--data.limit", "0"], "--data.limit 0: expected a positive number of requests"),
        (["--data.num_workers", "-1"], "--data.num_workers -1: expected 0 (tokenize in the main process) or more"),
        (
            ["--model.passing_selection", "per_head"],
            "--model.passing_selection per_head chooses the tokens that pass between hosts, but none pass",
        ),
        (["--model.passing_pool_kernel", "3"], "set --model.passing_tokens, or drop --model.passing_pool_kernel"),
        (
            ["--model.anchor_query_positions", "phase2"],
            "--model.anchor_query_positions phase2 places the query in every block's prefix, but there is none",
        ),
    ],
)
def test_an_option_error_is_one_line_naming_the_option_and_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], expected: str
) -> None:
    args = ["--data.path", str(tmp_path / "no_requests.jsonl"), "--output", str(tmp_path / "out.jsonl")]
    code = main(["predict", *args, "--trainer.accelerator", "cpu", "--trainer.logger", "false", *extra])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith("star-lightning predict: error: "), lines[0]
    assert expected in lines[0], lines[0]


def test_plan_options_get_the_same_one_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for extra, expected in (
        (["--model.blocksize", "64"], "unknown option --model.blocksize; did you mean --model.block_size?"),
        (["--lenght", "5"], "unknown option --lenght; did you mean --length?"),
        (["--trainer.devices", "0"], "--trainer.devices 0: expected a positive number of processes per node"),
        (
            ["--trainer.strategy.context_parallel_size", "-1"],
            "--trainer.strategy.context_parallel_size -1: expected a positive number of hosts",
        ),
    ):
        assert main(["plan", "--length", "1024", "--gpu", "H100", *extra]) == 2
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("star-lightning plan: error: "), lines
        assert expected in lines[0], lines[0]


def test_the_option_defaults_the_do_nothing_check_assumes_are_the_modules() -> None:
    import inspect

    from star_lightning.module import StarAttentionLM

    defaults = {name: p.default for name, p in inspect.signature(StarAttentionLM.__init__).parameters.items()}
    assert defaults["passing_selection"] == "shared"
    assert defaults["passing_pool_kernel"] == 7
    assert defaults["anchor_query_positions"] == "after_anchor"


@pytest.mark.parametrize(("text", "held"), [("", "nothing (it is empty)"), ("- a\n- b\n", "a YAML list")])
def test_a_config_file_without_options_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, held: str
) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(text)
    assert main(["predict", "--config", str(config)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert f"--config {config}: the file holds {held}, not options" in lines[0], lines[0]


def test_generate_argument_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--benchmark", "rulr", "--task", "qa1", "--length", "9", "--output", "x.jsonl"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("star-lightning generate: error: argument --benchmark"), lines
    assert "invalid choice: 'rulr'" in lines[0], lines[0]


def test_generate_suggests_no_length_beyond_the_models_positions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", "--benchmark", "ruler", "--task", "niah_single_1", "--queries_per_context", "1000"]
    assert main([*argv, "--length", "512", "--num_samples", "1", "--output", str(tmp_path / "q.jsonl")]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert "more than the 8192 positions the model of --tokenizer" in lines[0], lines[0]
    assert "Lower --queries_per_context" in lines[0] and "Use --length" not in lines[0], lines[0]


def test_a_hub_id_is_answered_at_once_when_the_hub_cannot_be_reached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from star_lightning import models

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: the connection is refused
    monkeypatch.setattr(models, "_HUB_REACHABLE", {})
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"input_context": "Some text.", "input_query": "What?"}\n')
    args = ["--data.path", str(requests), "--output", str(tmp_path / "out.jsonl"), "--trainer.accelerator", "cpu"]
    assert main(["predict", "--model.pretrained", "nosuch/model-x", *args, "--trainer.logger", "false"]) == 2
    argv = [
        "generate",
        "--benchmark",
        "ruler",
        "--task",
        "niah_single_1",
        "--tokenizer",
        "nosuch/tok",
        "--length",
        "500",
    ]
    assert main([*argv, "--length", "500", "--output", str(tmp_path / "g.jsonl")]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    for line, option in zip(lines, ("--model.pretrained nosuch/model-x", "--tokenizer nosuch/tok"), strict=True):
        assert f"{option}: no local folder or file of that name, not in the HuggingFace cache" in line, line
        assert "http://127.0.0.1:9 cannot be reached" in line, line


def _help(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def test_predict_and_plan_help_say_how_to_set_the_hosts_without_training_text(
    capsys: pytest.CaptureFixture[str],
) -> None:
    predict, plan = _help("predict", capsys), _help("plan", capsys)
    for text in (predict, plan):
        assert "known subclasses" not in text and "<lambda>" not in text and "Default: ``" not in text
        flat = " ".join(text.split())
        assert "each request is spread over --trainer.strategy.context_parallel_size processes" in flat, flat[:600]
    assert "--model.temperature" in predict and "--model.temperature" not in plan
    assert "--model.stop_strings" not in plan and "--model.block_size" in plan
    assert len(predict.splitlines()) < 330


def test_generate_help_says_the_tokenizer_may_be_a_gguf_file(capsys: pytest.CaptureFixture[str]) -> None:
    text = " ".join(_help("generate", capsys).split())
    assert ".gguf" in text.split("--tokenizer TOKENIZER HF tokenizer:", 1)[1][:100], text
