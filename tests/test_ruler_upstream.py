"""RULER as NVIDIA/RULER's generators define it: template text, vt layout and example, qa order, wonderwords words."""

from __future__ import annotations

import itertools
import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from star_lightning.bench.ruler import generate_samples, prompts, qa, variable_tracking, word_extraction, words
from tokenizer_factory import build_tokenizer

# Copied from NVIDIA/RULER scripts/data/synthetic/constants.py (commit c3f5e3b): TASKS[task]['template'] and
# ['answer_prefix'], the text every RULER prompt is made of.
UPSTREAM_TEMPLATES = {
    "niah": (
        """Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic {type_needle_v} for {query} mentioned in the provided text?""",  # noqa: E501
        """ The special magic {type_needle_v} for {query} mentioned in the provided text are""",
    ),
    "variable_tracking": (
        """Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\nQuestion: Find all variables that are assigned the value {query} in the text above.""",  # noqa: E501
        """ Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assigned the value {query}, they are: """,  # noqa: E501
    ),
    "common_words_extraction": (
        """Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?""",  # noqa: E501
        """ Answer: The top 10 words that appear most often in the list are:""",
    ),
    "freq_words_extraction": (
        """Read the following coded text and track the frequency of each coded word. Find the three most frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most frequently appeared words in the above coded text?""",  # noqa: E501
        """ Answer: According to the coded text above, the three most frequently appeared words are:""",
    ),
    "qa": (
        """Answer the question based on the given documents. Only give me the answer and do not output any other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}""",  # noqa: E501
        """ Answer:""",
    ),
}
OURS = {
    "niah": prompts.NIAH,
    "variable_tracking": prompts.VARIABLE_TRACKING,
    "common_words_extraction": prompts.COMMON_WORDS_EXTRACTION,
    "freq_words_extraction": prompts.FREQ_WORDS_EXTRACTION,
    "qa": prompts.QA,
}
# niah.py's single-answer wording, written out by hand from the template above.
NIAH_SINGULAR = (
    "A special magic number is hidden within the following text. Make sure to memorize it. I will quiz you about the "
    "number afterwards.\n{context}\nWhat is the special magic number for {query} mentioned in the provided text? The "
    "special magic number for {query} mentioned in the provided text is"
)
LENGTH = 2048


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return build_tokenizer(tmp_path_factory.mktemp("ruler_upstream_tokenizer"))


@pytest.mark.parametrize("name", list(UPSTREAM_TEMPLATES))
def test_templates_are_ruler_text(name: str) -> None:
    template, answer_prefix = UPSTREAM_TEMPLATES[name]
    assert (OURS[name].template, OURS[name].answer_prefix) == (template, answer_prefix)
    values = {"type_needle_v": "numbers", "query": "Q?", "num_v": 5}
    context, question = prompts.fill(OURS[name], "HAY\nSTACK", **values)
    # The context/query halves joined are RULER's prompt: template + answer prefix, formatted.
    assert context + question.query + question.answer_prefix == (template + answer_prefix).format(
        context="HAY\nSTACK", **values
    )
    assert context.endswith("HAY\nSTACK")


def test_niah_prompt_is_rulers_singular_wording(tokenizer) -> None:
    (row,) = generate_samples("niah_single_1", tokenizer, length=LENGTH, num_samples=1, seed=0)
    key = re.search(r"for (.+?) mentioned", row["input_query"]).group(1)
    haystack = row["input_context"].split("afterwards.\n", 1)[1]
    assert row["input_context"] + row["input_query"] == NIAH_SINGULAR.format(context=haystack, query=key)
    lines = haystack.split("\n")
    assert lines.count(prompts.NOISE) == len(lines) - 1
    assert lines.count(prompts.NEEDLE.format(type_needle_v="numbers", key=key, value=row["outputs"][0])) == 1


def _vt_parts(row: dict) -> tuple[str, list[str]]:
    """The solved example and the sample's haystack lines."""
    example, sample = row["input_context"].split("\n\nMemorize and track", 1)
    return example, sample.split("hidden in the following text.\n\n", 1)[1].split("\n")


def test_vt_lines_are_newline_separated_at_distinct_positions(tokenizer) -> None:
    rows = generate_samples("vt", tokenizer, length=LENGTH, num_samples=6, seed=1)
    for row in rows:
        assert "variables are assigned the value" in row["input_query"] and "assgined" not in row["input_query"]
        _, lines = _vt_parts(row)
        chain = [number for number, line in enumerate(lines) if line.startswith("VAR ")]
        assert len(chain) == 5 and all(line == prompts.NOISE for n, line in enumerate(lines) if n not in chain)
        # Distinct insertion positions (random.sample): a noise line between any two chain statements.
        assert all(b - a >= 2 for a, b in itertools.pairwise(chain)), chain
        names = [re.match(r"VAR (\w+) =", lines[n]).group(1) for n in chain]
        assert names == row["outputs"]  # in chain order, first the value's variable


def test_vt_example_is_a_500_token_vt_sample_renamed_per_sample(tokenizer) -> None:
    rows = generate_samples("vt", tokenizer, length=LENGTH, num_samples=3, seed=2)
    examples = [_vt_parts(row)[0] for row in rows]
    for example in examples:
        assert example.startswith(
            "Memorize and track the chain(s) of variable assignment hidden in the following text."
        )
        names = re.findall(r"^VAR ([A-Z]{3}) =", example, flags=re.MULTILINE)
        value = re.search(r"^VAR [A-Z]{3} = (\d{5})$", example, flags=re.MULTILINE).group(1)
        assert len(set(names)) == 5 and value != "12345"
        assert example.endswith(f"5 variables are assigned the value {value}, they are:  " + " ".join(names))
    # One example structure per file (same noise lines), renamed for every sample.
    shapes = {re.sub(r"[A-Z]{3}|\d{5}", "#", example) for example in examples}
    assert len(shapes) == 1 and len(set(examples)) == 3
    # Sized as RULER sizes it: the largest example within 500 tokens (no special tokens).
    text = examples[0].rsplit(" ", 5)[0].removesuffix(" ")  # the example's prompt, without its solution
    count = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    noise = len(tokenizer("\n" + prompts.NOISE, add_special_tokens=False)["input_ids"])
    assert 500 - noise < count <= variable_tracking.EXAMPLE_TOKENS


def test_fwe_has_no_example_and_rulers_vocabulary_size(tokenizer) -> None:
    (row,) = generate_samples("fwe", tokenizer, length=LENGTH, num_samples=1, seed=0)
    assert row["input_context"].startswith("Read the following coded text")
    assert row["input_context"].count("Read the following coded text") == 1 and "Answer:" not in row["input_context"]
    assert word_extraction.fwe_vocabulary_size(4096, 50) == 80
    assert word_extraction.fwe_vocabulary_size(131072, 50) == 2620
    prompt = word_extraction.build_fwe(20_000, seed=0, vocab_size=80)
    coded = Counter(prompt.context.split("coded words. ", 1)[1].split(" "))
    assert len(set(coded) - {"..."}) == 79 and all(len(word) == 6 for word in coded if word != "...")


def test_wonderwords_lists_are_rulers() -> None:
    from wonderwords import random_word

    nouns, adjs, verbs = (
        random_word._get_words_from_text_file(f"{kind}list.txt") for kind in ("noun", "adjective", "verb")
    )
    assert words.common_words() == tuple(sorted(set(nouns + adjs + verbs)))
    assert len(words.common_words()) == 8166  # wonderwords 3.0.1
    # Drawing adjective and noun independently is uniform over RULER's set of "adj-noun" strings only if no two
    # pairs spell the same string; with hyphenated entries that needs adj2 = adj1-x and noun1 = x-noun2.
    noun_set = set(nouns)
    for adj1 in set(adjs):
        for adj2 in set(adjs):
            if adj2.startswith(adj1 + "-"):
                middle = adj2[len(adj1) + 1 :]
                assert not any(noun.startswith(middle + "-") and noun[len(middle) + 1 :] in noun_set for noun in nouns)


def test_needle_keys_and_cwe_words_come_from_wonderwords(tokenizer) -> None:
    adjs, nouns = set(words.adjectives()), set(words.nouns())
    rng = random.Random(0)
    for _ in range(200):
        key = words.needle_key(rng)
        assert any(key[:i] in adjs and key[i + 1 :] in nouns for i, char in enumerate(key) if char == "-"), key
    (row,) = generate_samples("cwe", tokenizer, length=LENGTH, num_samples=1, seed=0)
    listed = re.split(r" ?\d+\. ", row["input_context"].split("Memorize the ones that appear most often.\n")[-1])[1:]
    assert set(listed) <= set(words.common_words()) and set(row["outputs"]) <= set(listed)


def test_cwe_beyond_wonderwords_needs_rulers_english_words(tmp_path: Path) -> None:
    rng = random.Random(0)
    with pytest.raises(words.ConfigurationError, match="--english_words"):
        word_extraction.cwe_vocabulary(9000, rng, None)
    path = tmp_path / "english_words.json"
    path.write_text(json.dumps({str(i): f"word{i}" for i in range(10_000)}))
    drawn = word_extraction.cwe_vocabulary(9000, rng, path)
    assert len(set(drawn)) == 9000 and all(word.startswith("word") for word in drawn)
    pointer = tmp_path / "pointer.json"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(words.ConfigurationError, match="git lfs"):
        word_extraction.cwe_vocabulary(9000, rng, pointer)


def _squad(directory: Path) -> Path:
    """Three articles of four paragraphs, each paragraph with two questions (the second unanswerable in one)."""
    data = {"data": []}
    for article in range(3):
        paragraphs = []
        for number in range(4):
            qas = [
                {"question": f"Q{article}.{number}.{k}?", "answers": [{"text": f"A{article}{number}{k}"}]}
                | {"is_impossible": article == 1 and k == 1}
                for k in range(2)
            ]
            paragraphs.append({"context": f"Article {article} paragraph {number} text.", "qas": qas})
        data["data"].append({"paragraphs": paragraphs})
    path = directory / "squad.json"
    path.write_text(json.dumps(data))
    return path


def test_qa_questions_in_file_order_and_same_article_distractors_first(tmp_path: Path, tokenizer) -> None:
    dataset = qa.load_squad(_squad(tmp_path))
    assert dataset.documents == sorted(dataset.documents)
    expected = [f"Q{a}.{n}.{k}?" for a in range(3) for n in range(4) for k in range(2) if not (a == 1 and k == 1)]
    assert [item.question for item in dataset.questions] == expected
    with pytest.warns(UserWarning, match="repeated"):  # 12 documents: repeated to fill the length, as RULER
        rows = generate_samples(
            "qa_1", tokenizer, length=4096, num_samples=len(expected), seed=0, qa_file=tmp_path / "squad.json"
        )
    assert [re.search(r"Question: (\S+)", row["input_query"]).group(1) for row in rows] == expected
    for question in range(len(dataset.questions)):
        item = dataset.questions[question]
        article = dataset.documents[item.gold_documents[0]].split(" paragraph")[0]
        for size in (2, 3, 4):  # the same article's paragraphs come first
            chosen = qa.build(dataset, question, size, seed=question).context
            assert dataset.documents[item.gold_documents[0]] in chosen
            assert re.findall(r"Document \d+:\n(Article \d)", chosen) == [article] * size
        chosen = qa.build(dataset, question, 6, seed=question).context
        listed = re.findall(r"Document \d+:\n(Article \d paragraph \d)", chosen)
        assert sum(doc.startswith(article) for doc in listed) == 4 and len(set(listed)) == 6


def test_chat_prompts_keep_the_answer_prefix_as_ruler_appends_it(tmp_path: Path) -> None:
    """RULER appends the answer prefix, leading space included, after the chat template's assistant header."""
    chat = build_tokenizer(tmp_path / "chat", chat_template=True)
    (row,) = generate_samples("niah_single_1", chat, length=LENGTH, num_samples=1, seed=0, chat=True)
    assert row["answer_prefix"].startswith(" The special magic number for ")
    assert row["input_query"].endswith("<|start_header_id|>assistant<|end_header_id|>\n\n" + row["answer_prefix"])
