"""Variable tracking (RULER's multi-hop tracing): follow chains ``VAR B = VAR A`` back to a value."""

from __future__ import annotations

import random
import string

from star_lightning.bench.ruler import prompts

NOISE_LINE = prompts.NOISE_SENTENCES + "\n"


def _chains(
    rng: random.Random, num_chains: int, num_hops: int, name_length: int
) -> tuple[list[list[str]], list[list[str]]]:
    """Distinct variable names per chain and the chain statements (first assigns a 5-digit value)."""
    names: list[str] = []
    while len(names) < num_chains * (num_hops + 1):
        name = "".join(rng.choices(string.ascii_uppercase, k=name_length))
        if name not in names:
            names.append(name)
    variables, statements = [], []
    for start in range(0, len(names), num_hops + 1):
        chain_vars = names[start : start + num_hops + 1]
        chain = [f"VAR {chain_vars[0]} = {rng.randint(10000, 99999)}"]
        chain.extend(f"VAR {chain_vars[hop + 1]} = VAR {chain_vars[hop]} " for hop in range(num_hops))
        variables.append(chain_vars)
        statements.append(chain)
    return variables, statements


def _haystack(rng: random.Random, statements: list[list[str]], num_noise: int) -> str:
    """Noise lines with every chain's statements inserted at random places, each chain in order."""
    sentences = [NOISE_LINE] * num_noise
    for chain in statements:
        positions = sorted(rng.choices(range(len(sentences) + 1), k=len(chain)))
        for offset, (position, statement) in enumerate(zip(positions, chain, strict=True)):
            sentences.insert(position + offset, statement)
    return " ".join(sentences).replace(". \n", ".\n")


def _instance(
    rng: random.Random, num_noise: int, num_chains: int, num_hops: int, name_length: int
) -> tuple[str, str, str, list[str]]:
    variables, statements = _chains(rng, num_chains, num_hops, name_length)
    value = statements[0][0].split("=")[-1].strip()
    context = prompts.VT_CONTEXT.format(context=_haystack(rng, statements, num_noise))
    query = prompts.VT_QUERY.format(query=value)
    prefix = prompts.VT_ANSWER_PREFIX.format(num_v=num_hops + 1, query=value)
    return context, query, prefix, variables[0]


def build(size: int, seed: int, *, num_chains: int = 1, num_hops: int = 4) -> prompts.Prompt:
    """A prompt with ``size`` noise lines, preceded (as in RULER) by one solved short example."""
    rng = random.Random(seed)
    example_context, example_query, example_prefix, example_answer = _instance(rng, 5, num_chains, min(num_hops, 10), 3)
    example = example_context + example_query + example_prefix + " ".join(example_answer)
    context, query, prefix, answer = _instance(rng, size, num_chains, num_hops, 5)
    return prompts.Prompt(context=example + "\n\n" + context, query=query, answer_prefix=prefix, outputs=answer)
