"""Loading a HuggingFace causal LM safely and checking that Star Attention can serve its attention.

Safe by default: weights only through safetensors (or a GGUF file the user names, dequantized by transformers), no
remote code unless asked. A model is servable when it routes attention through transformers' ``AttentionInterface``
and has no non-attention token mixers (the check runs on the config, before any weights are read).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from star_lightning.attention.star import ATTENTION_NAME, register_star_attention
from star_lightning.errors import ConfigurationError

DTypeName = Literal["auto", "float32", "float64", "bfloat16", "float16"]
_NON_ATTENTION_LAYERS = ("linear_attention", "mamba", "conv", "recurrent", "mlstm", "slstm")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on GPUs and float32 on CPUs."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {
            "float32": torch.float32,
            "float64": torch.float64,
            "bfloat16": torch.bfloat16,
            "float16": torch.float16,
        }[name]
    except KeyError:
        raise ConfigurationError(
            f"unknown dtype {name!r}; choose auto, float32, float64, bfloat16 or float16"
        ) from None


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or not _looks_like_hub_id(name)


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not name.startswith((".", "/", "~"))


def gguf_file(pretrained: str) -> tuple[str, str] | None:
    """``(folder, file name)`` when ``pretrained`` names a GGUF file, which transformers loads as
    ``from_pretrained(folder, gguf_file=name)``; None for a model folder or a hub id."""
    path = Path(pretrained)
    if path.suffix.lower() != ".gguf" or not path.is_file():
        return None
    return str(path.parent), path.name


def pretrained_source(pretrained: str) -> tuple[str, dict[str, Any]]:
    """What ``from_pretrained`` of a config, tokenizer or model is called with for ``pretrained``: the folder or hub
    id, and ``gguf_file`` for a GGUF file (whose reader packages must then be installed)."""
    located = gguf_file(pretrained)
    if located is None:
        return pretrained, {}
    _check_gguf_support(pretrained)
    return located[0], {"gguf_file": located[1]}


def _check_gguf_support(name: str) -> None:
    missing = [package for package in ("gguf", "accelerate") if importlib.util.find_spec(package) is None]
    if missing:
        raise ConfigurationError(
            f"{name!r} is a GGUF file; reading it needs the {' and '.join(missing)} package(s): install the extra "
            "with pip install 'star-lightning[gguf]'"
        )


def resolve_pretrained(pretrained: str | os.PathLike[str]) -> str:
    """A local folder or GGUF file (which must exist) or a hub id; a missing folder is reported as such, not as a hub
    error."""
    name = str(pretrained)
    path = Path(name).expanduser()
    if path.exists():
        if path.is_file() and path.suffix.lower() == ".gguf":
            _check_gguf_support(name)
            return str(path)
        if not path.is_dir():
            raise ConfigurationError(
                f"--model.pretrained {name!r} is a file; give the model's folder, a .gguf file or a hub id"
            )
        return str(path)
    if path.suffix.lower() == ".gguf":
        raise ConfigurationError(f"GGUF file {name!r} does not exist; give --model.pretrained an existing .gguf file")
    if _looks_like_path(name) or not _looks_like_hub_id(name):
        raise ConfigurationError(
            f"model folder {name!r} does not exist; give --model.pretrained an existing folder (with config.json and "
            "*.safetensors), a .gguf file or a HuggingFace hub id such as meta-llama/Llama-3.1-8B-Instruct"
        )
    return name


def load_config(pretrained: str, *, trust_remote_code: bool = False) -> PretrainedConfig:
    source, kwargs = pretrained_source(pretrained)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as error:
        raise ConfigurationError(
            f"{pretrained!r} is neither an existing model folder nor a model the HuggingFace hub could provide "
            f"({error}); give --model.pretrained an existing folder or a reachable hub id"
        ) from None


def check_attention_servable(config: PretrainedConfig, model_class: type | None = None) -> None:
    """Raise a clear error for a model whose attention Star Attention cannot take over."""
    model_type = getattr(config, "model_type", type(config).__name__)
    if model_class is None:
        known: Any = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
        model_class = known
    if model_class is None:
        raise ConfigurationError(f"model type {model_type!r} is not a causal language model known to transformers")
    if not getattr(model_class, "_supports_attention_backend", False):
        raise ConfigurationError(
            f"model type {model_type!r} ({model_class.__name__}) does not route its attention through transformers' "
            "AttentionInterface, so Star Attention cannot serve it. Supported are models such as Llama, Qwen2, "
            "Qwen3, Mistral, Phi-3, Gemma-2, Granite and OLMo-2; use --model.attention dense for this one"
        )
    layer_types = getattr(config, "layer_types", None) or ()
    mixers = sorted({t for t in layer_types if any(word in str(t) for word in _NON_ATTENTION_LAYERS)})
    if mixers:
        raise ConfigurationError(
            f"model type {model_type!r} has non-attention layers ({', '.join(mixers)}); Star Attention can serve "
            "only models whose every token mixer is softmax attention"
        )


def dense_attention_implementation(model_class: type, config: PretrainedConfig) -> str:
    """The attention implementation of the dense baseline: PyTorch's SDPA where the model supports it, else eager.

    SDPA has no logit soft-capping: transformers 5.23 refuses it for Gemma-2 and 5.17 would silently drop the cap, so
    a model whose config soft-caps attention logits runs eager (its own exact attention).
    """
    softcap = getattr(config.get_text_config(), "attn_logit_softcapping", None)
    return "sdpa" if getattr(model_class, "_supports_sdpa", False) and softcap is None else "eager"


def _loading_attention(config: PretrainedConfig) -> str:
    """The implementation a model is built with (star/ring switch from it afterwards); ``sdpa`` for remote code."""
    model_class: Any = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    return "sdpa" if model_class is None else dense_attention_implementation(model_class, config)


def host_device_map(devices: list[torch.device]) -> dict[str, Any]:
    """``from_pretrained`` arguments that spread the decoder layers evenly over ``devices`` (several GPUs of one host).

    transformers places the layers with accelerate's balanced device map, restricted to these GPUs; the layers then
    run one after the other, so a host of ``g`` GPUs has their memory together, at the speed of one GPU.
    """
    if importlib.util.find_spec("accelerate") is None:
        raise ConfigurationError(
            f"spreading the model over {len(devices)} GPUs per host (gpus_per_host) needs the accelerate package; "
            "install the extra: pip install 'star-lightning[multi-gpu]'"
        )
    indices = [device.index if device.index is not None else 0 for device in devices]
    max_memory = {index: torch.cuda.get_device_properties(index).total_memory for index in indices}
    return {"device_map": "balanced", "max_memory": max_memory}


def load_model(
    pretrained: str,
    *,
    dtype: torch.dtype,
    devices: list[torch.device],
    attention: Literal["star", "ring", "dense"],
    trust_remote_code: bool = False,
    tensor_parallel: Any = None,
) -> PreTrainedModel:
    """Load weights (safetensors, or a GGUF file dequantized to ``dtype``) onto ``devices`` and switch the attention to
    Star Attention if asked.

    One device holds the whole model; several (a host of several GPUs) hold a share of its layers each; with
    ``tensor_parallel`` (the host's 1-D device mesh) every GPU of the host holds its shard of every layer.
    """
    if not devices:
        raise ValueError("load_model needs at least one device")
    config = load_config(pretrained, trust_remote_code=trust_remote_code)
    if attention != "dense" and not trust_remote_code:
        check_attention_servable(config)
    if tensor_parallel is not None:
        from star_lightning.parallel.tensor_parallel import check_tensor_parallel

        check_tensor_parallel(config, MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None), tensor_parallel.size())
    source, kwargs = pretrained_source(pretrained)
    if "gguf_file" not in kwargs:
        kwargs["use_safetensors"] = True
    kwargs.update(dtype=dtype, trust_remote_code=trust_remote_code)
    if len(devices) > 1:
        kwargs.update(host_device_map(devices))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, config=config, attn_implementation=_loading_attention(config), **kwargs
        )  # the config read above: a GGUF's metadata is parsed once less (3 s for a 135M model)
    except (OSError, ValueError) as error:
        raise ConfigurationError(f"could not load model weights from {pretrained!r}: {error}") from None
    if tensor_parallel is not None:
        from star_lightning.parallel.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, tensor_parallel)
    if len(devices) == 1:
        torch.nn.Module.to(model, devices[0])  # transformers' own `to` wrapper confuses type checkers
    model.eval()
    set_attention(model, attention)
    return model


def build_model(
    config: PretrainedConfig,
    *,
    dtype: torch.dtype,
    device: torch.device,
    attention: Literal["star", "ring", "dense"],
    seed: int = 0,
) -> PreTrainedModel:
    """A model of ``config`` with random weights made on ``device`` (same seed, same weights on every process), set
    up as :func:`load_model` sets up loaded weights: benchmarks of real shapes without a download."""
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, attn_implementation=_loading_attention(config))
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    set_attention(model, attention)
    return model


def set_attention(model: PreTrainedModel, attention: Literal["star", "ring", "dense"]) -> None:
    """The attention ``predict`` runs for ``attention``: the model's own (``dense``: see
    :func:`dense_attention_implementation`) or Star Attention's."""
    if attention == "dense":
        model.set_attn_implementation(dense_attention_implementation(type(model), model.config))
    else:
        use_star_attention(model)


def use_star_attention(model: PreTrainedModel) -> None:
    """Switch an already loaded model to Star Attention, or explain why it cannot be."""
    check_attention_servable(model.config, type(model))
    register_star_attention()
    model.set_attn_implementation(ATTENTION_NAME)
    if model.config._attn_implementation != ATTENTION_NAME:
        raise ConfigurationError(
            f"{type(model).__name__} did not accept the '{ATTENTION_NAME}' attention implementation; Star Attention "
            "cannot serve this model"
        )


def load_tokenizer(pretrained: str, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a model folder, a hub id, or the one a GGUF file carries."""
    source, kwargs = pretrained_source(pretrained)
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as error:
        raise ConfigurationError(f"could not load the tokenizer of {pretrained!r}: {error}") from None
