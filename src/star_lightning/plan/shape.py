"""The numbers of a decoder-only transformer that its cost depends on, read from a transformers config alone.

No weights are read and no model is built: layer count, widths, heads and the parameter count follow from the
config. The parameter count is exact for the families Star Attention serves (Llama, Qwen2, Qwen3, Mistral, Phi-3,
Gemma-2, Gemma-3, Granite, OLMo-2: the test suite checks it against transformers' own models); for other dense
decoders it is counted as for a Llama-like layer (their norms and biases may differ by a few thousand parameters per
layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from star_lightning.errors import ConfigurationError

DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}

# Norm weights (each of width ``hidden``) per decoder layer where it is not the usual two.
_NORMS_PER_LAYER = {"gemma2": 4, "gemma3_text": 4}
# Per-head norms of q and k: ``head`` = one weight of width head_dim each (Qwen3), ``full`` = of the whole q / k
# width (OLMo-2).
_QK_NORM = {"qwen3": "head", "olmo2": "full", "gemma3_text": "head"}
# Families whose q/k/v projections always carry a bias (no config switch).
_QKV_BIAS_ALWAYS = frozenset({"qwen2"})
_KNOWN_FAMILIES = frozenset({"llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "gemma3_text", "granite", "olmo2"})


def dtype_name(dtype: Any) -> str:
    """``torch.bfloat16``, ``"bfloat16"`` or ``"torch.bfloat16"`` -> ``"bfloat16"``."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_BYTES:
        raise ConfigurationError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_BYTES)}")
    return name


@dataclass(frozen=True)
class ModelShape:
    """A decoder's cost-relevant numbers; ``bytes_per_element`` is the dtype its weights, activations and KV use."""

    model_type: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    total_params: int
    layer_matmul_params: int
    """Weights of the q/k/v/o and MLP projections of ONE layer (the matmuls every token runs through)."""
    layer_params: int
    """All parameters of one layer (projections, biases, norms)."""
    bytes_per_element: int
    dtype: str
    exact: bool
    """Whether the parameter count follows the family's own layer (False: counted as a Llama-like layer)."""

    @classmethod
    def from_config(cls, config: Any, dtype: Any = "bfloat16") -> ModelShape:
        """Read the shape from a transformers ``PretrainedConfig`` (its text part, for multimodal configs)."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        model_type = str(getattr(text, "model_type", "") or type(text).__name__)
        experts = [getattr(text, name, None) for name in ("num_local_experts", "num_experts", "n_routed_experts")]
        if any(isinstance(n, int) and n > 1 for n in experts):
            raise ConfigurationError(
                f"model type {model_type!r} is a mixture of experts; the plan models dense decoders only (every token "
                "through every weight), so its FLOPs and memory would be wrong"
            )
        try:
            hidden = int(text.hidden_size)
            layers = int(text.num_hidden_layers)
            heads = int(text.num_attention_heads)
            intermediate = int(text.intermediate_size)
            vocab = int(text.vocab_size)
        except (AttributeError, TypeError) as error:
            raise ConfigurationError(
                f"the config of model type {model_type!r} lacks a decoder's basic numbers ({error}); the plan needs "
                "hidden_size, num_hidden_layers, num_attention_heads, intermediate_size and vocab_size"
            ) from None
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
        tied = bool(getattr(text, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False)))
        name = dtype_name(dtype)

        q_width, kv_width = heads * head_dim, kv_heads * head_dim
        attention = hidden * (q_width + 2 * kv_width) + q_width * hidden
        mlp = 3 * hidden * intermediate
        matmul = attention + mlp
        extras = _NORMS_PER_LAYER.get(model_type, 2) * hidden
        qk_norm = _QK_NORM.get(model_type)
        if qk_norm == "head":
            extras += 2 * head_dim
        elif qk_norm == "full":
            extras += q_width + kv_width
        if model_type in _QKV_BIAS_ALWAYS:
            extras += q_width + 2 * kv_width
        elif getattr(text, "attention_bias", False):
            extras += q_width + 2 * kv_width + hidden
        if getattr(text, "mlp_bias", False):
            extras += 2 * intermediate + hidden
        layer = matmul + extras
        embedding = vocab * hidden
        total = layers * layer + embedding + hidden + (0 if tied else embedding)  # + the final norm
        return cls(
            model_type=model_type,
            layers=layers,
            hidden=hidden,
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate=intermediate,
            vocab=vocab,
            tied_embeddings=tied,
            total_params=total,
            layer_matmul_params=matmul,
            layer_params=layer,
            bytes_per_element=DTYPE_BYTES[name],
            dtype=name,
            exact=model_type in _KNOWN_FAMILIES,
        )

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        """Width of one token's keys (or values) in one layer: KV heads x head_dim."""
        return self.kv_heads * self.head_dim

    @property
    def matmul_params(self) -> int:
        """Projection weights of all layers: a token costs ``2 x`` this many FLOPs in them."""
        return self.layers * self.layer_matmul_params

    @property
    def lm_head_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def weight_bytes(self) -> int:
        """One full copy of the weights."""
        return self.total_params * self.bytes_per_element

    @property
    def decode_weight_bytes(self) -> int:
        """Weights read by one decode step: everything but the input embedding table (one row of it is read),
        with the output projection read once (tied or not)."""
        untied_embedding = 0 if self.tied_embeddings else self.vocab * self.hidden
        return (self.total_params - untied_embedding) * self.bytes_per_element

    @property
    def kv_bytes_per_token(self) -> int:
        """Keys and values of one token over all layers."""
        return 2 * self.layers * self.kv_width * self.bytes_per_element

    @property
    def kv_bytes_per_token_layer(self) -> int:
        return 2 * self.kv_width * self.bytes_per_element
