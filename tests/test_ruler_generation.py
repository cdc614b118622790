"""RULER generators: token budget, answers in the context, context/query split, reproducibility, CLI errors."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from star_lightning.bench.generate import main as generate_main
from star_lightning.bench.generate import parse_tasks
from star_lightning.bench.ruler import TASKS, generate_samples
from star_lightning.bench.ruler.fitting import largest_fitting
from star_lightning.bench.scoring import metric_for
from star_lightning.errors import ConfigurationError
from tokenizer_factory import build_tokenizer

LENGTH = 2048


def write_fake_sources(directory: Path) -> dict[str, Path]:
    """Small stand-ins for Paul Graham's essays, SQuAD and HotpotQA, in their real file layouts."""
    essays = directory / "essays"
    essays.mkdir()
    for number in range(3):
        sentences = [f"Essay {number} paragraph {i} is about startups, taste and hard work." for i in range(60)]
        (essays / f"essay{number}.txt").write_text(" ".join(sentences) + " Why does it matter? It does!")
    squad = {
        "data": [
            {
                "paragraphs": [
                    {
                        "context": f"The harbour town number {i} was founded by Captain{i} long ago.",
                        "qas": [
                            {
                                "question": f"Who founded harbour town number {i}?",
                                "answers": [{"text": f"Captain{i}"}],
                                "is_impossible": False,
                            },
                            {"question": "Unanswerable?", "answers": [], "is_impossible": True},
                        ],
                    }
                    for i in range(120)
                ]
            }
        ]
    }
    (directory / "squad.json").write_text(json.dumps(squad))
    hotpot = [
        {
            "question": f"Which river flows through valley {i}?",
            "answer": f"River{i}",
            "context": [
                [f"Valley {i}", [f"Valley {i} lies in the north. ", f"The River{i} flows through it."]],
                [f"Town {i}", ["A quiet town with a market."]],
            ],
        }
        for i in range(100)
    ]
    (directory / "hotpot.json").write_text(json.dumps(hotpot))
    return {"essays": essays, "qa_1": directory / "squad.json", "qa_2": directory / "hotpot.json"}


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("ruler_sources")
    paths = write_fake_sources(directory)
    build_tokenizer(directory / "tokenizer")
    build_tokenizer(directory / "chat_tokenizer", chat_template=True)
    paths["tokenizer"] = directory / "tokenizer"
    paths["chat_tokenizer"] = directory / "chat_tokenizer"
    return paths


@pytest.fixture(scope="module")
def tokenizers(sources: dict[str, Path]):
    from transformers import AutoTokenizer

    return {
        False: AutoTokenizer.from_pretrained(sources["tokenizer"]),
        True: AutoTokenizer.from_pretrained(sources["chat_tokenizer"]),
    }


def generate(task: str, sources: dict[str, Path], tokenizer, *, chat: bool = False, seed: int = 0, num: int = 2):
    qa_file = sources.get(task)
    return generate_samples(
        task,
        tokenizer,
        length=LENGTH,
        num_samples=num,
        seed=seed,
        chat=chat,
        essays=sources["essays"],
        qa_file=qa_file,
    )


def context_tokens(tokenizer, row: dict) -> list[int]:
    """Tokenized as predict does: the context with the tokenizer's BOS, but one BOS only."""
    context = tokenizer(row["input_context"], add_special_tokens=True)["input_ids"]
    if row["input_context"].startswith(tokenizer.bos_token or "\0") and context[:2] == [tokenizer.bos_token_id] * 2:
        context = context[1:]
    return context


def token_count(tokenizer, row: dict) -> int:
    """Tokenized as predict does: context with BOS (once), query without special tokens."""
    return len(context_tokens(tokenizer, row)) + len(
        tokenizer(row["input_query"], add_special_tokens=False)["input_ids"]
    )


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
@pytest.mark.parametrize("task", list(TASKS))
def test_length_answers_and_split(task: str, chat: bool, sources, tokenizers) -> None:
    tokenizer = tokenizers[chat]
    budget = LENGTH - TASKS[task].tokens_to_generate
    for row in generate(task, sources, tokenizer, chat=chat):
        count = token_count(tokenizer, row)
        assert count == row["num_prompt_tokens"]
        # Within the budget, and close to it: one haystack unit (a document, a UUID needle) is the slack.
        assert budget - max(160, LENGTH // 12) <= count <= budget, (task, count, budget)
        assert row["task"] == task and row["length"] == LENGTH
        assert isinstance(row["outputs"], list) and row["outputs"]
        for answer in row["outputs"]:
            assert answer in row["input_context"], (task, answer)
            assert answer not in row["input_query"] or task.startswith("vt"), (task, answer)
        assert row["input_query"].endswith(row["answer_prefix"])
        if chat:
            # The template's own BOS stays in the text (RULER and Star-Attention feed the rendered prompt as it is);
            # predict gives it no second one.
            assert row["input_context"].startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>")
            assert context_tokens(tokenizer, row).count(tokenizer.bos_token_id) == 1
            assert "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n" in row["input_query"]
        else:
            assert "<|" not in row["input_context"] + row["input_query"]


def test_niah_single_needle_and_question(sources, tokenizers) -> None:
    (row,) = generate("niah_single_1", sources, tokenizers[False], num=1)
    value = row["outputs"][0]
    match = re.search(rf"One of the special magic numbers for ([^\n]+) is: {value}\.", row["input_context"])
    assert match is not None
    assert f"special magic number for {match.group(1)} mentioned" in row["input_query"]
    assert row["input_context"].startswith("A special magic number is hidden within the following text.")
    assert "The grass is green. The sky is blue." in row["input_context"]


def test_niah_multi_variants(sources, tokenizers) -> None:
    multikey = generate("niah_multikey_1", sources, tokenizers[False], num=1)[0]
    assert len(re.findall(r"One of the special magic numbers for ", multikey["input_context"])) == 4
    multivalue = generate("niah_multivalue", sources, tokenizers[False], num=1)[0]
    assert len(multivalue["outputs"]) == 4
    key = re.search(r"special magic numbers for (.+?) mentioned in", multivalue["input_query"]).group(1)
    for value in multivalue["outputs"]:
        assert f"One of the special magic numbers for {key} is: {value}." in multivalue["input_context"]
    multiquery = generate("niah_multiquery", sources, tokenizers[False], num=1)[0]
    assert len(multiquery["outputs"]) == 4 and ", and " in multiquery["input_query"]
    uuids = generate("niah_multikey_3", sources, tokenizers[False], num=1)[0]
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", uuids["outputs"][0])
    assert uuids["input_context"].count("One of the special magic uuids for ") > 10  # haystack of needles


def test_variable_tracking_chain_resolves(sources, tokenizers) -> None:
    (row,) = generate("vt", sources, tokenizers[False], num=1)
    value = re.search(r"assigned the value (\d+) in the text above", row["input_query"]).group(1)
    haystack = row["input_context"].split("Memorize and track")[-1]  # skip the solved example
    assignments = dict(re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)", haystack))

    def resolve(name: str) -> str:
        target = assignments[name]
        return resolve(target[4:]) if target.startswith("VAR ") else target

    assert sorted(name for name in assignments if resolve(name) == value) == sorted(row["outputs"])
    assert len(row["outputs"]) == 5


def test_common_words_are_most_common(sources, tokenizers) -> None:
    (row,) = generate("cwe", sources, tokenizers[False], num=1)
    listing = row["input_context"].split("Memorize the ones that appear most often.\n")[-1]
    counts = Counter(re.split(r" ?\d+\. ", listing)[1:])  # wonderwords entries may hold spaces ("dune buggy")
    top = {word for word, _ in counts.most_common(10)}
    assert top == set(row["outputs"])
    assert min(counts[word] for word in row["outputs"]) > max(c for w, c in counts.items() if w not in top)


def test_frequent_words_are_most_frequent(sources, tokenizers) -> None:
    (row,) = generate("fwe", sources, tokenizers[False], num=1)
    text = row["input_context"].split("Find the three most frequently appeared coded words. ")[-1]
    counts = Counter(word for word in text.split() if word != "...")
    assert [word for word, _ in counts.most_common(3)] == row["outputs"]


def test_qa_gold_document_and_question(sources, tokenizers) -> None:
    (row,) = generate("qa_1", sources, tokenizers[False], num=1)
    captain = row["outputs"][0]
    number = captain.removeprefix("Captain")
    assert f"Question: Who founded harbour town number {number}?" in row["input_query"]
    assert row["input_context"].count("Document ") > 5
    (row,) = generate("qa_2", sources, tokenizers[False], num=1)
    assert f"The {row['outputs'][0]} flows through it." in row["input_context"]


def test_too_small_length_is_a_clear_error(sources, tokenizers) -> None:
    with pytest.raises(ConfigurationError, match="--length"):
        generate_samples("cwe", tokenizers[False], length=300, num_samples=1, seed=0)


@pytest.mark.parametrize("hint", [1, 7, 1234, 1235, 5000, 10**7])
@pytest.mark.parametrize("overhead", [0, 50, 3000])
def test_largest_fitting_finds_the_boundary(hint: int, overhead: int) -> None:
    calls: list[int] = []

    def measure(size: int) -> int:  # tokens: fixed prompt + ~3.3 per unit, with a little jitter
        calls.append(size)
        return overhead + (10 * size) // 3 + size % 3

    budget = 5000 + overhead
    expected = max(size for size in range(1, 2000) if measure(size) <= budget)
    calls.clear()
    assert largest_fitting(measure, budget, hint=hint) == expected
    assert len(calls) <= 12, calls


def test_largest_fitting_bisects_when_not_linear() -> None:
    assert largest_fitting(lambda size: size**2, 10**6, hint=3) == 1000
    assert largest_fitting(lambda size: 10 if size < 77 else 10**9, 100, hint=1) == 76
    with pytest.raises(ConfigurationError, match="too small"):
        largest_fitting(lambda size: 200 + size, 100)


def run_cli(sources: dict[str, Path], output: Path, *extra: str) -> int:
    return generate_main(
        [
            "--benchmark", "ruler", "--tokenizer", str(sources["tokenizer"]), "--length", "1024",
            "--num_samples", "3", "--output", str(output), "--essays", str(sources["essays"]), *extra,
        ]
    )  # fmt: skip


@pytest.mark.parametrize("task", ["niah_multikey_2", "niah_single_2", "vt", "fwe", "qa_2"])
def test_cli_seeded_reproducibility(task: str, sources, tmp_path: Path) -> None:
    first, second, other = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    extra = ["--task", task, "--length", "2048", "--qa_file", str(sources["qa_2"])]
    assert run_cli(sources, first, *extra, "--seed", "3") == 0
    assert run_cli(sources, second, *extra, "--seed", "3") == 0
    assert run_cli(sources, other, *extra, "--seed", "4") == 0
    assert first.read_bytes() == second.read_bytes()
    assert first.read_bytes() != other.read_bytes()
    rows = [json.loads(line) for line in first.read_text().splitlines()]
    assert [row["index"] for row in rows] == [0, 1, 2]
    assert len({row["input_context"] for row in rows}) == 3  # samples differ from each other
    assert {"index", "input_context", "input_query", "outputs", "task", "length"} <= rows[0].keys()


def test_cli_several_tasks_in_one_file_are_numbered_in_order(sources, tmp_path: Path) -> None:
    single, several = tmp_path / "vt.jsonl", tmp_path / "several.jsonl"
    assert run_cli(sources, single, "--task", "vt") == 0
    assert run_cli(sources, several, "--task", "niah_single_1,vt") == 0
    rows = [json.loads(line) for line in several.read_text().splitlines()]
    assert [row["index"] for row in rows] == list(range(6))
    assert [row["task"] for row in rows] == ["niah_single_1"] * 3 + ["vt"] * 3
    # Each task's requests are those a file of that task alone holds, renumbered.
    alone = [json.loads(line) for line in single.read_text().splitlines()]
    assert [{**row, "index": 0} for row in rows[3:]] == [{**row, "index": 0} for row in alone]


def test_cli_both_qa_tasks_in_one_file_take_their_own_documents(sources, tmp_path: Path) -> None:
    both = tmp_path / "qa.jsonl"
    extra = ["--squad", str(sources["qa_1"]), "--hotpotqa", str(sources["qa_2"])]
    assert run_cli(sources, both, "--task", "qa_1,qa_2", *extra) == 0
    for task in ("qa_1", "qa_2"):
        alone = tmp_path / f"{task}.jsonl"
        assert run_cli(sources, alone, "--task", task, "--qa_file", str(sources[task])) == 0
        expected = [json.loads(line)["input_context"] for line in alone.read_text().splitlines()]
        rows = [json.loads(line) for line in both.read_text().splitlines()]
        assert [row["input_context"] for row in rows if row["task"] == task] == expected


def test_cli_help(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        generate_main(["--help"])
    assert exit_info.value.code == 0
    assert "--benchmark" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--task", "niah_single_2", "--essays", "/nonexistent/essays"], "--essays /nonexistent/essays"),
        (["--task", "qa_1"], "--qa_file"),
        (["--task", "qa_2", "--qa_file", "/nonexistent.json"], "--qa_file /nonexistent.json"),
        (["--task", "niah_single_9"], "--task niah_single_9"),
        (["--task", "vt,nope"], "nope is not a ruler task"),
        (["--task", "vt,vt"], "a task is listed twice"),
        (["--task", "vt", "--chat_template", "on"], "--chat_template"),
    ],
)
def test_cli_errors_are_clear(arguments: list[str], message: str, sources, tmp_path: Path, capsys) -> None:
    base = ["--benchmark", "ruler", "--tokenizer", str(sources["tokenizer"]), "--length", "1024"]
    assert generate_main([*base, "--output", str(tmp_path / "out.jsonl"), *arguments]) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
    assert not (tmp_path / "out.jsonl").exists()


def test_cli_missing_tokenizer_and_bad_option(tmp_path: Path, capsys) -> None:
    code = generate_main(
        ["--benchmark", "ruler", "--task", "vt", "--tokenizer", str(tmp_path / "missing"), "--length", "1024",
         "--output", str(tmp_path / "o.jsonl")]
    )  # fmt: skip
    assert code == 2 and "--tokenizer" in capsys.readouterr().err
    assert generate_main(["--benchmark", "ruler", "--bogus"]) == 2  # one line, no usage block
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("star-lightning generate: error: "), lines


def test_qa_repeats_the_documents_when_all_fit(sources, tokenizers) -> None:
    """RULER's qa.py: once the size reaches the file's document count, all documents, repeated to fill the length."""
    with pytest.warns(UserWarning, match="all 120 documents"):
        (row,) = generate_samples(
            "qa_1", tokenizers[False], length=16384, num_samples=1, seed=0, qa_file=sources["qa_1"]
        )
    documents = Counter(re.findall(r"Document \d+:\n(.*)", row["input_context"]))
    assert len(documents) == 120 and sum(documents.values()) > 240
    assert max(documents.values()) - min(documents.values()) <= 1  # whole rounds of the file, then a part of one


def test_generate_and_score_read_the_task_definitions() -> None:
    """One registry: ``generate --task all`` yields RULER's tasks in order, and ``score`` uses each task's metric."""
    assert parse_tasks("ruler", "all") == list(TASKS) and len(TASKS) == 13
    assert all(metric_for(task) == spec.metric for task, spec in TASKS.items())
    assert parse_tasks("babilong", "all") == ["qa1", "qa2", "qa3", "qa4", "qa5"]
    assert {metric_for(task) for task in parse_tasks("babilong", "all")} == {"babilong"}
