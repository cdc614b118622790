"""Encode once, ask many: requests that share a context, through the CLI and the data module.

A kept context answers exactly as a re-encoded one (the engine-level float64 check with 1-4 gloo ranks is in
test_star_distributed.py); here: ``context_id`` files and ``--data.contexts``, reuse on and off give the same
predictions, TensorBoard says which requests reused a context, data-parallel groups split by context, bad input.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from star_lightning.cli import main
from star_lightning.data.datamodule import group_by_context, shard_by_context
from star_lightning.data.jsonl import read_requests

STORY = "The grass is green. The sky is blue. " * 10 + "The secret code is 4711. " + "Birds sing. " * 8
OTHER = "Here we go. There and back again. " * 12 + "Remember the number 1234."
QUERIES = [" What is the code?", " What is the number?", " What colour is the sky?"]


def _rows() -> list[dict]:
    """Two contexts, three queries each, interleaved in the file; each context given once."""
    rows = []
    for i, query in enumerate(QUERIES):
        for context_id, text in (("story", STORY), ("other", OTHER)):
            row = {"context_id": context_id, "input_query": query, "outputs": [str(i)], "index": len(rows)}
            if i == 0:
                row["input_context"] = text
            rows.append(row)
    return rows


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _args(model: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return ["predict", "--model.pretrained", str(model), "--model.max_new_tokens", "5", "--model.dtype", "float64",
            "--model.block_size", "64", "--model.anchor_block_size", "32", "--data.path", str(data),
            "--output", str(output), "--trainer.accelerator", "cpu", "--trainer.devices", "1",
            "--trainer.enable_progress_bar", "false", *extra]  # fmt: skip


def _preds(path: Path) -> dict[int, str]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == len({row["index"] for row in rows})
    return {row["index"]: row["pred"] for row in rows}


def test_context_ids_resolve_and_group_in_order_of_first_use(tmp_path: Path) -> None:
    requests = read_requests(_write(tmp_path / "in.jsonl", _rows()))
    assert [r["input_context"] for r in requests] == [STORY, OTHER] * 3
    assert group_by_context(requests) == [[0, 2, 4], [1, 3, 5]]
    # Data-parallel groups take whole contexts, balanced by requests, and together take every request once.
    many = [{"context_id": str(i % 5), "input_context": str(i % 5)} for i in range(13)]
    shards = [shard_by_context(many, 3, shard) for shard in range(3)]
    assert sorted(p for shard in shards for p in shard) == list(range(13))
    for shard in shards:
        assert len({many[p]["context_id"] for p in shard}) == len({p % 5 for p in shard})
        assert all(p % 5 in {q % 5 for q in shard} for p in shard)
    assert max(map(len, shards)) - min(map(len, shards)) <= 3


def test_reuse_gives_the_predictions_of_re_encoding_and_is_logged(tiny_model_dir: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = _write(tmp_path / "in.jsonl", _rows())
    reused, fresh = tmp_path / "reused.jsonl", tmp_path / "fresh.jsonl"
    logs = tmp_path / "logs"
    logger = ["--trainer.logger.class_path", "lightning.pytorch.loggers.TensorBoardLogger",
              "--trainer.logger.init_args.save_dir", str(logs)]  # fmt: skip
    assert main(_args(tiny_model_dir, data, reused, *logger)) == 0
    assert main(_args(tiny_model_dir, data, fresh, "--model.reuse_context", "false", "--trainer.logger", "false")) == 0
    assert _preds(reused) == _preds(fresh) and sorted(_preds(reused)) == list(range(6))
    # The same contexts from a separate contexts file: the same predictions.
    contexts = _write(tmp_path / "contexts.jsonl", [{"context_id": "story", "input_context": STORY},
                                                     {"context_id": "other", "input_context": OTHER}])  # fmt: skip
    bare = [{k: v for k, v in row.items() if k != "input_context"} for row in _rows()]
    from_file = tmp_path / "from_file.jsonl"
    data2 = _write(tmp_path / "in2.jsonl", bare)
    assert (
        main(_args(tiny_model_dir, data2, from_file, "--data.contexts", str(contexts), "--trainer.logger", "false"))
        == 0
    )
    assert _preds(from_file) == _preds(fresh)
    (events,) = list(logs.rglob("events.out.tfevents*"))
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    reused_flags = {e.step: e.value for e in accumulator.Scalars("request/context_reused")}
    phase1 = {e.step: e.value for e in accumulator.Scalars("request/phase1_s")}
    # Indices 0, 2, 4 share "story" (run first), 1, 3, 5 share "other": the first of each encodes it.
    assert reused_flags == {0: 0.0, 2: 1.0, 4: 1.0, 1: 0.0, 3: 1.0, 5: 1.0}
    assert all((phase1[step] == 0.0) == bool(flag) for step, flag in reused_flags.items())


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"context_id": "x", "input_query": "q"}], "line 1: 'context_id' 'x' names no context given before"),
        (
            [{"context_id": "x", "input_context": "one", "input_query": "q"},
             {"context_id": "x", "input_context": "two", "input_query": "q"}],
            "line 2: context 'x' is defined again with a different 'input_context'",
        ),
        (
            [{"context_id": "x", "input_query": "q", "index": 0},
             {"context_id": "x", "input_context": "one", "input_query": "q", "index": 1}],
            "line 1: 'context_id' 'x' names no context given before",
        ),
    ],
)  # fmt: skip
def test_bad_context_ids_are_one_line_naming_the_line(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], rows: list[dict], message: str
) -> None:
    data = _write(tmp_path / "in.jsonl", rows)
    code = main(_args(tiny_model_dir, data, tmp_path / "out.jsonl", "--trainer.logger", "false"))
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out.jsonl").exists()


def test_a_line_contradicting_the_contexts_file_is_refused(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    contexts = _write(tmp_path / "contexts.jsonl", [{"context_id": "x", "input_context": "one"}])
    data = _write(tmp_path / "in.jsonl", [{"context_id": "x", "input_context": "other", "input_query": "q"}])
    args = _args(tiny_model_dir, data, tmp_path / "out.jsonl", "--data.contexts", str(contexts))
    assert main([*args, "--trainer.logger", "false"]) == 2
    err = capsys.readouterr().err
    assert "line 1: context 'x' is defined again" in err and "contexts.jsonl, line 1" in err


def test_data_parallel_groups_split_by_context(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Two data-parallel groups (2 processes, gloo): each context's requests are answered by one group, each once."""
    import os
    import subprocess
    import sys

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    third = {"context_id": "third", "input_context": STORY + " Also 99.", "input_query": QUERIES[0], "index": 6}
    rows = [*_rows(), third]
    data = _write(tmp_path / "in.jsonl", rows)
    output, logs = tmp_path / "out.jsonl", tmp_path / "logs"
    args = _args(
        tiny_model_dir,
        data,
        output,
        "--trainer.logger.class_path",
        "lightning.pytorch.loggers.TensorBoardLogger",
        "--trainer.logger.init_args.save_dir",
        str(logs),
    )
    args[args.index("--trainer.devices") + 1] = "2"
    args += ["--trainer.strategy.context_parallel_size", "1"]  # fmt: skip
    launch = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")
    env = {k: v for k, v in os.environ.items() if k not in launch and not k.startswith("PL_")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "star_lightning", *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=240)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(_preds(output)) == list(range(7))
    (events,) = list(logs.rglob("events.out.tfevents*"))
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    group = {e.step: e.value for e in accumulator.Scalars("request/data_parallel_group")}
    assert sorted(group) == list(range(7))
    assert group[0] == group[2] == group[4] and group[1] == group[3] == group[5]
    assert {group[0], group[1], group[6]} == {0.0, 1.0}  # both groups worked


def test_resume_and_dense_keep_exactly_once_with_shared_contexts(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A run stopped after some requests of a context resumes with exactly the rest; dense reuses a kept context
    too (its transformers cache rolled back), with the predictions of re-encoding."""
    data = _write(tmp_path / "in.jsonl", _rows())
    quiet = ("--trainer.logger", "false")
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    assert main(_args(tiny_model_dir, data, full, *quiet)) == 0
    assert main(_args(tiny_model_dir, data, part, "--data.limit", "3", *quiet)) == 0  # story q0, other q0, story q1
    assert sorted(_preds(part)) == [0, 1, 2]
    assert main(_args(tiny_model_dir, data, part, *quiet)) == 0
    assert _preds(part) == _preds(full)  # each request once (_preds checks), the same answers
    dense, dense_fresh = tmp_path / "dense.jsonl", tmp_path / "dense_fresh.jsonl"
    assert main(_args(tiny_model_dir, data, dense, "--model.attention", "dense", *quiet)) == 0
    off = ("--model.attention", "dense", "--model.reuse_context", "false", *quiet)
    assert main(_args(tiny_model_dir, data, dense_fresh, *off)) == 0
    assert _preds(dense) == _preds(dense_fresh) and sorted(_preds(dense)) == list(range(6))
