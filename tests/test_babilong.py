"""BABILong: data layouts, prompt and context/query split, the generate command, and scoring of its rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from star_lightning.bench import babilong
from star_lightning.bench.generate import main as generate_main
from star_lightning.bench.scoring import main as score_main
from tokenizer_factory import build_tokenizer

SAMPLES = [
    {
        "input": "Mary moved to the bathroom. The sky was grey that day. John went to the hallway. "
        "Mary travelled to the office.",
        "question": "Where is Mary?",
        "target": "office",
    },
    {
        "input": "Daniel journeyed to the garden. Many people like tea. Daniel went back to the kitchen.",
        "question": "Where is Daniel?",
        "target": "kitchen",
    },
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("babilong_tokenizer")
    build_tokenizer(directory)
    return directory


def write_split(root: Path, task: str = "qa1", split: str = "1k") -> Path:
    (root / split).mkdir(parents=True, exist_ok=True)
    path = root / split / f"{task}.jsonl"
    path.write_text("".join(json.dumps(sample) + "\n" for sample in SAMPLES))
    return path


def test_prompt_split_keeps_facts_in_context() -> None:
    prompt = babilong.build_prompt(SAMPLES[0], "qa1")
    assert prompt.context.startswith("I will give you context with the facts about positions")
    assert "<example>" in prompt.context and "Always return your answer" in prompt.context
    assert prompt.context.endswith(f"<context>\n{SAMPLES[0]['input']}\n</context>")
    assert prompt.query == "\nQuestion: Where is Mary?"
    assert prompt.outputs == ["office"]
    bare = babilong.build_prompt(SAMPLES[0], "qa1", instruction=False, examples=False, post_prompt=False)
    assert bare.context.startswith("<context>\n")


@pytest.mark.parametrize("layout", ["split_dir", "task_file_json", "direct_file"])
def test_data_layouts(layout: str, tmp_path: Path) -> None:
    if layout == "split_dir":
        expected = write_split(tmp_path)
        found = babilong.find_data_file(tmp_path, "qa1", 1024)
    elif layout == "task_file_json":
        expected = tmp_path / "qa1.json"
        expected.write_text(json.dumps(SAMPLES))
        found = babilong.find_data_file(tmp_path, "qa1", 4096)
    else:
        expected = write_split(tmp_path)
        found = babilong.find_data_file(expected, "qa1", 4096)
    assert found == expected
    assert babilong.load_samples(found, "qa1") == SAMPLES


def test_generate_then_score(tokenizer_dir: Path, tmp_path: Path, capsys) -> None:
    write_split(tmp_path / "data")
    output = tmp_path / "qa1.jsonl"
    argv = ["--benchmark", "babilong", "--task", "qa1", "--data_dir", str(tmp_path / "data")]
    argv += ["--tokenizer", str(tokenizer_dir), "--length", "1024", "--num_samples", "5", "--output", str(output)]
    assert generate_main(argv) == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["index"] for row in rows] == [0, 1]
    assert rows[1]["outputs"] == ["kitchen"] and rows[1]["question"] == "Where is Daniel?"
    assert rows[0]["input_context"].endswith("</context>") and rows[0]["input_query"] == "\nQuestion: Where is Mary?"
    assert rows[0]["task"] == "qa1" and rows[0]["length"] == 1024

    predictions = tmp_path / "pred.jsonl"
    answers = ["The most recent location of Mary is office.", "Daniel is in the garden."]
    records = [
        {key: value for key, value in row.items() if not key.startswith("input_")} | {"pred": answer}
        for row, answer in zip(rows, answers, strict=True)
    ]
    predictions.write_text("".join(json.dumps(record) + "\n" for record in records))
    capsys.readouterr()
    assert score_main([str(predictions)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tasks"] == {"qa1": 50.0} and summary["mean"] == 50.0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "--data_dir"),
        (["--data_dir", "/nonexistent/babilong"], "--data_dir /nonexistent/babilong"),
        (["--task", "qa7", "--data_dir", "."], "--task qa7"),
    ],
)
def test_errors(extra: list[str], message: str, tokenizer_dir: Path, tmp_path: Path, capsys) -> None:
    argv = ["--benchmark", "babilong", "--task", "qa2", "--tokenizer", str(tokenizer_dir), "--length", "1024"]
    assert generate_main([*argv, "--output", str(tmp_path / "o.jsonl"), *extra]) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error


def test_missing_split_names_the_paths_tried(tmp_path: Path) -> None:
    write_split(tmp_path, split="2k")
    with pytest.raises(babilong.ConfigurationError, match="4k"):
        babilong.find_data_file(tmp_path, "qa1", 4096)


def test_bad_rows_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "qa1.jsonl"
    path.write_text(json.dumps({"input": "x", "question": "q"}) + "\n")
    with pytest.raises(babilong.ConfigurationError, match="target"):
        babilong.load_samples(path, "qa1")
