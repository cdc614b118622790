"""The command line end to end on a local model folder with a tokenizer, and its error messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from star_lightning.cli import main
from star_lightning.data import datamodule
from star_lightning.data.jsonl import TOKENS_FIELD
from star_lightning.tokens import RequestEncoder, context_ids, query_ids

CONTEXTS = [
    "The grass is green. The sky is blue. " * 12 + "The secret code is 4711.",
    "Here we go. There and back again. " * 20 + "Remember the number 1234.",
    "Tiny context.",
]


def _write_requests(path: Path, rows: list[dict] | None = None) -> Path:
    rows = rows or [
        {"input_context": c, "input_query": " What is the number?", "outputs": [str(i)], "task": "demo"}
        for i, c in enumerate(CONTEXTS)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _predict_args(model_dir: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return [
        "predict",
        "--model.pretrained", str(model_dir),
        "--model.max_new_tokens", "6",
        "--model.dtype", "float64",
        "--data.path", str(data),
        "--output", str(output),
        "--trainer.accelerator", "cpu",
        "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false",
        *extra,
    ]  # fmt: skip


def _read(path: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == len({r["index"] for r in rows}), "a request was written twice"
    return {r["index"]: r for r in rows}


def _run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # A fresh job: none of the rendezvous variables an in-process run of this test left behind.
    launch_vars = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")
    env = {k: v for k, v in os.environ.items() if k not in launch_vars and not k.startswith("PL_")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "star_lightning", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=240
    )


def test_help_lists_every_model_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--model.pretrained",
        "--model.attention",
        "--model.block_size",
        "--model.anchor_block_size",
        "--model.max_new_tokens",
        "--data.path",
        "--output",
        "--trainer.devices",
        "--config",
    ):
        assert option in text
    assert main([]) == 2 and main(["--help"]) == 0


def test_one_block_star_writes_the_same_predictions_as_dense(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = _write_requests(tmp_path / "in.jsonl")
    star_out, dense_out = tmp_path / "star.jsonl", tmp_path / "dense.jsonl"
    common = ["--trainer.devices", "1"]
    assert main(_predict_args(tiny_model_dir, data, star_out, "--model.block_size", "100000", *common)) == 0
    assert main(_predict_args(tiny_model_dir, data, dense_out, "--model.attention", "dense", *common)) == 0
    star, dense = _read(star_out), _read(dense_out)
    assert sorted(star) == [0, 1, 2]
    for index, row in star.items():
        assert row["pred"] == dense[index]["pred"]
        assert row["outputs"] == [str(index)] and row["task"] == "demo"  # references copied through
        assert "input_context" not in row
    # Predictions are the model's own greedy continuation, decoded.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    ids = tokenizer(CONTEXTS[1])["input_ids"] + tokenizer(" What is the number?", add_special_tokens=False)["input_ids"]
    prompt = torch.tensor([ids])
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    expected = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
    assert star[1]["pred"] == expected


def test_two_hosts_write_what_one_host_writes(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The CLI with --trainer.devices 2 (real processes, gloo): same blocks, other placement, same text, whatever
    the anchor's source (the 2 hosts use the default, the anchor broadcast); the zigzag ring over 2 hosts writes
    what dense writes."""
    rows = [
        {"input_context": c, "input_query": " What is the number?", "index": 10 + i} for i, c in enumerate(CONTEXTS[:2])
    ]
    data = _write_requests(tmp_path / "in.jsonl", rows)
    two = tmp_path / "two.jsonl"
    star = ["--model.block_size", "32", "--model.anchor_block_size", "16"]
    ones = {}
    for source in ("host", "block"):
        ones[source] = tmp_path / f"one_{source}.jsonl"
        one_args = _predict_args(tiny_model_dir, data, ones[source], *star, "--model.anchor_source", source)
        assert main([*one_args, "--trainer.devices", "1"]) == 0
    result = _run_cli(_predict_args(tiny_model_dir, data, two, *star, "--trainer.devices", "2"), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = {i: r["pred"] for i, r in _read(ones["host"]).items()}
    assert {i: r["pred"] for i, r in _read(ones["block"]).items()} == expected
    assert {i: r["pred"] for i, r in _read(two).items()} == expected
    assert sorted(_read(two)) == [10, 11]
    ring, dense = tmp_path / "ring.jsonl", tmp_path / "dense.jsonl"
    assert (
        main([*_predict_args(tiny_model_dir, data, dense, "--model.attention", "dense"), "--trainer.devices", "1"]) == 0
    )
    ring_args = _predict_args(tiny_model_dir, data, ring, "--model.attention", "ring", "--model.ring_layout", "zigzag")
    result = _run_cli([*ring_args, "--trainer.devices", "2"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {i: r["pred"] for i, r in _read(ring).items()} == {i: r["pred"] for i, r in _read(dense).items()}


def test_an_existing_output_is_resumed_not_rewritten(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = _write_requests(tmp_path / "in.jsonl")
    output = tmp_path / "out.jsonl"
    args = _predict_args(tiny_model_dir, data, output, "--model.block_size", "64", "--trainer.devices", "1")
    # A previous run of the same settings wrote requests 0 and 1, then died in the middle of a line (request 1's
    # text is marked, to see that it is kept, not computed again).
    assert main([*args, "--data.limit", "2"]) == 0
    first, second = output.read_text().splitlines()
    marked = json.dumps({**json.loads(second), "pred": "from the first run"})
    output.write_text(f"{first}\n{marked}\n" + '{"index": 2, "pr')
    assert main(args) == 0
    rows = _read(output)
    assert sorted(rows) == [0, 1, 2]
    assert rows[1]["pred"] == "from the first run"


@pytest.mark.parametrize(
    ("extra", "rows", "message"),
    [
        (["--model.block_size", "0"], None, "block_size must be a positive"),
        (["--model.block_size", "8", "--model.anchor_block_size", "9"], None, "anchor_block_size (9) is larger"),
        (["--model.anchor_block_size", "0"], None, "anchor_block_size must be a positive"),
        ([], '{"input_context": "a", "input_query": "b"}\n{not json\n', "line 2: not valid JSON"),
        ([], '{"input_query": "b"}\n', "line 1: missing the field 'input_context'"),
        ([], '{"input_context": "a"}\n', "line 1: missing the field 'input_query'"),
        ([], '{"input_context": "  ", "input_query": "b"}\n', "line 1: 'input_context' is empty"),
        (
            [],
            '{"input_context": "a", "input_query": "b", "index": 3}\n{"input_context": "a", "input_query": "b", '
            '"index": 3}\n',
            "index 3 was already used on line 1",
        ),
        (
            [],
            '{"input_context": "a", "input_query": "b", "max_new_tokens": 0}\n',
            "line 1: 'max_new_tokens' must be a positive integer",
        ),
        (["--trainer.strategy.gpus_per_host", "0"], None, "gpus_per_host must be a positive number of GPUs"),
        (["--trainer.strategy.gpus_per_host", "2"], None, "gpus_per_host=2 spreads one model copy over several GPUs"),
    ],
)
def test_bad_input_exits_with_a_message_naming_the_problem(
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    rows: str | None,
    message: str,
) -> None:
    data = tmp_path / "in.jsonl"
    if rows is None:
        _write_requests(data)
    else:
        data.write_text(rows)
    code = main(_predict_args(tiny_model_dir, data, tmp_path / "out.jsonl", "--trainer.devices", "1", *extra))
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_missing_model_folder_and_unservable_model_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _write_requests(tmp_path / "in.jsonl")
    assert main(_predict_args(tmp_path / "no_such_model", data, tmp_path / "o.jsonl", "--trainer.devices", "1")) == 2
    assert "does not exist" in capsys.readouterr().err
    from transformers import MambaConfig, MambaForCausalLM

    mamba = tmp_path / "mamba"
    MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1)).save_pretrained(mamba)
    assert main(_predict_args(mamba, data, tmp_path / "o.jsonl", "--trainer.devices", "1")) == 2
    err = capsys.readouterr().err
    assert "'mamba'" in err and "AttentionInterface" in err


def test_weights_only_from_safetensors(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder with only a pickled checkpoint is refused: nothing is unpickled behind the user's back."""
    folder = tmp_path / "pickled"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tiny_model_dir / name).read_bytes())
    from safetensors.torch import load_file

    torch.save(load_file(tiny_model_dir / "model.safetensors"), folder / "pytorch_model.bin")
    data = _write_requests(tmp_path / "in.jsonl")
    assert main(_predict_args(folder, data, tmp_path / "o.jsonl", "--trainer.devices", "1")) == 2
    assert "could not load model weights" in capsys.readouterr().err


def test_distributed_layout_errors_exit_nonzero_on_every_rank(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = _write_requests(tmp_path / "in.jsonl")
    result = _run_cli(
        _predict_args(
            tiny_model_dir,
            data,
            tmp_path / "o.jsonl",
            "--trainer.devices",
            "3",
            "--trainer.strategy.context_parallel_size",
            "2",
        ),
        tmp_path,
    )
    assert result.returncode != 0
    assert "not divisible by context_parallel_size 2" in result.stderr
    result = _run_cli(
        _predict_args(
            tiny_model_dir, data, tmp_path / "o.jsonl", "--trainer.devices", "2", "--model.block_size", "100000"
        ),
        tmp_path,
    )
    assert result.returncode != 0
    assert "fewer than the 2 hosts" in result.stderr and "Lower --model.block_size" in result.stderr


def test_a_request_budget_lowers_max_new_tokens_for_that_request(tiny_model_dir: Path) -> None:
    from star_lightning.module import StarAttentionLM

    module = StarAttentionLM(pretrained=str(tiny_model_dir), block_size=32, max_new_tokens=8, dtype="float64")
    request = {"index": 0, "input_context": CONTEXTS[0], "input_query": " What is the number?"}
    with torch.no_grad():
        full = module.run_request(request).token_ids
        short = module.run_request({**request, "max_new_tokens": 3}).token_ids
        capped = module.run_request({**request, "max_new_tokens": 50}).token_ids
    assert len(full) == 8, "the random model ended early; pick another context"
    assert short == full[:3]
    assert capped == full  # --model.max_new_tokens stays the upper bound


class _MarkedEncoder(RequestEncoder):
    """Tokenizes as the real one does and marks the process that did it (copied into the prediction)."""

    def __call__(self, request: dict) -> dict:
        return {**super().__call__(request), "tokenized_in": os.getpid()}


def test_requests_tokenized_in_a_worker_give_what_the_main_process_gives(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--data.num_workers 1`` (the default on a GPU): the worker's token ids reach predict_step and answer exactly
    what tokenizing in the main process answers; the ids are never written out."""
    data = _write_requests(tmp_path / "in.jsonl")
    main_out, worker_out = tmp_path / "main.jsonl", tmp_path / "worker.jsonl"
    common = ["--trainer.devices", "1", "--model.block_size", "64"]
    assert main(_predict_args(tiny_model_dir, data, main_out, "--data.num_workers", "0", *common)) == 0
    monkeypatch.setattr(datamodule, "RequestEncoder", _MarkedEncoder)
    assert main(_predict_args(tiny_model_dir, data, worker_out, "--data.num_workers", "1", *common)) == 0
    in_main, in_worker = _read(main_out), _read(worker_out)
    assert sorted(in_worker) == sorted(in_main) == [0, 1, 2]
    for index, row in in_worker.items():
        assert row["tokenized_in"] != os.getpid()  # a worker process tokenized it
        assert row["pred"] == in_main[index]["pred"]
        assert TOKENS_FIELD not in row and TOKENS_FIELD not in in_main[index]


def test_the_encoder_makes_the_ids_predict_step_makes_and_passes_on_what_it_cannot_tokenize(
    tiny_model_dir: Path,
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    request = {"index": 4, "input_context": CONTEXTS[0], "input_query": " What is the number?"}
    context, query = RequestEncoder(tokenizer)(request)[TOKENS_FIELD]
    assert context.tolist() == [context_ids(tokenizer, CONTEXTS[0])] and context.dtype == torch.long
    assert query.tolist() == [query_ids(tokenizer, " What is the number?")]
    unreadable = {"index": 5, "input_context": None, "input_query": "?"}  # the main process reports it
    assert RequestEncoder(tokenizer)(unreadable) is unreadable
