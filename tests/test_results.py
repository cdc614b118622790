"""Result tables: scores per task x length x attention, star / global ratio with the ring fallback, files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from star_lightning.bench.results import build_table, collect_scores, main, method_from_path, parse_run


def predictions(path: Path, task: str, length: int, correct: int, total: int = 4) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        {"index": i, "task": task, "length": length, "outputs": ["7"], "pred": "7" if i < correct else "0"}
        for i in range(total)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_directory_layout_table_and_files(tmp_path: Path, capsys) -> None:
    runs = tmp_path / "runs"
    predictions(runs / "star" / "vt_4096.jsonl", "vt", 4096, 3)
    predictions(runs / "dense" / "vt_4096.jsonl", "vt", 4096, 4)
    predictions(runs / "ring" / "vt_4096.jsonl", "vt", 4096, 2)
    predictions(runs / "star" / "vt_8192.jsonl", "vt", 8192, 1)
    predictions(runs / "ring_vt_8192.jsonl", "vt", 8192, 2)  # method from the file name; no dense at 8192
    predictions(runs / "notes.jsonl", "vt", 8192, 4)  # names no method: ignored
    out = tmp_path / "out" / "table"
    assert main(["--dir", str(runs), "--out", str(out)]) == 0
    table = json.loads(out.with_suffix(".json").read_text())
    rows = {(row["task"], row["length"]): row for row in table["rows"]}
    assert rows["vt", 4096]["star"] == 75.0 and rows["vt", 4096]["global"] == 100.0
    assert rows["vt", 4096]["star_over_global"] == pytest.approx(0.75)
    assert rows["vt", 8192]["dense"] is None and rows["vt", 8192]["global"] == 50.0  # ring fallback
    assert rows["vt", 8192]["star_over_global"] == pytest.approx(0.5)
    markdown = out.with_suffix(".md").read_text()
    assert "| vt | 4096 | 75.0 | 100.0 | 50.0 | 0.750 |" in markdown
    assert "| vt | 8192 | 25.0 | - | 50.0 | 0.500 |" in markdown
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert markdown in capsys.readouterr().out


def test_run_options_and_means(tmp_path: Path) -> None:
    star_a = predictions(tmp_path / "a.jsonl", "niah_single_1", 4096, 4)
    star_b = predictions(tmp_path / "b.jsonl", "vt", 4096, 2)
    dense = predictions(tmp_path / "c.jsonl", "vt", 4096, 4)
    out = tmp_path / "t"
    argv = [f"--run=attention=star,path={star_a}", f"--run=attention=star,path={star_b}"]
    assert main([*argv, f"--run=attention=dense,path={dense}", "--out", str(out)]) == 0
    table = json.loads(out.with_suffix(".json").read_text())
    (mean,) = table["means"]
    assert mean["num_tasks"] == 1  # niah_single_1 has no dense run: left out of the comparable mean
    assert mean["star"] == 50.0 and mean["dense"] == 100.0 and mean["star_over_global"] == 0.5


def test_length_from_run_option(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"task": "vt", "outputs": ["x"], "pred": "x"}) + "\n")
    assert collect_scores([parse_run(f"attention=star,path={path},length=2048")]) == {("vt", 2048, "star"): 100.0}


def test_method_from_path() -> None:
    assert method_from_path(Path("runs/star/qa.jsonl")) == "star"
    assert method_from_path(Path("dense_4096.jsonl")) == "dense"
    assert method_from_path(Path("starship.jsonl")) is None
    assert build_table({}) == {"rows": [], "means": []}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--run", "attention=flash,path=x.jsonl"], "attention must be one of"),
        (["--run", "path=x.jsonl"], "attention= and path="),
        (["--dir", "/nonexistent/runs"], "/nonexistent/runs"),
        ([], "nothing to tabulate"),
        (["--run", "attention=star,path=/nonexistent.jsonl"], "/nonexistent.jsonl"),
    ],
)
def test_errors(argv: list[str], message: str, tmp_path: Path, capsys) -> None:
    assert main([*argv, "--out", str(tmp_path / "t")]) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
