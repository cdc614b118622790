"""BABILong qa1-qa5 (Kuratov et al., 2024): read the published samples, build prompts, split context/query.

The samples come from the user's copy of the dataset (``--data_dir``): JSON or JSONL rows with ``input`` (the
long text with the facts hidden in it), ``question`` and ``target``. Accepted layouts: the file itself,
``DIR/{task}.jsonl`` (or ``.json``), or ``DIR/{split}/{task}.jsonl`` where ``split`` is BABILong's length name
(``4k`` for ``--length 4096``; ``0k`` below 1024).
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass
from typing import Any

from star_lightning.bench.babilong_labels import BABILONG_LABELS
from star_lightning.bench.ruler.prompts import Prompt, Question, count_tokens, render
from star_lightning.errors import ConfigurationError

TASKS = tuple(BABILONG_LABELS)
MAX_NEW_TOKENS = 20  # BABILong's evaluation generates at most 20 tokens


@dataclass(frozen=True)
class TaskPrompt:
    """BABILong's default prompt parts for one task."""

    instruction: str
    examples: str
    post_prompt: str


# Verbatim from booydar/babilong babilong/prompts.py (TASK_TEMPLATE, USER_TEMPLATE, DEFAULT_TEMPLATE, DEFAULT_PROMPTS),
# the current version: it is the benchmark.
TASK_TEMPLATE = "{instruction}\n\n{examples}\n\n{post_prompt}"
USER_TEMPLATE = "<context>\n{context}\n</context>\n\nQuestion: {question}"
DEFAULT_TEMPLATE = f"{TASK_TEMPLATE}\n\n{USER_TEMPLATE}"

PROMPTS: dict[str, TaskPrompt] = {
    "qa1": TaskPrompt(
        instruction=(
            "I will give you context with the facts about positions of different persons hidden in some random text "
            "and a question. You need to answer the question based only on the information from the facts. "
            "If a person was in different locations, use the latest location to answer the question."
        ),
        examples=(
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
        post_prompt=(
            "Always return your answer in the following format: "
            "The most recent location of ’person’ is ’location’. Do not write anything else after that."
        ),
    ),
    "qa2": TaskPrompt(
        instruction=(
            "I give you context with the facts about locations and actions of different persons "
            "hidden in some random text and a question."
            "You need to answer the question based only on the information from the facts.\n"
            "If a person got an item in the first location and travelled to the second location "
            "the item is also in the second location. "
            "If a person dropped an item in the first location and moved to the second location "
            "the item remains in the first location."
        ),
        examples=(
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
        post_prompt=(
            "Always return your answer in the following format: The ’item’ is in ’location’. "
            "Do not write anything else after that."
        ),
    ),
    "qa3": TaskPrompt(
        instruction=(
            "I give you context with the facts about locations and actions of different persons "
            "hidden in some random text and a question. "
            "You need to answer the question based only on the information from the facts.\n"
            "If a person got an item in the first location and travelled to the second location "
            "the item is also in the second location. "
            "If a person dropped an item in the first location and moved to the second location "
            "the item remains in the first location."
        ),
        examples=(
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
        post_prompt=(
            "Always return your answer in the following format: "
            "Before the $location_1$ the $item$ was in the $location_2$. Do not write anything else after that."
        ),
    ),
    "qa4": TaskPrompt(
        instruction=(
            "I will give you context with the facts about different people, their location and actions, hidden in "
            "some random text and a question. "
            "You need to answer the question based only on the information from the facts."
        ),
        examples=(
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
        post_prompt=("Your answer should contain only one word - location. Do not write anything else after that."),
    ),
    "qa5": TaskPrompt(
        instruction=(
            "I will give you context with the facts about locations and their relations hidden in some random text "
            "and a question. You need to answer the question based only on the information from the facts."
        ),
        examples=(
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
        post_prompt=(
            "Your answer should contain only one word. Do not write anything else after that. "
            "Do not explain your answer."
        ),
    ),
}


def split_name(length: int) -> str:
    """BABILong's name for a length split: ``4k`` for 4096 tokens, ``0k`` for the short, fact-only split."""
    return f"{length // 1024}k"


def find_data_file(data_dir: str | pathlib.Path | None, task: str, length: int) -> pathlib.Path:
    """Locate the task's file under ``--data_dir`` (see the module docstring for the layouts)."""
    if data_dir is None:
        raise ConfigurationError("BABILong needs its data: pass --data_dir PATH (a JSON/JSONL file or a folder).")
    root = pathlib.Path(data_dir)
    if root.is_file():
        return root
    if not root.is_dir():
        raise ConfigurationError(f"--data_dir {root}: no such file or folder.")
    candidates = [root / split_name(length) / f"{task}{suffix}" for suffix in (".jsonl", ".json")]
    candidates += [root / f"{task}{suffix}" for suffix in (".jsonl", ".json")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(candidate) for candidate in candidates)
    raise ConfigurationError(f"--data_dir {root}: no data for {task} at --length {length}; looked for {tried}.")


def load_samples(path: pathlib.Path, task: str) -> list[dict[str, str]]:
    """Rows of ``input``/``question``/``target`` from a JSONL file, a JSON list, or a JSON object keyed by task."""
    text = path.read_text(encoding="utf-8")
    rows: Any
    if path.suffix == ".jsonl":
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise ConfigurationError(f"{path}: not valid JSONL ({error.msg}).") from error
    else:
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigurationError(f"{path}: not valid JSON ({error.msg}).") from error
        if isinstance(rows, dict):
            if task not in rows:
                raise ConfigurationError(f"{path}: the JSON object has no key {task!r}.")
            rows = rows[task]
    if not isinstance(rows, list) or not rows:
        raise ConfigurationError(f"{path}: expected a non-empty list of samples.")
    for number, row in enumerate(rows):
        missing = [key for key in ("input", "question", "target") if not isinstance(row, dict) or key not in row]
        if missing:
            raise ConfigurationError(f"{path}: sample {number} lacks the field(s) {', '.join(missing)}.")
    return rows


def build_prompt(
    sample: dict[str, str], task: str, *, instruction: bool = True, examples: bool = True, post_prompt: bool = True
) -> Prompt:
    """BABILong's ``get_formatted_input`` (DEFAULT_TEMPLATE, stripped), cut after ``</context>``.

    Parts left out are empty strings, as BABILong's evaluation script passes them; the context half is the
    instruction, examples, post prompt and facts, the query half ``\n\nQuestion: ...``.
    """
    parts = PROMPTS[task]
    cut = USER_TEMPLATE.index("</context>") + len("</context>")
    user_context, user_query = USER_TEMPLATE[:cut], USER_TEMPLATE[cut:]
    head = TASK_TEMPLATE.format(
        instruction=parts.instruction if instruction else "",
        examples=parts.examples if examples else "",
        post_prompt=parts.post_prompt if post_prompt else "",
    )
    context = f"{head}\n\n{user_context.format(context=sample['input'].strip())}".lstrip()
    query = user_query.format(question=sample["question"]).rstrip()
    return Prompt(context=context, questions=[Question(query, "", [sample["target"]])])


def check_queries_per_context(queries: int) -> None:
    """BABILong asks one question per haystack: each bAbI question becomes its own sample, with the facts before it
    mixed into background text drawn for that sample alone (babilong_utils.py), so no two samples share one."""
    if queries != 1:
        raise ConfigurationError(
            f"--queries_per_context {queries}: BABILong defines one question per haystack (each sample has its own "
            "facts and background text), so there are no shared contexts to ask several questions about. "
            "Generate BABILong with --queries_per_context 1."
        )


def generate_samples(
    task: str,
    tokenizer: Any,
    *,
    data_dir: str | pathlib.Path | None,
    length: int,
    num_samples: int,
    chat: bool = False,
    instruction: bool = True,
    examples: bool = True,
    post_prompt: bool = True,
    queries_per_context: int = 1,
) -> list[dict[str, Any]]:
    """The first ``num_samples`` samples of the task's split (BABILong's data is fixed; no sampling)."""
    if task not in PROMPTS:
        raise ConfigurationError(f"Unknown BABILong task {task!r}. Choose one of: {', '.join(PROMPTS)}.")
    check_queries_per_context(queries_per_context)
    samples = load_samples(find_data_file(data_dir, task, length), task)[:num_samples]
    rows = []
    for index, sample in enumerate(samples):
        prompt = build_prompt(sample, task, instruction=instruction, examples=examples, post_prompt=post_prompt)
        context, (query,) = render(prompt, tokenizer, chat=chat)
        count = count_tokens(tokenizer, context, special=True) + count_tokens(tokenizer, query, special=False)
        rows.append(
            {
                "index": index,
                "input_context": context,
                "input_query": query,
                "outputs": prompt.questions[0].outputs,
                "question": sample["question"],
                "task": task,
                "length": length,
                "max_new_tokens": MAX_NEW_TOKENS,
                "num_prompt_tokens": count,
            }
        )
    return rows
