"""One GEMM where a layer's projections read the same input: q/k/v, and an MLP's gate/up.

A decode step of a small model is kernel-count bound: seven GEMMs a layer at ~4 us each were most of Gemma-3-270M's
1.3 ms token on an H100 (`benchmarks/profile/*/decode_combine/`). Serving stacks fuse them in their own model code
(vLLM's ``QKVParallelLinear``, gpt-fast's ``wqkv``); here the model is transformers' own, whose attention calls
``self.q_proj(x)``, ``self.k_proj(x)``, ``self.v_proj(x)`` on one tensor. So the three ``nn.Linear`` are replaced by
views of one :class:`FusedLinear` holding the concatenated weight: the first view called with an input computes the
whole product once and each view returns its columns; once every view has been served, nothing is kept (no
activation outlives its layer). Exact: the same products, a GEMM with more output columns.

Applied by :func:`fuse_projections` where it pays and cannot change what a model loads as: one CUDA device, no tensor
parallelism (whose plans name ``q_proj``...). Modules whose projections differ in input size, dtype, device or
kind (an ``nn.Linear`` subclass, a quantized layer) are left as they are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Sets of projections that read the same input, by attribute name, in the order of their output columns.
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class FusedLinear(nn.Module):
    """The concatenated weight (and bias) of several ``nn.Linear`` that read one input."""

    def __init__(self, linears: Sequence[nn.Linear]) -> None:
        super().__init__()
        self.sections = [linear.out_features for linear in linears]
        weights: list[Tensor] = [linear.weight for linear in linears]
        self.weight = nn.Parameter(torch.cat(weights), requires_grad=False)
        biases = [linear.bias for linear in linears]
        if any(bias is not None for bias in biases):
            parts: list[Tensor] = [
                bias if bias is not None else linear.weight.new_zeros(linear.out_features)
                for linear, bias in zip(linears, biases, strict=True)
            ]
            self.bias: nn.Parameter | None = nn.Parameter(torch.cat(parts), requires_grad=False)
        else:
            self.bias = None
        self._input: Tensor | None = None
        self._parts: tuple[Tensor, ...] = ()
        self._served = 0

    def part(self, index: int, x: Tensor) -> Tensor:
        """Columns ``index`` of the product with ``x``: computed when ``x`` is new, dropped once all are served."""
        if self._input is not x:
            self._parts = tuple(F.linear(x, self.weight, self.bias).split(self.sections, dim=-1))
            self._input, self._served = x, 0
        part = self._parts[index]
        self._served += 1
        if self._served == len(self.sections):
            self._input, self._parts, self._served = None, (), 0
        return part


class FusedView(nn.Module):
    """What stands where one of the fused ``nn.Linear`` stood: its columns of the fused product."""

    def __init__(self, fused: FusedLinear, index: int, in_features: int, out_features: int) -> None:
        super().__init__()
        object.__setattr__(self, "fused", fused)  # not a child: the weight belongs to the parent's FusedLinear
        self.index, self.in_features, self.out_features = index, in_features, out_features

    def forward(self, x: Tensor) -> Tensor:
        fused: FusedLinear = self.__dict__["fused"]
        return fused.part(self.index, x)


def _fusable(candidates: Sequence[object]) -> list[nn.Linear] | None:
    """The projections when they can be fused: plain ``nn.Linear`` of one input size, dtype and device."""
    linears = [linear for linear in candidates if type(linear) is nn.Linear]
    if len(linears) != len(candidates):
        return None
    first = linears[0]
    same = all(
        linear.in_features == first.in_features
        and linear.weight.dtype == first.weight.dtype
        and linear.weight.device == first.weight.device
        for linear in linears
    )
    return linears if same else None


def fuse_projections(model: nn.Module) -> int:
    """Fuse every group of :data:`GROUPS` found on a module of ``model``; how many groups were fused."""
    fused_groups = 0
    for module in list(model.modules()):
        for names in GROUPS:
            linears = _fusable([getattr(module, name, None) for name in names])
            if linears is None:
                continue
            fused = FusedLinear(linears)
            module.add_module("_".join(names) + "_fused", fused)
            for index, (name, linear) in enumerate(zip(names, linears, strict=True)):
                setattr(module, name, FusedView(fused, index, linear.in_features, linear.out_features))
            fused_groups += 1
    return fused_groups
