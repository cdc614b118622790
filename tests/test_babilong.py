"""BABILong: data layouts, prompt and context/query split, the generate command, and scoring of its rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from star_lightning.bench import babilong
from star_lightning.bench.generate import main as generate_main
from star_lightning.bench.scoring import main as score_main
from tokenizer_factory import build_tokenizer

# Copied from booydar/babilong babilong/prompts.py (commit 7a6efee): DEFAULT_PROMPTS for qa1-qa5 and the templates.
UPSTREAM_TASK_TEMPLATE = "{instruction}\n\n{examples}\n\n{post_prompt}"
UPSTREAM_USER_TEMPLATE = "<context>\n{context}\n</context>\n\nQuestion: {question}"
UPSTREAM_DEFAULT_TEMPLATE = f"{UPSTREAM_TASK_TEMPLATE}\n\n{UPSTREAM_USER_TEMPLATE}"
UPSTREAM_PROMPTS = {
    "qa1": {
        "instruction": (
            "I will give you context with the facts about positions of different persons hidden in some random text "
            "and a question. You need to answer the question based only on the information from the facts. "
            "If a person was in different locations, use the latest location to answer the question."
        ),
        "examples": (
            "<example>\n"
            "Charlie went to the hallway. Judith come back to the kitchen. Charlie travelled to balcony. "
            "Where is Charlie?\n"
            "Answer: The most recent location of Charlie is balcony.\n"
            "</example>\n\n"
            "<example>\n"
            "Alan moved to the garage. Charlie went to the beach. Alan went to the shop. Rouse "
            "travelled to balcony. Where is Alan?\n"
            "Answer: The most recent location of Alan is shop.\n"
            "</example>"
        ),
        "post_prompt": (
            "Always return your answer in the following format: "
            "The most recent location of ’person’ is ’location’. Do not write anything else after that."
        ),
    },
    "qa2": {
        "instruction": (
            "I give you context with the facts about locations and actions of different persons "
            "hidden in some random text and a question."
            "You need to answer the question based only on the information from the facts.\n"
            "If a person got an item in the first location and travelled to the second location "
            "the item is also in the second location. "
            "If a person dropped an item in the first location and moved to the second location "
            "the item remains in the first location."
        ),
        "examples": (
            "<example>\n"
            "Charlie went to the kitchen. Charlie got a bottle. Charlie moved to the balcony. "
            "Where is the bottle?\n"
            "Answer: The bottle is in the balcony.\n"
            "</example>\n"
            "<example>\n"
            "Alan moved to the garage. Alan got a screw driver. Alan moved to the kitchen. Where "
            "is the screw driver?\n"
            "Answer: The screw driver is in the kitchen.\n"
            "</example>"
        ),
        "post_prompt": (
            "Always return your answer in the following format: The ’item’ is in ’location’. "
            "Do not write anything else after that."
        ),
    },
    "qa3": {
        "instruction": (
            "I give you context with the facts about locations and actions of different persons "
            "hidden in some random text and a question. "
            "You need to answer the question based only on the information from the facts.\n"
            "If a person got an item in the first location and travelled to the second location "
            "the item is also in the second location. "
            "If a person dropped an item in the first location and moved to the second location "
            "the item remains in the first location."
        ),
        "examples": (
            "<example>\n"
            "John journeyed to the bedroom. Mary grabbed the apple. Mary went back to the bathroom. "
            "Daniel journeyed to the bedroom. Daniel moved to the garden. Mary travelled to the kitchen. "
            "Where was the apple before the kitchen?\n"
            "Answer: Before the kitchen the apple was in the bathroom.\n"
            "</example>\n"
            "<example>\n"
            "John went back to the bedroom. John went back to the garden. John went back to the kitchen. "
            "Sandra took the football. Sandra travelled to the garden. Sandra journeyed to the bedroom. "
            "Where was the football before the bedroom?\n"
            "Answer: Before the bedroom the football was in the garden.\n"
            "</example>"
        ),
        "post_prompt": (
            "Always return your answer in the following format: "
            "Before the $location_1$ the $item$ was in the $location_2$. Do not write anything else after that."
        ),
    },
    "qa4": {
        "instruction": (
            "I will give you context with the facts about different people, their location and actions, hidden in "
            "some random text and a question. "
            "You need to answer the question based only on the information from the facts."
        ),
        "examples": (
            "<example>\n"
            "The hallway is south of the kitchen. The bedroom is north of the kitchen. "
            "What is the kitchen south of?\n"
            "Answer: bedroom\n"
            "</example>\n"
            "<example>\n"
            "The garden is west of the bedroom. The bedroom is west of the kitchen. What is west of the bedroom?\n"
            "Answer: garden\n"
            "</example>"
        ),
        "post_prompt": ("Your answer should contain only one word - location. Do not write anything else after that."),
    },
    "qa5": {
        "instruction": (
            "I will give you context with the facts about locations and their relations hidden in some random text "
            "and a question. You need to answer the question based only on the information from the facts."
        ),
        "examples": (
            "<example>\n"
            "Mary picked up the apple there. Mary gave the apple to Fred. Mary moved to the bedroom. "
            "Bill took the milk there. Who did Mary give the apple to?\n"
            "Answer: Fred\n"
            "</example>\n"
            "<example>\n"
            "Jeff took the football there. Jeff passed the football to Fred. Jeff got the milk there. "
            "Bill travelled to the bedroom. Who gave the football?\n"
            "Answer: Jeff\n"
            "</example>\n"
            "<example>\n"
            "Fred picked up the apple there. Fred handed the apple to Bill. Bill journeyed to the bedroom. "
            "Jeff went back to the garden. What did Fred give to Bill?\n"
            "Answer: apple\n"
            "</example>"
        ),
        "post_prompt": (
            "Your answer should contain only one word. Do not write anything else after that. "
            "Do not explain your answer."
        ),
    },
}


def upstream_formatted_input(context: str, question: str, examples: str, instruction: str, post_prompt: str) -> str:
    """What babilong/prompts.py ``get_formatted_input`` returns (the template formatted, the context stripped)."""
    text = UPSTREAM_DEFAULT_TEMPLATE.format(
        instruction=instruction, examples=examples, post_prompt=post_prompt, context=context.strip(), question=question
    )
    return text.strip()


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


def test_prompts_are_the_current_official_text() -> None:
    assert babilong.TASK_TEMPLATE == UPSTREAM_TASK_TEMPLATE
    assert babilong.USER_TEMPLATE == UPSTREAM_USER_TEMPLATE
    assert babilong.DEFAULT_TEMPLATE == UPSTREAM_DEFAULT_TEMPLATE
    assert list(babilong.PROMPTS) == list(UPSTREAM_PROMPTS)
    for task, parts in UPSTREAM_PROMPTS.items():
        ours = babilong.PROMPTS[task]
        assert (ours.instruction, ours.examples, ours.post_prompt) == tuple(parts.values()), task
    # The points where the 2024-05 wording differed.
    assert babilong.PROMPTS["qa1"].post_prompt.endswith("after that.")
    assert "$location_1$" in babilong.PROMPTS["qa3"].post_prompt
    assert "Before the bedroom the football" in babilong.PROMPTS["qa3"].examples


@pytest.mark.parametrize("task", list(UPSTREAM_PROMPTS))
@pytest.mark.parametrize("parts", [(True, True, True), (False, True, True), (True, False, True), (False, False, False)])
def test_prompt_is_get_formatted_input_split_after_the_facts(task: str, parts: tuple[bool, bool, bool]) -> None:
    sample = {
        "input": "  Mary went to the office.\nThe sky was grey. ",
        "question": "Where is Mary? ",
        "target": "office",
    }
    instruction, examples, post_prompt = parts
    prompt = babilong.build_prompt(sample, task, instruction=instruction, examples=examples, post_prompt=post_prompt)
    upstream = UPSTREAM_PROMPTS[task]
    expected = upstream_formatted_input(
        sample["input"],
        sample["question"],
        upstream["examples"] if examples else "",
        upstream["instruction"] if instruction else "",
        upstream["post_prompt"] if post_prompt else "",
    )
    (question,) = prompt.questions
    assert prompt.context + question.query == expected
    assert prompt.context.endswith("<context>\nMary went to the office.\nThe sky was grey.\n</context>")
    assert question.query == "\n\nQuestion: Where is Mary?" and question.outputs == ["office"]


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
    assert rows[0]["input_context"].endswith("</context>")
    assert rows[0]["input_query"] == "\n\nQuestion: Where is Mary?"
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
        (["--data_dir", ".", "--queries_per_context", "2"], "BABILong defines one question per haystack"),
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


def test_scoring_a_line_without_question_names_the_line(tmp_path: Path, capsys) -> None:
    """The reference's prepared files have no 'question': scoring must not treat it as empty (qa3 would change)."""
    lines = [
        {"index": 0, "task": "qa3", "outputs": ["bathroom"], "question": "Where was the apple before the kitchen?"},
        {"index": 1, "task": "qa3", "outputs": ["bathroom"]},
    ]
    path = tmp_path / "pred.jsonl"
    path.write_text("".join(json.dumps(line | {"pred": "kitchen, then bathroom"}) + "\n" for line in lines))
    assert score_main([str(path)]) == 2
    error = capsys.readouterr().err
    assert f"{path}, line 2: no 'question'" in error and "Traceback" not in error
