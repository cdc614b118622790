"""One file per attention backend, each with the same entry::

    attention(query, key, value, *, scale, causal, softcap=None, valid_length=None, window=None, kernels=None)
        -> (out [B, Hq, Lq, Dv] in the query's dtype, lse [B, Hq, Lq] natural log, float32 or float64)

``math`` (the float32/64 reference), ``banded`` (CPU windows as tiles of ``math``), ``sdpa`` (PyTorch's flash and
cuDNN kernels), ``flash`` (the flash-attn package), ``flex`` (FlexAttention), ``sdpa_masked`` (a mask as a bias),
``window_causal`` (an aligned window as two causal calls) and ``triton_decode`` (split-KV for a few query rows).
:mod:`star_lightning.attention.selector` picks one per shape class of call; a backend is handed only calls it was
chosen for (it checks nothing the selector decided).
"""

from __future__ import annotations

import torch
from torch import Tensor


def lse_dtype(query: Tensor) -> torch.dtype:
    """The log-sum-exp's dtype: float64 for float64 queries, else float32."""
    return torch.float64 if query.dtype == torch.float64 else torch.float32
