"""Rotary embeddings whose scaling regime depends on the sequence length, pinned to the request's prompt length.

transformers' ``dynamic_rope_update`` (``dynamic`` NTK scaling; Phi-3's ``longrope``, which switches from the short
to the long factors past ``original_max_position_embeddings``) recomputes a rotary module's frequencies in every
forward from ``max(position_ids) + 1``. Dense attention encodes the prompt (context + query) in one forward, so every
prompt token is rotated for seq_len = prompt length, and each generated token for its own position + 1. Star and
ring encode blocks, chunks and the query in separate forwards: left alone, a block far from the end would be rotated
for a shorter length, in another regime than dense. Within :func:`pinned_rope_length`, every forward sees
``max(max(position_ids) + 1, prompt length)`` instead, which is dense's rule for every token of the request.

transformers' ``dynamic`` rope also keeps state between forwards (frequencies grown for the longest sequence seen
are kept until a sequence shorter than the original length resets them), so a request's result would depend on the
requests before it (on resuming, on how data-parallel ranks split the requests). A pinned forward starts from the
original frequencies every time: each request gets what a fresh model gives it.

Llama-3, YaRN, linear and default rope are static (no sequence-length dependence): nothing is pinned for them.

Mechanism (the same in transformers 5.17 and 5.23): a rotary module's forward is decorated by
``dynamic_rope_update``, whose wrapper updates the frequencies from the positions it is given and then calls the
undecorated forward (kept as ``__wrapped__`` by ``functools.wraps``). A pinned module first runs its decorated
forward on position 0 (seq_len 1: transformers' own reset to the original frequencies), then on the single position
``max(max(position_ids), length - 1)`` (the update sees the pinned length), discarding those two one-token rotations,
and then the undecorated forward on the real positions with the frequencies so set. The instance's previous
``forward`` is restored on exit (pins nest).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from transformers.modeling_rope_utils import dynamic_rope_update

# The code object every ``dynamic_rope_update`` wrapper shares: how a decorated forward is recognised in a chain of
# decorators (``torch.no_grad`` wraps it too).
_UPDATE_WRAPPER_CODE = dynamic_rope_update(lambda self, x, position_ids: None).__code__
_LENGTH_DEPENDENT = ("dynamic", "longrope")


def _rope_types(module: nn.Module) -> list[str]:
    rope_type = getattr(module, "rope_type", None)
    values = rope_type.values() if isinstance(rope_type, dict) else [rope_type]  # per layer type (Gemma-3 style)
    return [str(value) for value in values if value is not None]


def _undecorated_forward(module: nn.Module) -> Callable[..., Any] | None:
    """The rotary forward under ``dynamic_rope_update``'s wrapper, or None when the module's forward has none."""
    function: Any = type(module).forward
    while function is not None:
        if getattr(function, "__code__", None) is _UPDATE_WRAPPER_CODE:
            return getattr(function, "__wrapped__", None)
        function = getattr(function, "__wrapped__", None)
    return None


def length_dependent_rotary_modules(model: nn.Module) -> list[nn.Module]:
    """The model's rotary modules whose frequencies follow the sequence length (``dynamic``, ``longrope``)."""
    found = []
    for module in model.modules():
        if any(kind in rope for rope in _rope_types(module) for kind in _LENGTH_DEPENDENT):
            if _undecorated_forward(module) is not None:
                found.append(module)
    return found


def rope_length_key(model: nn.Module, prompt_length: int) -> int | None:
    """The length that shapes an encoded context's K/V besides its tokens: the prompt length when the model's rope
    depends on it, else None (a context encoded for one query then answers any other)."""
    return prompt_length if length_dependent_rotary_modules(model) else None


def _pinned_forward(module: nn.Module, undecorated: Callable[..., Any], length: int) -> Callable[..., Tensor]:
    decorated = type(module).forward

    def forward(x: Tensor, position_ids: Tensor, layer_type: str | None = None) -> Any:
        kwargs = {} if layer_type is None else {"layer_type": layer_type}
        with torch.no_grad():
            decorated(module, x, torch.zeros_like(position_ids[:1, :1]), **kwargs)  # [1, 1]: back to the original
            pinned = torch.clamp(position_ids.max(), min=length - 1).reshape(1, 1)  # [1, 1], no host sync
            decorated(module, x, pinned, **kwargs)  # the frequencies for max(max + 1, length)
            return undecorated(module, x, position_ids, **kwargs)

    return forward


@contextmanager
def pinned_rope_length(model: nn.Module, length: int | None) -> Iterator[None]:
    """Every forward inside rotates for ``max(max(position_ids) + 1, length)`` (``length``: the prompt's); no effect
    for static rope or ``length`` None."""
    modules = [] if length is None else length_dependent_rotary_modules(model)
    previous = [module.__dict__.get("forward") for module in modules]  # an outer pin's, or none
    for module in modules:
        undecorated = _undecorated_forward(module)
        assert undecorated is not None and length is not None
        module.forward = _pinned_forward(module, undecorated, length)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for module, forward in zip(modules, previous, strict=True):
            if forward is None:
                del module.forward
            else:
                module.forward = forward  # type: ignore[method-assign]
