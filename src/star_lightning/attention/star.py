"""Star Attention as a transformers attention function (registered as ``"star_lightning"``).

The engine passes a :class:`AttentionStep` through the model's forward kwargs (``star_step=...``); every
attention layer then runs the same step on its local q/k/v:

- ``local``: Phase 1, a block (optionally after its anchor prefix), causal, no communication;
- ``distributed``: Phase 2, attention over this host's cache with log-sum-exp, then the exact merge of every
  host's partial (each host merges the same gathered partials, so all hosts continue with identical bits);
- ``ring``: the exact ring-attention baseline for the context.

Masks are built here, not by transformers: requests are processed one at a time and blocks ragged, so there is
no padding; causality is the only mask, and it is applied bottom-right aligned by the kernels. This function is
therefore deliberately not registered in ``AttentionMaskInterface`` (transformers then passes
``attention_mask=None``, and a mask that does reach us is rejected rather than silently ignored).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor, nn
from transformers import AttentionInterface

from star_lightning.attention.kernels import attention_with_lse
from star_lightning.attention.merge import merge_partials
from star_lightning.attention.ring import ring_attention
from star_lightning.parallel.group import ContextGroup, SingleHostGroup

ATTENTION_NAME = "star_lightning"

StepKind = Literal["local", "distributed", "ring"]


@dataclass
class AttentionStep:
    """What every attention layer does in the current forward."""

    kind: StepKind
    causal: bool = True
    group: ContextGroup = field(default_factory=SingleHostGroup)
    backend: str = "auto"
    last_position: int = 0
    ring_lengths: tuple[int, ...] = ()


def star_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    sliding_window: int | None = None,
    star_step: AttentionStep | None = None,
    **kwargs: object,
) -> tuple[Tensor, None]:
    """q ``[B, Hq, Lq, D]``, k/v ``[B, Hkv, Lk, D]`` -> ``([B, Lq, Hq, D], None)`` as transformers expects."""
    if star_step is None:
        raise RuntimeError(
            f"the '{ATTENTION_NAME}' attention implementation runs only inside star_lightning's engine, which "
            "passes star_step=...; load the model again with attn_implementation='sdpa' for plain use"
        )
    if attention_mask is not None:
        raise RuntimeError(
            "star_lightning builds its own causal masks; got an attention_mask (padding is not supported)"
        )
    if sliding_window is not None and star_step.last_position >= sliding_window:
        raise ValueError(
            f"layer {getattr(module, 'layer_idx', '?')} uses sliding-window attention (window {sliding_window}) but "
            f"the request reaches position {star_step.last_position}; Star Attention serves global-attention layers "
            "only. Use requests shorter than the window, or a model without sliding-window layers"
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    step = star_step
    if step.kind == "ring":
        out, _ = ring_attention(
            query, key, value, step.group, step.ring_lengths, scale=scale, softcap=softcap, backend=step.backend
        )
    else:
        out, lse = attention_with_lse(
            query, key, value, scale=scale, causal=step.causal, softcap=softcap, backend=step.backend
        )
        if step.kind == "distributed":
            outs, lses = step.group.gather_partials(out, lse)  # [N, B, Hq, Lq, D], [N, B, Hq, Lq]
            out, _ = merge_partials(outs, lses)
    return out.transpose(1, 2).contiguous(), None  # [B, Lq, Hq, D]


def register_star_attention() -> str:
    """Make ``attn_implementation="star_lightning"`` available to every transformers model; idempotent."""
    AttentionInterface.register(ATTENTION_NAME, star_attention_forward)
    return ATTENTION_NAME
