"""``star-lightning score``: per-task metric choice, output/outputs references, summary JSON, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from star_lightning.bench.scoring import main, metric_for


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_scores_per_task_and_mean(tmp_path: Path, capsys) -> None:
    records = [
        {"index": 0, "task": "niah_multivalue", "length": 4096, "outputs": ["11", "22"], "pred": "11 and 33"},
        {"index": 1, "task": "niah_multivalue", "length": 4096, "outputs": ["11", "22"], "pred": "22, 11"},
        {"index": 2, "task": "qa_1", "length": 4096, "outputs": ["Paris", "City of Paris"], "pred": "paris"},
        {"index": 3, "task": "qa_1", "length": 4096, "output": "Rome", "pred": "Milan"},
    ]
    path = write(tmp_path / "p.jsonl", records)
    assert main([str(path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tasks"] == {"niah_multivalue": 75.0, "qa_1": 50.0}
    assert summary["counts"] == {"niah_multivalue": 2, "qa_1": 2}
    assert summary["mean"] == 62.5


def test_metric_choice_follows_ruler() -> None:
    assert metric_for("qa_1") == metric_for("qa_2") == "match_part"
    assert {metric_for(task) for task in ("niah_single_1", "vt", "cwe", "fwe")} == {"match_all"}
    assert metric_for("qa3") == "babilong"
    assert metric_for("my_task", "match_part") == "match_part"


def test_several_files_and_truncated_tail(tmp_path: Path, capsys) -> None:
    first = write(tmp_path / "a.jsonl", [{"task": "vt", "outputs": ["A", "B"], "pred": "A B"}])
    second = tmp_path / "b.jsonl"
    second.write_text(json.dumps({"task": "vt", "outputs": ["A", "B"], "pred": "A"}) + "\n" + '{"task": "vt", "ou')
    assert main([str(first), str(second)]) == 0
    assert json.loads(capsys.readouterr().out)["tasks"] == {"vt": 75.0}


@pytest.mark.parametrize(
    ("record", "extra", "message"),
    [
        ({"task": "mystery", "outputs": ["a"], "pred": "a"}, [], "--metric"),
        ({"outputs": ["a"], "pred": "a"}, [], "--task"),
        ({"task": "vt", "pred": "a"}, [], "'outputs'"),
        ({"task": "vt", "outputs": ["a"]}, [], "'pred'"),
        ({"task": "vt", "outputs": ["a"], "pred": "a"}, ["--metric", "babilong"], "BABILong"),
    ],
)
def test_errors_are_clear(record: dict, extra: list[str], message: str, tmp_path: Path, capsys) -> None:
    path = write(tmp_path / "p.jsonl", [record])
    assert main([str(path), *extra]) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error


def test_missing_file_and_help(tmp_path: Path, capsys) -> None:
    assert main([str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "predictions" in capsys.readouterr().out


def test_errors_name_the_file_line_and_fix(tmp_path: Path, capsys) -> None:
    good = {"task": "vt", "outputs": ["a"], "pred": "a"}
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({"outputs": ["a"], "pred": "a"}) + "\n")
    assert main([str(path)]) == 2
    error = capsys.readouterr().err
    assert f"{path}, line 3: no 'task' field" in error and "pass --task NAME" in error
    assert main([str(path), "--task", "vt"]) == 0  # the fix the message names
    assert json.loads(capsys.readouterr().out)["counts"] == {"vt": 2}


def _score_in_a_process_group(rank: int, world_size: int, paths: list[str]) -> dict:
    """``score`` of this rank's own file inside a live process group (a session that ran ``predict`` before)."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([paths[rank]]) == 0
    return json.loads(out.getvalue())


def test_score_inside_a_process_group_scores_only_its_file(tmp_path: Path) -> None:
    """Two processes joined by gloo each score their own file: each gets its file's scores, never a mix with the
    other's (torchmetrics syncs metric states wherever torch.distributed is up; on NCCL it even fails on the CPU
    states, as a GPU session that ran predict and then score in one process did)."""
    from distributed_utils import run_on_ranks

    def records(pred: str) -> list[dict]:
        return [
            {"index": 0, "task": "niah_single_1", "outputs": ["7"], "pred": pred},
            {"index": 1, "task": "qa1", "output": "garden", "question": "Where is Mary?", "pred": pred},
        ]

    paths = [str(write(tmp_path / "right.jsonl", records("7 garden"))),
             str(write(tmp_path / "wrong.jsonl", records("kitchen"))),]  # fmt: skip
    right, wrong = run_on_ranks(_score_in_a_process_group, 2, tmp_path, paths=paths)
    assert right["tasks"] == {"niah_single_1": 100.0, "qa1": 100.0} and right["counts"] == {
        "niah_single_1": 1,
        "qa1": 1,
    }
    assert wrong["tasks"] == {"niah_single_1": 0.0, "qa1": 0.0} and wrong["counts"] == {"niah_single_1": 1, "qa1": 1}
