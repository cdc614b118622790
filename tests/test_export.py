"""``star-lightning export --format reference``: files NVIDIA/Star-Attention's evaluators read, read as they read."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from star_lightning.bench.babilong import generate_samples as babilong_samples
from star_lightning.bench.export import main as export_main
from star_lightning.bench.ruler import generate_samples
from star_lightning.bench.scoring import main as score_main
from star_lightning.cli import main as cli_main
from star_lightning.data.jsonl import prediction_record
from test_metrics import OFFICIAL_LABELS, official_compare_answers
from tokenizer_factory import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return build_tokenizer(tmp_path_factory.mktemp("export_tokenizer"))


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def predictions_of(rows: list[dict], answer) -> list[dict]:
    """What predict writes for these requests (inputs dropped, context_id kept), in a data-parallel order."""
    return [prediction_record(row, answer(row)) for row in reversed(rows)]


def reference_ruler_evaluation(path: Path) -> tuple[list[str], list[str], list[list[str]], list[int], float]:
    """NVIDIA/Star-Attention ruler/eval/evaluate.py: ``get_pred_and_ref`` and ``string_match_all`` as written there."""
    lines = [json.loads(line) for line in path.open()]  # its read_jsonl
    inputs, predicts, references, indices = [], [], [], []
    for line in lines:
        inputs.append(line["input_context"] + line["input_query"])
        predict = re.compile(r"[\x00-\x1f]").sub("\n", line["pred"].strip()).strip()  # postprocess_pred
        predicts.append(predict)
        references.append(line.get("outputs", [line.get("output", "")]))
        indices.append(line["others"].get("id", line["index"]))
    score = sum(
        sum(1.0 if r.lower() in pred.lower() else 0.0 for r in ref) / len(ref)
        for pred, ref in zip(predicts, references, strict=True)
    )
    return inputs, predicts, references, indices, round(score / len(predicts) * 100, 2)


def test_ruler_export_reads_as_the_reference_evaluator_reads_it(tokenizer, tmp_path: Path, capsys) -> None:
    rows = generate_samples("niah_single_1", tokenizer, length=1024, num_samples=3, seed=0, queries_per_context=2)
    requests = write(tmp_path / "requests.jsonl", rows)
    predictions = write(
        tmp_path / "pred.jsonl", predictions_of(rows, lambda row: row["outputs"][0] if row["index"] % 3 else "none")
    )
    exported = tmp_path / "ruler" / "niah_single_1.jsonl"  # evaluate.py reads DATA_DIR/{task}.jsonl
    argv = ["export", "--format", "reference", str(predictions), "--requests", str(requests)]
    assert cli_main([*argv, "--output", str(exported)]) == 0
    inputs, predicts, references, indices, score = reference_ruler_evaluation(exported)
    contexts = {row["context_id"]: row["input_context"] for row in rows if "input_context" in row}
    assert inputs == [contexts[row["context_id"]] + row["input_query"] for row in rows]  # contexts restored
    assert indices == list(range(6)) and references == [row["outputs"] for row in rows]
    assert predicts == [row["outputs"][0] if row["index"] % 3 else "none" for row in rows]
    lines = [json.loads(line) for line in exported.open()]
    keys = {"index", "pred", "input_context", "input_query", "outputs", "others", "truncation", "length"}
    assert all(line.keys() == keys for line in lines)  # what run_star_attn_inference.py writes
    capsys.readouterr()
    assert score_main([str(predictions)]) == 0
    ours = json.loads(capsys.readouterr().out)["tasks"]["niah_single_1"]
    assert score == round(ours, 2) == round(400 / 6, 2)  # the reference rounds to 2 decimals


def test_babilong_export_reads_as_the_reference_gather_reads_it(tokenizer, tmp_path: Path, capsys) -> None:
    facts = {
        "Where is Mary?": ("Mary went to the office. Mary moved to the kitchen.", "kitchen"),
        "Where is John?": ("John went to the garden.", "garden"),
        "Where is the milk?": ("Sandra got the milk. Sandra went to the office.", "office"),
    }
    samples = [{"input": text, "question": question, "target": target} for question, (text, target) in facts.items()]
    data = write(tmp_path / "qa2.jsonl", samples)
    rows = babilong_samples("qa2", tokenizer, data_dir=data, length=1024, num_samples=3)
    answers = {0: "The kitchen.", 1: "The garden or the office.", 2: "office"}
    requests = write(tmp_path / "requests.jsonl", rows)
    predictions = write(tmp_path / "pred.jsonl", predictions_of(rows, lambda row: answers[row["index"]]))
    exported = tmp_path / "1k" / "qa2.jsonl"
    argv = [str(predictions), "--format", "reference", "--requests", str(requests), "--output", str(exported)]
    assert export_main(argv) == 0
    # babilong/gather_results_babilong.py: compare_answers(outputs[0], pred, input_query minus Llama-3's header).
    header = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
    correct = [
        official_compare_answers(
            line["outputs"][0], line["pred"], line["input_query"].replace(header, "").strip(), OFFICIAL_LABELS["qa2"]
        )
        for line in map(json.loads, exported.open())
    ]
    assert correct == [True, False, True]
    capsys.readouterr()
    assert score_main([str(predictions)]) == 0
    assert json.loads(capsys.readouterr().out)["tasks"]["qa2"] == pytest.approx(200 / 3)


def test_export_errors_name_the_problem(tokenizer, tmp_path: Path, capsys) -> None:
    rows = generate_samples("niah_single_1", tokenizer, length=1024, num_samples=2, seed=0, queries_per_context=2)
    requests = write(tmp_path / "requests.jsonl", rows)
    predictions = predictions_of(rows, lambda row: "x")
    out = tmp_path / "out.jsonl"

    def export(prediction_rows: list[dict], request_path: Path = requests, *extra: str) -> str:
        path = write(tmp_path / "pred.jsonl", prediction_rows)
        argv = [str(path), "--format", "reference", "--requests", str(request_path), "--output", str(out), *extra]
        assert export_main(argv) == 2
        return capsys.readouterr().err

    assert "index 99 is not in --requests" in export([*predictions, {**predictions[0], "index": 99}])
    mixed = [*predictions, {**predictions[0], "index": 0, "task": "vt"}]
    assert "holds the tasks niah_single_1, vt" in export(mixed)
    orphan = write(tmp_path / "orphan.jsonl", rows[1:])  # the line defining the context is missing
    assert "'context_id' 'niah_single_1-1024-0' names no context given before" in export(predictions, orphan)
    assert not out.exists()
    # --task picks one task out of a mixed file.
    path = write(tmp_path / "mixed.jsonl", predictions)
    argv = [str(path), "--format", "reference", "--requests", str(requests), "--output", str(out)]
    assert export_main([*argv, "--task", "niah_single_1"]) == 0
    assert len(out.read_text().splitlines()) == 4
