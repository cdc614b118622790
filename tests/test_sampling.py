"""Greedy and seeded nucleus sampling."""

from __future__ import annotations

import pytest
import torch

from star_lightning.sampling import SamplingConfig, choose_token


def test_greedy_takes_the_argmax() -> None:
    logits = torch.tensor([0.1, 2.0, -1.0, 1.9])
    assert choose_token(logits, SamplingConfig(), None) == 1


def test_sampling_is_reproducible_from_the_seed_and_respects_top_p() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    config = SamplingConfig(temperature=1.0, top_p=0.7, seed=7)
    draws = [choose_token(logits, config, config.generator(torch.device("cpu"))) for _ in range(2)]
    assert draws[0] == draws[1]
    generator = config.generator(torch.device("cpu"))
    seen = {choose_token(logits, config, generator) for _ in range(300)}
    assert seen == {0, 1}  # 0.5 + 0.3 reaches the 0.7 mass; the tail is never drawn
    wide = SamplingConfig(temperature=1.0, top_p=1.0, seed=1)
    generator = wide.generator(torch.device("cpu"))
    assert {choose_token(logits, wide, generator) for _ in range(300)} == {0, 1, 2, 3}


@pytest.mark.parametrize(("kwargs", "message"), [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p")])
def test_bad_sampling_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**kwargs)
