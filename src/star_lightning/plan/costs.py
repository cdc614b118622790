"""FLOPs, bytes and the activation peak of one forward; every coefficient of the cost model lives here.

FLOPs (counted the way the engine runs a forward, ``logits_to_keep=1``):

- linear: ``2 x (projection weights of all layers) x new tokens``, plus ``2 x vocab x hidden`` for the one kept
  position's output projection;
- attention: ``4 x layers x heads x head_dim`` per visible (query, key) pair (``QK^T`` and ``PV``, 2 FLOPs per
  multiply-add); a forward of ``l`` new tokens after ``p`` fully visible prefix keys sees ``l*p + l(l+1)/2`` pairs.

Times divide FLOPs by the matmul rate times :data:`PHASE1_EFFICIENCY` (the fraction of the matmul rate a long
forward reaches end to end) and bytes by the copy bandwidth times :data:`DECODE_EFFICIENCY`. The floors are the same
divisions at efficiency 1.

Activation peak of a forward of ``l`` new tokens (inference: no autograd, so a tensor lives only while referenced).
Counted for transformers' Llama decoder layer, in *elements per new token*, widths ``hidden``, ``q = heads x
head_dim``, ``kv = kv_heads x head_dim`` and ``intermediate``. Alive through every layer: the embedding output (the
model's forward holds it), the layer's input (the model's loop holds it until the layer returns) and the rotary
tables (``ROTARY_TABLES x head_dim``). The peak is the largest of three moments of a layer:

- rotary: ``+ ATTENTION_HIDDEN x hidden + ROTARY_Q x q + ROTARY_KV x kv`` (the normed input; q with ``q*cos``,
  ``rotate_half(q)`` and ``rotate_half(q)*sin``; k and v);
- attention: ``+ ATTENTION_HIDDEN x hidden + (1 + ATTENTION_OUT_Q) x q + ATTENTION_KV x kv`` (q, the kernel's output
  and the output projection's; k, v), or, when a partial over a prefix (the anchor, a ring hop, Phase 2's other
  hosts) is merged in, ``(1 + MERGE_Q) x q`` in place of ``(1 + ATTENTION_OUT_Q) x q``; ring attention adds the K/V
  messages in flight;
- MLP: ``+ MLP_HIDDEN x hidden + MLP_INTERMEDIATE x intermediate`` (the residual and the normed input;
  ``act(gate)``, ``up`` and their product).

These counts match the allocations of transformers' own Llama forward on CPU (``tests/test_plan.py`` profiles one).
The GPU adds what the count leaves out (kernel workspaces, allocator rounding): the counted peak is multiplied by
:data:`ACTIVATION_SCALE` and :data:`ACTIVATION_FIXED_BYTES` is added. Units are elements of the model's dtype; the
merge's float32 temporaries count 2 units each (for 2-byte dtypes). Calibrate against measured peaks
(``torch.cuda.max_memory_allocated``) by changing the constants here, nowhere else.
"""

from __future__ import annotations

from star_lightning.plan.shape import ModelShape

GIB = 1024**3

# --- Activation peak: elements per new token, in units of the named width ------------------------------------------
RESIDENT_HIDDEN = 2.0  # x hidden: the embedding output and the current layer's input, alive through the layer
ROTARY_TABLES = 2.0  # x head_dim: cos and sin, alive through every layer
ATTENTION_HIDDEN = 1.0  # x hidden: the normed input (the residual is the layer's input)
ROTARY_Q = 4.0  # x q: q, q*cos, rotate_half(q), rotate_half(q)*sin
ROTARY_KV = 2.0  # x kv: k and v while q is rotated
ATTENTION_OUT_Q = 2.0  # x q: the kernel's output and the output projection's (besides q itself)
MERGE_Q = 10.0  # x q: merge_pair: both partials (1 + 1), their float32 copies (2 + 2), difference and product (2 + 2)
ATTENTION_KV = 2.0  # x kv: the rotated k and v
MLP_HIDDEN = 2.0  # x hidden: the residual after attention and the normed input
MLP_INTERMEDIATE = 3.0  # x intermediate: act(gate), up, act(gate) * up
# Calibration, fitted to the 35 peaks of benchmarks/results.json (H200, Llama-3.1-8B shape, dense/ring/star, 16K-256K,
# the engine of 2026-11-23; peak = max_memory_allocated): the counted peaks alone are 1.2-4.3% under the measured
# ones; with these two every predicted peak is within 1.7% of its measurement.
ACTIVATION_SCALE = 1.05
ACTIVATION_FIXED_BYTES = 0.525 * GIB

# --- Memory outside the model's tensors ----------------------------------------------------------------------------
RUNTIME_RESERVE_BYTES = 2 * GIB  # CUDA context, NCCL buffers, library workspaces, allocator slack
ANCHOR_SEND_COPIES = 1.0  # anchor_source=broadcast: host 0 keeps each layer's sent message until Phase 1 ends
POSITION_BYTES_PER_TOKEN_LAYER = 8  # star/ring stores: each stored token's int64 position, per layer
RING_MESSAGES = 2.0  # ring: one layer's K/V being sent and one being received, x the host's own chunk K/V

# --- Times ---------------------------------------------------------------------------------------------------------
# Phase 1 end to end reached 63-71% of the bf16 matmul rate (H200, Llama-3.1-8B shape, 32K-256K, cuDNN attention).
PHASE1_EFFICIENCY = 0.68
# Decode bytes moved at ~96% of the copy rate plus a fixed cost per layer per token (kernel launches inside a
# captured graph, ~2,000 small kernels for 32 layers): fitted to 8.1-16.0 ms/token at 16K-256K on one H200 (within
# 1% at every length).
DECODE_EFFICIENCY = 0.96
DECODE_OVERHEAD_S_PER_LAYER = 0.121e-3
# The query's encoding (Phase 2's first forward, eager, new shapes for the kernels) beyond its bytes and FLOPs:
# measured TTFT - Phase 1 was 0.05 s on 2 H200s at 16K-128K (0.08-0.18 s on one, where Phase 1's end is one clock).
QUERY_OVERHEAD_S = 0.05
# Eager decoding (hosts of several GPUs; dense through transformers' own loop before it ran through the engine):
# 18-34 ms/token measured, noisy.
EAGER_DECODE_OVERHEAD_S_PER_LAYER = 0.44e-3


def causal_pairs(tokens: int, prefix: int = 0) -> int:
    """Visible (query, key) pairs of ``tokens`` new tokens, causal among themselves, after ``prefix`` visible keys."""
    return tokens * prefix + tokens * (tokens + 1) // 2


def span_causal_pairs(start: int, stop: int) -> int:
    """Pairs of the tokens at positions ``[start, stop)`` attending causally to every earlier position."""
    return (stop * (stop + 1) - start * (start + 1)) // 2


def linear_flops(shape: ModelShape, tokens: int) -> float:
    """Projections of ``tokens`` tokens through every layer plus the output projection of the one kept position."""
    return 2.0 * shape.matmul_params * tokens + 2.0 * shape.lm_head_params


def attention_flops(shape: ModelShape, pairs: int) -> float:
    return 4.0 * shape.layers * shape.heads * shape.head_dim * pairs


def forward_flops(shape: ModelShape, tokens: int, prefix: int = 0) -> float:
    """One forward of ``tokens`` new tokens after ``prefix`` fully visible keys (causal among the new tokens)."""
    return linear_flops(shape, tokens) + attention_flops(shape, causal_pairs(tokens, prefix))


def counted_activation_bytes(
    shape: ModelShape, tokens: int, *, merged: bool = False, in_flight_bytes: float = 0.0, tensor_parallel: int = 1
) -> float:
    """The tensors alive at the peak of one forward of ``tokens`` new tokens on one GPU, as counted (uncalibrated).

    ``merged``: a partial over a prefix is merged into the attention output (anchor prefix, ring hops, Phase 2).
    ``in_flight_bytes``: messages held during the attention (ring K/V). ``tensor_parallel``: heads and the MLP
    width split over that many GPUs (the hidden-width tensors are whole on each).
    """
    t = tensor_parallel
    resident = RESIDENT_HIDDEN * shape.hidden + ROTARY_TABLES * shape.head_dim
    q, kv, inter = shape.q_width / t, shape.kv_width / t, shape.intermediate / t
    rotary = resident + ATTENTION_HIDDEN * shape.hidden + ROTARY_Q * q + ROTARY_KV * kv
    attention = resident + ATTENTION_HIDDEN * shape.hidden + (1.0 + (MERGE_Q if merged else ATTENTION_OUT_Q)) * q
    attention += ATTENTION_KV * kv
    mlp = resident + MLP_HIDDEN * shape.hidden + MLP_INTERMEDIATE * inter
    per_token = shape.bytes_per_element * tokens
    return max(rotary * per_token, attention * per_token + in_flight_bytes, mlp * per_token)


def activation_bytes(
    shape: ModelShape, tokens: int, *, merged: bool = False, in_flight_bytes: float = 0.0, tensor_parallel: int = 1
) -> float:
    """Predicted activation peak of one forward on one GPU: the counted peak, calibrated (see the module docstring)."""
    counted = counted_activation_bytes(
        shape, tokens, merged=merged, in_flight_bytes=in_flight_bytes, tensor_parallel=tensor_parallel
    )
    return ACTIVATION_SCALE * counted + ACTIVATION_FIXED_BYTES
