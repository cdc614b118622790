"""Tiny random-weight models of several HF families, built from configs (no downloads)."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Phi3Config,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 96
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)


def tiny_config(family: str, **overrides: object) -> PretrainedConfig:
    """The family's tiny config; ``overrides`` set fields before the model is built (windows, rope scaling)."""
    config = _family_config(family)
    for name, value in overrides.items():
        setattr(config, name, value)
    return config


def _family_config(family: str) -> PretrainedConfig:
    if family == "llama":
        return LlamaConfig(**_COMMON)
    if family == "qwen2":
        return Qwen2Config(**_COMMON)
    if family == "qwen3":
        return Qwen3Config(**_COMMON, head_dim=16)
    if family == "mistral":
        return MistralConfig(**_COMMON, sliding_window=None)
    if family == "phi3":
        return Phi3Config(**_COMMON)
    if family == "gemma2":
        return Gemma2Config(
            **_COMMON,
            head_dim=16,
            query_pre_attn_scalar=16,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=30.0,
            sliding_window=4096,
        )
    if family == "gemma3":  # hybrid: a sliding-window layer, then a global one (Gemma-3 has five of the first per one)
        return Gemma3TextConfig(
            **_COMMON,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=4096,
            layer_types=["sliding_attention", "full_attention"],
        )
    if family == "granite":
        return GraniteConfig(
            **_COMMON, attention_multiplier=0.2, embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=2.0
        )
    if family == "olmo2":
        return Olmo2Config(**_COMMON)
    raise ValueError(family)


FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "gemma3", "granite", "olmo2")


def tiny_model(
    family: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float64, **overrides: object
) -> PreTrainedModel:
    """Deterministic weights: every process that builds the same family, seed and overrides gets the same model."""
    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    # Larger-than-default weights make attention sharp enough that wrong masks change the outputs visibly.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "qkv_proj.weight")):
                param.mul_(4.0)
    return model.to(dtype).eval()


def random_tokens(length: int, *, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (1, length), generator=generator)  # [1, L], no special tokens
