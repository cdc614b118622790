"""Variable tracking (RULER's multi-hop tracing): follow chains ``VAR B = VAR A`` back to a value.

Follows NVIDIA/RULER scripts/data/synthetic/variable_tracking.py (noise haystack): lines joined with newlines, each
chain's statements inserted at distinct positions in order, and one solved example in front. RULER builds the
example by generating a variable-tracking sample itself (3-letter names, the value 12345) sized to at most 500
tokens of the same tokenizer, then, for every sample, renames its answer variables and replaces its value at random
(``randomize_icl``); :class:`Example` does the same.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass

from star_lightning.bench.ruler import prompts
from star_lightning.bench.ruler.fitting import largest_fitting
from star_lightning.errors import ConfigurationError

EXAMPLE_TOKENS = 500  # RULER: sys_vartrack_w_noise_random(max_seq_length=500) for the in-context example
EXAMPLE_VALUE = "12345"


def _names(rng: random.Random, count: int, length: int, exclude: frozenset[str] = frozenset()) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choices(string.ascii_uppercase, k=length))
        if name not in names and name not in exclude and name != "VAR":
            names.append(name)
    return names


def _chains(
    rng: random.Random, num_chains: int, num_hops: int, *, example: bool
) -> tuple[list[list[str]], list[list[str]]]:
    """Distinct variable names per chain and the chain statements (the first assigns the value)."""
    hops = min(10, num_hops) if example else num_hops
    names = _names(rng, num_chains * (hops + 1), 3 if example else 5)
    variables, statements = [], []
    for start in range(0, len(names), hops + 1):
        chain_vars = names[start : start + hops + 1]
        value = EXAMPLE_VALUE if example else str(rng.randrange(10000, 99999))  # np.random.randint: high excluded
        chain = [f"VAR {chain_vars[0]} = {value}"]
        chain.extend(f"VAR {chain_vars[hop + 1]} = VAR {chain_vars[hop]} " for hop in range(hops))
        variables.append(chain_vars)
        statements.append(chain)
    return variables, statements


def _haystack(rng: random.Random, statements: list[list[str]], num_noise: int) -> str:
    """Noise lines with every chain's statements at distinct places, each chain in order, joined by newlines."""
    lines = [prompts.NOISE] * num_noise
    for chain in statements:
        positions = sorted(rng.sample(range(max(len(lines), len(chain))), len(chain)))
        for offset, (position, statement) in enumerate(zip(positions, chain, strict=True)):
            lines.insert(position + offset, statement)
    return "\n".join(lines).replace(". \n", ".\n")


def _instance(
    rng: random.Random, num_noise: int, num_chains: int, num_hops: int, *, example: bool
) -> tuple[str, prompts.Question, list[str]]:
    """``(context, question, answer)``: the first chain's variables are the answer."""
    variables, statements = _chains(rng, num_chains, num_hops, example=example)
    value = statements[0][0].split("=")[-1].strip()
    context, question = prompts.fill(
        prompts.VARIABLE_TRACKING, _haystack(rng, statements, num_noise), query=value, num_v=num_hops + 1
    )
    return context, question, variables[0]


@dataclass(frozen=True)
class Example:
    """The solved in-context example: RULER's ``input + " " + " ".join(outputs) + "\\n"``, and its answer names."""

    text: str
    names: tuple[str, ...]

    def randomized(self, rng: random.Random) -> str:
        """New random names of the same length for the answer variables, a new random value (``randomize_icl``)."""
        renamed = _names(rng, len(self.names), len(self.names[0]), exclude=frozenset(self.names))
        mapping = dict(zip(self.names, renamed, strict=True))
        mapping[EXAMPLE_VALUE] = str(rng.randrange(10000, 99999))
        pattern = re.compile(r"\b(" + "|".join(map(re.escape, mapping)) + r")\b")
        return pattern.sub(lambda match: mapping[match.group(1)], self.text)


def make_example(count_tokens: Callable[[str], int], seed: int, *, num_chains: int = 1, num_hops: int = 4) -> Example:
    """The largest example (in noise lines) whose prompt is at most 500 tokens (no special tokens), as RULER."""

    def text_of(size: int) -> tuple[str, list[str]]:
        rng = random.Random(f"{seed}/vt-example/{size}")
        context, question, answer = _instance(rng, size, num_chains, num_hops, example=True)
        return context + question.query + question.answer_prefix, answer

    try:
        size = largest_fitting(lambda size: count_tokens(text_of(size)[0]), EXAMPLE_TOKENS, hint=5, upper=10_000)
    except ConfigurationError:
        size = 1  # a tokenizer so coarse that no example fits in 500 tokens: keep the smallest one
    text, answer = text_of(size)
    return Example(text + " " + " ".join(answer) + "\n", tuple(answer))


def build(size: int, seed: int, example: Example, *, num_chains: int = 1, num_hops: int = 4) -> prompts.Prompt:
    """A prompt with ``size`` noise lines, preceded by the solved example (renamed for this sample)."""
    rng = random.Random(seed)
    context, question, answer = _instance(rng, size, num_chains, num_hops, example=False)
    # RULER inserts the example before the task template, followed by '\n' (the example ends with one too).
    return prompts.Prompt(
        context=example.randomized(rng) + "\n" + context,
        questions=[prompts.Question(question.query, question.answer_prefix, answer)],
    )
