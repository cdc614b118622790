"""``sdpa`` and ``cudnn``: PyTorch's fused attention kernels that return the log-sum-exp.

``sdpa`` is the flash kernel: on CUDA (fp16/bf16) for long Phase 1 blocks; on CPU (float32/64, bf16) for every call
(15x faster than ``math`` on a 2K block, measured on one core). ``cudnn`` is cuDNN's kernel on CUDA (fp16/bf16), the
other candidate for long blocks, and ``auto``'s first choice there (:func:`cudnn_or_flash`: a refusal switches the
engine to flash for good). These kernels align causal masks top-left, so a bottom-right causal call is a visible
prefix merged with a square causal part.

:func:`sdpa_priority` gives the dense baseline (transformers' own ``sdpa`` attention) the same Phase 1 kernel.
"""

from __future__ import annotations

import warnings
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from star_lightning.attention.backends import lse_dtype
from star_lightning.attention.merge import merge_pair

if TYPE_CHECKING:
    from star_lightning.attention.choice import KernelChoice

# Queries up to this length count as "short" (decoding, short queries): they keep PyTorch's own kernel order.
SHORT_QUERY = 16


def flash(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    scale: float,
    causal: bool,
    softcap: float | None = None,
    valid_length: Tensor | None = None,
    window: Any = None,
    kernels: KernelChoice,
) -> tuple[Tensor, Tensor]:
    """PyTorch's flash kernel (``sdpa``), on CUDA or CPU."""
    return fused_attention(kernels, "sdpa", query, key, value, scale=scale, causal=causal)


def cudnn(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    scale: float,
    causal: bool,
    softcap: float | None = None,
    valid_length: Tensor | None = None,
    window: Any = None,
    kernels: KernelChoice,
) -> tuple[Tensor, Tensor]:
    """cuDNN's kernel, asked for by name (a failure is raised)."""
    return fused_attention(kernels, "cudnn", query, key, value, scale=scale, causal=causal)


def cudnn_or_flash(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    scale: float,
    causal: bool,
    softcap: float | None = None,
    valid_length: Tensor | None = None,
    window: Any = None,
    kernels: KernelChoice,
) -> tuple[Tensor, Tensor]:
    """``auto``'s cuDNN: a refusal warns once and switches the engine's prefill kernel to flash (chosen again)."""
    try:
        return fused_attention(kernels, "cudnn", query, key, value, scale=scale, causal=causal)
    except RuntimeError as error:
        message = f"cuDNN attention failed ({error}); 'auto' uses the flash kernel (sdpa) from now on"
        warnings.warn(message, stacklevel=3)
        kernels.prefill = "sdpa"
        kernels.forget()
    return fused_attention(kernels, "sdpa", query, key, value, scale=scale, causal=causal)


def repeat_kv(x: Tensor, groups: int) -> Tensor:
    if groups == 1:
        return x
    b, h, length, d = x.shape
    return x[:, :, None].expand(b, h, groups, length, d).reshape(b, h * groups, length, d)  # [B, Hq, L, D]


def fused_attention(
    kernels: KernelChoice, kernel: str, query: Tensor, key: Tensor, value: Tensor, *, scale: float, causal: bool
) -> tuple[Tensor, Tensor]:
    """A fused kernel (``sdpa``: flash, ``cudnn``); bottom-right causality is a visible prefix merged with a square
    causal part (these kernels align causal masks top-left)."""
    q_len, k_len = query.shape[2], key.shape[2]
    if not causal or q_len == k_len:
        return _fused_call(kernels, kernel, query, key, value, scale=scale, causal=causal)
    prefix = k_len - q_len
    k_p, v_p, k_c, v_c = key[:, :, :prefix], value[:, :, :prefix], key[:, :, prefix:], value[:, :, prefix:]
    out_p, lse_p = _fused_call(kernels, kernel, query, k_p, v_p, scale=scale, causal=False)
    out_c, lse_c = _fused_call(kernels, kernel, query, k_c, v_c, scale=scale, causal=True)
    return merge_pair(out_p, lse_p, out_c, lse_c)


def _fused_call(
    kernels: KernelChoice, kernel: str, query: Tensor, key: Tensor, value: Tensor, *, scale: float, causal: bool
) -> tuple[Tensor, Tensor]:
    """One fused call; K/V are passed with their own (fewer) heads when the kernel takes them, else repeated."""
    groups = query.shape[1] // key.shape[1]
    if query.device.type == "cpu":  # the CPU flash kernel takes grouped K/V heads
        return _fused_op(kernel, query, key, value, scale=scale, causal=causal)
    if groups > 1 and kernels.native_gqa[kernel] is not False:
        try:
            result = _fused_op(kernel, query, key, value, scale=scale, causal=causal)
            kernels.native_gqa[kernel] = True
            return result
        except RuntimeError:
            if kernels.native_gqa[kernel]:
                raise
            kernels.native_gqa[kernel] = False
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)  # [B, Hq, Lk, D]
    return _fused_op(kernel, query, key, value, scale=scale, causal=causal)


def _fused_op(
    kernel: str, query: Tensor, key: Tensor, value: Tensor, *, scale: float, causal: bool
) -> tuple[Tensor, Tensor]:
    q_len = query.shape[2]
    if query.device.type == "cpu":
        if kernel != "sdpa":
            raise ValueError(f"the {kernel!r} attention backend needs CUDA; use --model.backend auto, sdpa or math")
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, causal, scale=scale
        )  # out [B, Hq, Lq, D]; lse [B, Hq, Lq] (natural log)
        return out, lse.to(lse_dtype(query))
    if kernel == "cudnn":
        result = torch.ops.aten._scaled_dot_product_cudnn_attention(
            query, key, value, None, True, 0.0, causal, False, scale=scale
        )
    else:
        result = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, causal, False, scale=scale)
    out, lse = result[0], result[1]  # out [B, Hq, Lq, D]; lse [B, Hq, Lq] or [B, Hq, Lq, 1] (natural log)
    if lse.dim() == 4:
        lse = lse[..., 0]
    return out, lse[..., :q_len].float()


def sdpa_priority(kernels: KernelChoice, device: torch.device, query_length: int) -> AbstractContextManager[object]:
    """The dense baseline (transformers' own ``sdpa`` attention) with the same Phase 1 kernel as star and ring.

    For long CUDA queries, PyTorch's SDPA is told to try ``kernels.prefill`` first (cuDNN by default); short ones
    (decoding) keep PyTorch's own order, since cuDNN builds a new plan for every new cache length."""
    if device.type != "cuda" or query_length <= SHORT_QUERY or kernels.backend not in ("auto", "cudnn", "sdpa"):
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = SDPBackend.CUDNN_ATTENTION if (kernels.backend == "cudnn" or kernels.prefill == "cudnn") else None
    if kernels.backend == "sdpa" or first is None:
        return nullcontext()
    order = [first, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # a torch without priorities: PyTorch's own order
        return nullcontext()
