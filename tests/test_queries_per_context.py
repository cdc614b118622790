"""``generate --queries_per_context K``: K questions about one generated context, each with its own references."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from star_lightning.bench.generate import main as generate_main
from star_lightning.bench.results import main as table_main
from star_lightning.bench.ruler import TASKS, generate_samples
from star_lightning.bench.scoring import main as score_main
from star_lightning.data.jsonl import prediction_record
from star_lightning.errors import ConfigurationError
from test_ruler_generation import write_fake_sources
from tokenizer_factory import build_tokenizer

LENGTH = 2048


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("queries_sources")
    paths = write_fake_sources(directory)
    build_tokenizer(directory / "tokenizer")
    paths["tokenizer"] = directory / "tokenizer"
    return paths


@pytest.fixture(scope="module")
def tokenizer(sources: dict[str, Path]):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(sources["tokenizer"])


def contexts_of(rows: list[dict], queries: int) -> list[list[dict]]:
    """Rows grouped by context, checking the binding layout: K lines, one context_id, input_context on the first."""
    assert len(rows) % queries == 0
    groups = [rows[start : start + queries] for start in range(0, len(rows), queries)]
    assert len({group[0]["context_id"] for group in groups}) == len(groups)  # unique per context
    for group in groups:
        assert {row["context_id"] for row in group} == {group[0]["context_id"]}
        assert "input_context" in group[0] and all("input_context" not in row for row in group[1:])
        assert all({"input_query", "outputs", "task", "length", "index"} <= row.keys() for row in group)
    return groups


def tokens(tokenizer, text: str, special: bool) -> int:
    return len(tokenizer(text, add_special_tokens=special)["input_ids"])


@pytest.mark.parametrize(
    ("task", "queries"),
    [("niah_single_1", 3), ("niah_multikey_1", 4), ("niah_multikey_2", 3), ("niah_multivalue", 2),
     ("niah_multiquery", 2), ("niah_single_3", 5)],
)  # fmt: skip
def test_niah_questions_about_one_haystack(task: str, queries: int, sources, tokenizer) -> None:
    rows = generate_samples(task, tokenizer, length=LENGTH, num_samples=2, seed=0, essays=sources["essays"],
                            queries_per_context=queries)  # fmt: skip
    config = TASKS[task].niah
    budget = LENGTH - TASKS[task].tokens_to_generate
    for number, group in enumerate(contexts_of(rows, queries)):
        assert group[0]["context_id"] == f"{task}-{LENGTH}-{number}"
        context = group[0]["input_context"]
        asked: list[str] = []
        context_tokens = tokens(tokenizer, context, True)
        needles = re.findall(r"One of the special magic \w+ for ([^:]+?) is: ([\w-]+)\.", context)
        if config.haystack != "needle":  # (a needle haystack is made of distractor needles)
            assert len(needles) == config.total_keys(queries) * config.num_values
        for row in group:
            assert len(row["outputs"]) == config.num_queries * config.num_values
            keys = []
            for value in row["outputs"]:  # every reference sits in a needle of a key this question asks about
                (key,) = [key for key, needle_value in needles if needle_value == value]
                assert f"{key} mentioned" in row["input_query"] or f"{key}," in row["input_query"]
                keys.append(key)
            asked += sorted(set(keys))
            assert row["num_prompt_tokens"] == context_tokens + tokens(tokenizer, row["input_query"], False)
        assert len(asked) == len(set(asked)) == queries * config.num_queries  # each question its own keys
        longest = max(row["num_prompt_tokens"] for row in group)
        assert budget - 200 <= longest <= budget  # the context fits with the longest query


def test_qa_questions_over_the_same_documents(sources, tokenizer) -> None:
    rows = generate_samples("qa_2", tokenizer, length=LENGTH, num_samples=2, seed=0, qa_file=sources["qa_2"],
                            queries_per_context=3)  # fmt: skip
    groups = contexts_of(rows, 3)
    questions = [re.search(r"Question: (.+?) Answer:", row["input_query"]).group(1) for row in rows]
    assert questions == [f"Which river flows through valley {i}?" for i in range(6)]  # file order
    for group in groups:
        for row in group:
            assert f"The {row['outputs'][0]} flows through it." in group[0]["input_context"]


def test_one_query_per_context_keeps_todays_layout(sources, tmp_path: Path) -> None:
    base = ["--benchmark", "ruler", "--task", "niah_single_1,vt", "--tokenizer", str(sources["tokenizer"])]
    base += ["--length", "1024", "--num_samples", "2"]
    plain, explicit = tmp_path / "plain.jsonl", tmp_path / "k1.jsonl"
    assert generate_main([*base, "--output", str(plain)]) == 0
    assert generate_main([*base, "--output", str(explicit), "--queries_per_context", "1"]) == 0
    assert plain.read_bytes() == explicit.read_bytes()
    rows = [json.loads(line) for line in plain.read_text().splitlines()]
    assert all("input_context" in row and "context_id" not in row for row in rows)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--task", "vt", "--queries_per_context", "2"], "RULER's vt asks one question per context"),
        (["--task", "niah_single_1,cwe", "--queries_per_context", "2"], "RULER's cwe asks one question"),
        (["--task", "niah_multivalue", "--queries_per_context", "11"], "Use --queries_per_context 10 or less"),
        (["--task", "qa_1", "--num_samples", "50", "--queries_per_context", "3"], "holds 120 answerable questions"),
        (["--task", "niah_single_1", "--queries_per_context", "0"], "must be positive"),
    ],
)
def test_bad_requests_are_clear_errors(arguments: list[str], message: str, sources, tmp_path: Path, capsys) -> None:
    base = ["--benchmark", "ruler", "--tokenizer", str(sources["tokenizer"]), "--length", "2048"]
    base += ["--essays", str(sources["essays"]), "--qa_file", str(sources["qa_1"]), "--output", str(tmp_path / "o")]
    assert generate_main([*base, *arguments]) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
    assert not (tmp_path / "o").exists()


def test_several_queries_through_the_cli_then_score_and_table_per_line(sources, tmp_path: Path, capsys) -> None:
    requests = tmp_path / "requests.jsonl"
    argv = ["--benchmark", "ruler", "--task", "niah_multikey_1,qa_1", "--tokenizer", str(sources["tokenizer"])]
    argv += ["--length", "2048", "--num_samples", "2", "--queries_per_context", "3", "--essays", str(sources["essays"])]
    assert generate_main([*argv, "--squad", str(sources["qa_1"]), "--output", str(requests)]) == 0
    assert "12 ruler niah_multikey_1,qa_1 requests (4 contexts x 3 queries)" in capsys.readouterr().out
    rows = [json.loads(line) for line in requests.read_text().splitlines()]
    assert [row["index"] for row in rows] == list(range(12))
    contexts_of(rows, 3)
    # Predictions as predict writes them (inputs dropped); every other answer right.
    predictions = tmp_path / "star" / "pred.jsonl"
    predictions.parent.mkdir()
    records = [prediction_record(row, row["outputs"][0] if row["index"] % 2 == 0 else "no idea") for row in rows]
    predictions.write_text("".join(json.dumps(record) + "\n" for record in records))
    assert score_main([str(predictions)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["counts"] == {"niah_multikey_1": 6, "qa_1": 6}
    assert summary["tasks"] == {"niah_multikey_1": 50.0, "qa_1": 50.0}
    out = tmp_path / "table"
    assert table_main(["--dir", str(tmp_path), "--out", str(out)]) == 0
    table = json.loads(out.with_suffix(".json").read_text())
    assert {(row["task"], row["star"]) for row in table["rows"]} == {("niah_multikey_1", 50.0), ("qa_1", 50.0)}


def test_queries_per_context_below_one_is_refused(tokenizer) -> None:
    with pytest.raises(ConfigurationError, match="--queries_per_context 0"):
        generate_samples("niah_single_1", tokenizer, length=LENGTH, num_samples=1, seed=0, queries_per_context=0)


def test_chat_template_renders_one_context_for_all_questions(sources, tmp_path: Path) -> None:
    chat = build_tokenizer(tmp_path / "chat", chat_template=True)
    rows = generate_samples("qa_1", chat, length=LENGTH, num_samples=1, seed=0, chat=True, qa_file=sources["qa_1"],
                            queries_per_context=3)  # fmt: skip
    (group,) = contexts_of(rows, 3)
    assert group[0]["input_context"].startswith(
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nAnswer the question"
    )
    for number, row in enumerate(group):
        assert row["input_query"].endswith(
            f"number {number}?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n Answer:"
        )
