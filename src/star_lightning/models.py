"""Loading a HuggingFace causal LM safely and checking that Star Attention can serve its attention.

Safe by default: weights only through safetensors (or a GGUF file the user names, dequantized by transformers), no
remote code unless asked. A model is servable when it routes attention through transformers' ``AttentionInterface``
and has no non-attention token mixers (the check runs on the config, before any weights are read). Local weight
files are checked from their headers before loading (:mod:`star_lightning.model_files`), and
:func:`placeable_positions` says how long a prompt the model can place.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from star_lightning.attention.star import ATTENTION_NAME, register_star_attention
from star_lightning.engine.settings import Attention
from star_lightning.errors import ConfigurationError
from star_lightning.model_files import check_weight_files, fingerprint_file, fingerprint_folder
from star_lightning.projections import fuse_projections

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
        return pretrained, ({"local_files_only": True} if hub_unreachable(pretrained) else {})
    _check_gguf_support(pretrained)
    return located[0], {"gguf_file": located[1]}


def metadata_source(pretrained: str, *, trust_remote_code: bool = False) -> tuple[str, dict[str, Any]]:
    """What a config or tokenizer is read from: as :func:`pretrained_source`, but for a GGUF file the folder its
    metadata was saved to on first use (:mod:`star_lightning.gguf_cache`: reading it from the file took 15-20 s)."""
    source, kwargs = pretrained_source(pretrained)
    if "gguf_file" in kwargs:
        from star_lightning.gguf_cache import metadata_folder

        folder = metadata_folder(pretrained, trust_remote_code=trust_remote_code)
        if folder is not None:
            return str(folder), {}
    return source, kwargs


_HUB_REACHABLE: dict[str, str | None] = {}  # endpoint -> None (reachable) or why not, once per process


def hub_unreachable(pretrained: str) -> str | None:
    """Why the HuggingFace hub cannot be reached (one quick connect, cached), where ``pretrained`` is a hub id and
    the hub is not known to be offline: then only the local cache is read (``local_files_only``), answering at once
    rather than after transformers' retries (30-50 s); None otherwise."""
    if not _looks_like_hub_id(pretrained) or Path(pretrained).exists():
        return None
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return None  # transformers reads only the cache already
    import socket
    from urllib.parse import urlparse

    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    if endpoint not in _HUB_REACHABLE:
        url = urlparse(endpoint)
        try:
            socket.create_connection((url.hostname or "", url.port or 443), timeout=5).close()
            _HUB_REACHABLE[endpoint] = None
        except OSError as error:
            _HUB_REACHABLE[endpoint] = f"the hub {endpoint} cannot be reached: {error.strerror or error}"
    return _HUB_REACHABLE[endpoint]


def unreachable_hub_error(pretrained: str, option: str) -> ConfigurationError | None:
    """The one line for a hub id that is not cached while the hub cannot be reached (None where it can)."""
    why = hub_unreachable(pretrained)
    if why is None:
        return None
    return ConfigurationError(
        f"{option} {pretrained}: no local folder or file of that name, not in the HuggingFace cache, and {why}; give "
        f"a local folder or .gguf file, or download it where the hub is reachable (hf download {pretrained})"
    )


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


def _remote_code_error(pretrained: str, detail: str) -> ConfigurationError:
    return ConfigurationError(
        f"model {pretrained!r} comes with its own Python code ({detail}), which star_lightning runs only when asked: "
        "pass --model.trust_remote_code true if you trust that code"
    )


def check_remote_code(pretrained: str, *, trust_remote_code: bool = False) -> None:
    """A local folder whose ``config.json`` maps a model type transformers does not know to its own code
    (``auto_map``) needs ``trust_remote_code``; say so, instead of "not a model folder"."""
    config_file = Path(pretrained) / "config.json"
    if trust_remote_code or not config_file.is_file():
        return
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise ConfigurationError(f"{config_file} is not valid JSON ({error}); download the model again") from None
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if auto_map and model_type not in CONFIG_MAPPING:
        classes = ", ".join(f"{key} -> {value}" for key, value in sorted(auto_map.items()) if isinstance(value, str))
        raise _remote_code_error(pretrained, f"model type {model_type!r}, config.json auto_map: {classes}")


def load_config(pretrained: str, *, trust_remote_code: bool = False) -> PretrainedConfig:
    check_remote_code(pretrained, trust_remote_code=trust_remote_code)
    try:
        source, kwargs = metadata_source(pretrained, trust_remote_code=trust_remote_code)
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
        config._name_or_path = pretrained_source(pretrained)[0]  # the GGUF's folder, not the cache it was read from
        return config
    except (OSError, ValueError) as error:
        if "trust_remote_code" in str(error) and not trust_remote_code:
            raise _remote_code_error(pretrained, "transformers does not know its model type") from None
        offline = unreachable_hub_error(pretrained, "--model.pretrained")
        if offline is not None:
            raise offline from None
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
    attention: Attention,
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
    if Path(pretrained).is_dir():
        check_weight_files(pretrained)
    source, kwargs = pretrained_source(pretrained)
    gguf_dtype = cached = None
    if "gguf_file" in kwargs:  # dequantized once by an earlier load: read from its safetensors (gguf_cache)
        from star_lightning.gguf_cache import weights_folder
        from star_lightning.plan.shape import dtype_name

        gguf_dtype = dtype_name(dtype)
        cached = weights_folder(pretrained, gguf_dtype)
    if cached is not None:
        gguf_folder, source, kwargs = source, str(cached), {}
    if "gguf_file" not in kwargs:
        kwargs["use_safetensors"] = True
    kwargs.update(dtype=dtype, trust_remote_code=trust_remote_code)
    if len(devices) > 1:
        kwargs.update(host_device_map(devices))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, config=config, attn_implementation=_loading_attention(config), **kwargs
        )  # the config read above: a GGUF's metadata is parsed once less (3 s for a 135M model)
    except (OSError, ValueError, SafetensorError) as error:
        raise ConfigurationError(f"could not load model weights from {pretrained!r}: {error}") from None
    if cached is not None:
        model.config._name_or_path = gguf_folder  # the GGUF's folder, as load_config says
    if gguf_dtype is not None and cached is None and len(devices) == 1:  # dequantized from the file: kept
        from star_lightning.gguf_cache import save_weights

        save_weights(pretrained, model, gguf_dtype)
    if tensor_parallel is not None:
        from star_lightning.parallel.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, tensor_parallel)
    if len(devices) == 1:
        torch.nn.Module.to(model, devices[0])  # transformers' own `to` wrapper confuses type checkers
        if devices[0].type == "cuda" and tensor_parallel is None:
            fuse_projections(model)  # one GEMM for q/k/v and for gate/up: a small model's decode is launch-bound
    model.eval()
    set_attention(model, attention)
    return model


def build_model(
    config: PretrainedConfig,
    *,
    dtype: torch.dtype,
    device: torch.device,
    attention: Attention,
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
    if device.type == "cuda":
        fuse_projections(model)  # as load_model does on one GPU
    model.eval()
    set_attention(model, attention)
    return model


def set_attention(model: PreTrainedModel, attention: Attention) -> None:
    """The attention ``predict`` runs for ``attention``: Star Attention's function for star, ring, and for dense
    wherever it can serve the model (dense is then one block on one host:
    :func:`star_lightning.engine.prefill.prefill_dense` says why); the model's own otherwise (dense only; see
    :func:`dense_attention_implementation`)."""
    if attention == "dense":
        try:
            use_star_attention(model)
            return
        except ConfigurationError:
            model.set_attn_implementation(dense_attention_implementation(type(model), model.config))
            return
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
    try:
        source, kwargs = metadata_source(pretrained, trust_remote_code=trust_remote_code)
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as error:
        offline = unreachable_hub_error(pretrained, "--model.pretrained")
        if offline is not None:
            raise offline from None
        raise ConfigurationError(f"could not load the tokenizer of {pretrained!r}: {error}") from None


# Rope types that stretch the positions a model was trained on by ``factor``.
_SCALING_ROPE_TYPES = ("linear", "dynamic", "yarn", "longrope", "llama3")


def placeable_positions(config: PretrainedConfig) -> int | None:
    """How many positions (prompt + generated tokens) the model can place; None when its config sets no limit.

    ``max_position_embeddings``, raised by rope scaling: for the rope types that stretch the trained positions
    (``linear``, ``dynamic`` NTK, ``yarn``, ``longrope``, ``llama3``) the limit is
    ``max(max_position_embeddings, factor x original_max_position_embeddings)``, the original length defaulting
    to ``max_position_embeddings`` (configs that extend a base model by adding only ``rope_scaling``). So
    Llama-3.1 (131072; llama3, factor 8 of 8192) places 131072, Qwen2.5 with its YaRN recipe (32768; yarn, factor 4
    of 32768) 131072, Phi-3 longrope (131072, original 4096) 131072. Without scaling (``default`` rope, learned
    absolute positions) the limit is ``max_position_embeddings``. Models with one rope per layer type (Gemma-3) take
    the largest, the full-attention layers' one.
    """
    text = config.get_text_config()
    max_positions = getattr(text, "max_position_embeddings", None)
    if isinstance(max_positions, bool) or not isinstance(max_positions, int) or max_positions <= 0:
        return None
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    ropes = list(rope.values()) if rope and all(isinstance(value, dict) for value in rope.values()) else [rope]
    limit = max_positions
    for parameters in ropes:
        rope_type = parameters.get("rope_type") or parameters.get("type")
        factor = parameters.get("factor")
        if rope_type not in _SCALING_ROPE_TYPES or not isinstance(factor, (int, float)) or factor <= 1:
            continue
        original = parameters.get("original_max_position_embeddings")
        original = original or getattr(text, "original_max_position_embeddings", None) or max_positions
        limit = max(limit, int(original * factor))
    return limit


def model_fingerprint(pretrained: str) -> str:
    """What identifies the weights and files of ``pretrained`` in a run record.

    A local folder: :func:`star_lightning.model_files.fingerprint_folder` (sizes, headers, samples; cheap); a GGUF
    file: the same of the file. A hub id: the commit of the cached snapshot (``hub:ID@COMMIT``), which names every
    file of it.
    """
    if Path(pretrained).is_dir():
        return fingerprint_folder(pretrained)
    if Path(pretrained).is_file():
        return fingerprint_file(pretrained)
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(pretrained, "config.json")
    commit = Path(cached).parent.name if isinstance(cached, str) else "unknown"
    return f"hub:{pretrained}@{commit}"
