"""What a predictions file holds is never silently wrong: a damaged, foreign or unwritable output is named before any
rank starts, with the way out; ``score`` counts each request of one run once and says what it leaves out."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from slurm_cluster import copy_finished, predict_args, read_indices
from star_lightning.cli import main

SCORE = ("--task", "niah_single_1")


def _resume(tiny_model_dir: Path, requests: Path, output: Path) -> int:
    args = predict_args(tiny_model_dir, requests, output, "--trainer.devices", "1", "--trainer.logger", "false")
    return main(args)


def _one_line(capsys: pytest.CaptureFixture[str], prefix: str, *words: str) -> str:
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(prefix), lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def test_a_torn_line_in_the_middle_names_the_output_and_the_way_out(
    tiny_model_dir: Path, finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    requests, output = copy_finished(finished, tmp_path)
    lines = output.read_text().splitlines(keepends=True)
    output.write_text(lines[0] + lines[1][: len(lines[1]) // 2] + "\n" + lines[2])
    before = output.read_bytes()
    assert _resume(tiny_model_dir, requests, output) == 2
    _one_line(capsys, "star-lightning predict: error: ", f"--output {output} is damaged", "line 2", "--overwrite true")
    assert output.read_bytes() == before


def test_an_output_holding_a_foreign_index_is_refused_on_resume_and_by_score(
    tiny_model_dir: Path, finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    requests, output = copy_finished(finished, tmp_path)
    with output.open("a") as handle:
        handle.write(json.dumps({"index": 99, "outputs": ["99"], "pred": "99"}) + "\n")
    assert _resume(tiny_model_dir, requests, output) == 2
    _one_line(capsys, "star-lightning predict: error: ", "index 99", "no request of --data.path", "--overwrite true")
    assert main(["score", str(output), *SCORE]) == 2
    _one_line(capsys, "star-lightning score: error: ", "line 4", "index 99 is no request of the run")


def test_a_torn_last_line_of_an_append_only_output_is_named_before_the_ranks_start(
    tiny_model_dir: Path, finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    requests, output = copy_finished(finished, tmp_path)
    lines = output.read_text().splitlines(keepends=True)
    output.write_text(lines[0] + lines[1][:10])  # the job was killed while writing the second line
    torn = output.read_bytes()
    if subprocess.run(["chattr", "+a", str(output)], capture_output=True, check=False).returncode != 0:
        pytest.skip("chattr +a (append-only files) needs root and a file system that supports it")
    try:
        assert _resume(tiny_model_dir, requests, output) == 2
        _one_line(capsys, "star-lightning predict: error: ", "line 2 cut short", "append-only", "another --output")
        assert output.read_bytes() == torn
    finally:
        subprocess.run(["chattr", "-a", str(output)], check=True)
    assert _resume(tiny_model_dir, requests, output) == 0  # once writable: cut off, then resumed
    assert sorted(read_indices(output)) == [0, 1, 2]


def test_score_warns_of_a_torn_last_line_and_leaves_it_out(
    finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, output = copy_finished(finished, tmp_path)
    assert main(["score", str(output), *SCORE]) == 0
    whole = json.loads(capsys.readouterr().out)
    with output.open("a") as handle:
        handle.write('{"index": 3, "outputs": ["3"], "pr')
    assert main(["score", str(output), *SCORE]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["counts"] == whole["counts"] == {"niah_single_1": 3}
    warning = captured.err.splitlines()
    assert len(warning) == 1 and "warning" in warning[0] and "line 4 is cut short" in warning[0], warning


def test_score_refuses_one_file_given_twice_and_names_a_folder(
    finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, output = copy_finished(finished, tmp_path)
    link = tmp_path / "link.jsonl"
    link.symlink_to(output)
    for second in (output, link):
        assert main(["score", str(output), str(second), *SCORE]) == 2
        _one_line(capsys, "star-lightning score: error: ", "the same file", "give each predictions file once")
    assert main(["score", str(tmp_path)]) == 2
    _one_line(capsys, "star-lightning score: error: ", "is a folder")
