"""Choosing the next token from the query host's logits: greedy by default, temperature / top-p with a seed."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from star_lightning.errors import ConfigurationError


@dataclass(frozen=True)
class SamplingConfig:
    """``temperature == 0`` is greedy decoding; ``top_p < 1`` keeps the smallest set of tokens with that mass."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        # Checked here, where the values are first used, so ``--model.*`` and the Python API report them alike.
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigurationError(
                f"temperature must be a finite number >= 0, got {self.temperature}; set --model.temperature 0 "
                "(greedy) or a positive sampling temperature such as 0.7"
            )
        if not 0 < self.top_p <= 1:  # also false for nan
            raise ConfigurationError(
                f"top_p must be in (0, 1], got {self.top_p}; set --model.top_p to the nucleus mass to keep, e.g. 0.9 "
                "(1 keeps every token)"
            )

    def generator(self, device: torch.device) -> torch.Generator | None:
        if self.temperature == 0:
            return None
        generator = torch.Generator(device=device)
        # seed + request index may be any integer (indices are the user's): torch takes [-2**63, 2**64), so one
        # beyond it is taken modulo 2**64 (the seeds torch takes are unchanged).
        seed = self.seed if -(2**63) <= self.seed < 2**64 else self.seed % 2**64
        generator.manual_seed(seed)
        return generator


def choose_token(logits: Tensor, config: SamplingConfig, generator: torch.Generator | None) -> int:
    """``logits`` ``[V]`` -> a token id."""
    if config.temperature == 0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.float() / config.temperature, dim=-1)  # [V]
    if config.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < config.top_p  # the top token is always kept
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator).item())
