"""Split-KV attention with log-sum-exp for a few query tokens over a long cache (Phase 2 decoding), in Triton.

One decode token gives one query row per head: a kernel that walks the cache once per head leaves most of the GPU
idle. Here the cache is cut into ``S`` splits and every program handles one (batch, KV head, split): it loads each
K/V tile once for all the query heads of its group (GQA) and all query positions, keeps an online softmax, and
writes a partial ``(out, lse)``. The partials are merged over the splits with the same exact arithmetic as the
Phase 2 merge. The number of splits depends only on the cache's capacity, and the number of valid keys can be read
from a device tensor, so a captured CUDA graph replays it unchanged as the cache grows. A short Phase 2 question
(up to ``MAX_CHUNKS`` tiles of rows) runs tile by tile, each tile's positions seeing their own causal prefix.

The same combine kernel, given strides, merges every host's partials in Phase 2 (:func:`merge_partials`): one
kernel per layer where the torch form is about a dozen, which inside a decode step's CUDA graph is ~1 ms a token
(measured on 4 hosts' partials: 7.80 -> 6.74 ms on an H200).

Importing this module needs Triton (present wherever PyTorch has CUDA); :func:`available` says whether it can run.
"""

from __future__ import annotations

import importlib.util
import itertools
import math

import torch
from torch import Tensor

from star_lightning.attention.window import SlidingWindow

_TRITON = importlib.util.find_spec("triton") is not None

if _TRITON:
    import triton
    import triton.language as tl

    # Lengths and counts are not specialised on (a new query length must not compile a new kernel: ~1 s each)
    @triton.jit(do_not_specialize=["q_len", "rows", "num_splits", "key_shift", "window"])
    def _split_kv_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        valid_ptr,
        qpos_ptr,
        kpos_ptr,
        out_ptr,
        lse_ptr,
        stride_qb,
        stride_qh,
        stride_qm,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_vb,
        stride_vh,
        stride_vn,
        kv_heads,
        q_len,
        rows,
        split_len,
        num_splits,
        key_shift,
        window,
        scale_log2,
        CAUSAL: tl.constexpr,
        WINDOWED: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        HEAD_DIM: tl.constexpr,
    ):
        pid_bh = tl.program_id(0)
        split = tl.program_id(1)
        b = pid_bh // kv_heads
        kvh = pid_bh % kv_heads
        groups = rows // q_len
        # keys this chunk of the query may see: the valid ones (the rest of the buffer is unused) less the key_shift
        # last keys, which only later query positions see (causal, bottom-right aligned)
        valid = tl.load(valid_ptr).to(tl.int32) - key_shift

        offs_m = tl.arange(0, BLOCK_M)  # row = g * q_len + i: query head kvh * groups + g, query position i
        offs_d = tl.arange(0, BLOCK_D)
        head = kvh * groups + offs_m // q_len
        qpos = offs_m % q_len
        row_ok = offs_m < rows
        d_ok = offs_d < HEAD_DIM
        q_ptrs = q_ptr + b * stride_qb + head[:, None] * stride_qh + qpos[:, None] * stride_qm + offs_d[None, :]
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [M, D]
        if CAUSAL:
            last = valid - q_len + qpos  # last visible key of each row (bottom-right aligned)
        else:
            last = tl.zeros([BLOCK_M], dtype=tl.int32) + valid - 1
        if WINDOWED:  # a sliding window by true positions: the query at p sees keys at k with p - window < k <= p
            q_at = tl.load(qpos_ptr + qpos, mask=row_ok, other=0)  # [M]

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        start = split * split_len
        stop = tl.minimum(start + split_len, valid)
        k_base = k_ptr + b * stride_kb + kvh * stride_kh
        v_base = v_ptr + b * stride_vb + kvh * stride_vh
        for n0 in range(start, stop, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < stop
            k = tl.load(
                k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0
            )  # [N, D]
            s = tl.dot(q, tl.trans(k)) * scale_log2  # [M, N], base-2 logits
            visible = (offs_n[None, :] <= last[:, None]) & n_ok[None, :]
            if WINDOWED:
                k_at = tl.load(kpos_ptr + offs_n, mask=n_ok, other=0)  # [N]
                visible = visible & (k_at[None, :] <= q_at[:, None]) & (k_at[None, :] > q_at[:, None] - window)
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])  # [M, N]
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(
                v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0
            )  # [N, D]
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new

        has = l_i > 0.0
        out = tl.where(has[:, None], acc / tl.where(has, l_i, 1.0)[:, None], 0.0)
        lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        # partials: out [B, Hkv, S, M, D] and lse [B, Hkv, S, M], contiguous float32
        base = (pid_bh * num_splits + split) * rows
        tl.store(
            out_ptr + (base + offs_m)[:, None] * HEAD_DIM + offs_d[None, :], out, mask=row_ok[:, None] & d_ok[None, :]
        )
        tl.store(lse_ptr + base + offs_m, lse, mask=row_ok)

    @triton.jit(do_not_specialize=["num_parts", "rows"])
    def _combine_kernel(
        part_out_ptr,
        part_lse_ptr,
        out_ptr,
        lse_ptr,
        num_parts,
        rows,
        stride_og,
        stride_op,
        stride_or,
        stride_lg,
        stride_lp,
        stride_lr,
        BLOCK_S: tl.constexpr,
        BLOCK_D: tl.constexpr,
        HEAD_DIM: tl.constexpr,
    ):
        """Merge one row's partials exactly: lse = logsumexp_s(lse_s), out = sum_s exp(lse_s - lse) out_s.

        Row ``i`` is (group ``i // rows``, row ``i % rows``); partial ``s`` of it is at ``g * stride_og + s *
        stride_op + r * stride_or`` (``stride_l*`` for the lse), so one kernel reads the split-KV partials
        ``[B * Hkv, S, rows, D]``, every host's stacked partials ``[N, R, D]`` and broadcast views (stride 0).
        Program (row, d) handles ``BLOCK_D`` of the row's dims and walks the partials ``BLOCK_S`` at a time: a
        decode token's hundreds of splits are not held in one program's registers (they were, at ~22 us a call for
        Gemma-3's 256-wide heads on an H100)."""
        row = tl.program_id(0)
        g = row // rows
        r = row % rows
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        lse_base = part_lse_ptr + g * stride_lg + r * stride_lr
        out_base = part_out_ptr + g * stride_og + r * stride_or
        top_s = tl.full([BLOCK_S], float("-inf"), tl.float32)
        for start in range(0, num_parts, BLOCK_S):
            offs_s = start + tl.arange(0, BLOCK_S)
            lse_s = tl.load(lse_base + offs_s * stride_lp, mask=offs_s < num_parts, other=float("-inf"))
            top_s = tl.maximum(top_s, lse_s)
        top = tl.max(top_s, axis=0)
        top_safe = tl.where(top == float("-inf"), 0.0, top)
        total_s = tl.zeros([BLOCK_S], tl.float32)
        acc = tl.zeros([BLOCK_D], tl.float32)
        for start in range(0, num_parts, BLOCK_S):
            offs_s = start + tl.arange(0, BLOCK_S)
            s_ok = offs_s < num_parts
            lse_s = tl.load(lse_base + offs_s * stride_lp, mask=s_ok, other=float("-inf"))
            w = tl.exp(lse_s - top_safe)  # [S]; empty partials weigh 0
            total_s += w
            parts = tl.load(
                out_base + offs_s[:, None] * stride_op + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0
            ).to(tl.float32)
            acc += tl.sum(parts * w[:, None], axis=0)  # [D]
        total = tl.sum(total_s, axis=0)
        has = total > 0.0
        out = tl.where(has, acc / tl.where(has, total, 1.0), 0.0)
        lse = tl.where(has, top_safe + tl.log(tl.where(has, total, 1.0)), float("-inf"))
        tl.store(out_ptr + row * HEAD_DIM + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_ok)
        tl.store(lse_ptr + row, lse, mask=tl.program_id(1) == 0)


# Rows (query heads per KV head x query tokens) the kernel handles in one tile; a longer query runs as up to
# MAX_CHUNKS tiles (each reads the cache once more), a longer one still goes elsewhere.
MAX_ROWS = 64
MAX_CHUNKS = 4
_BLOCK_N = 64
_MAX_PARTS = 1024  # partials one combine merges (hosts or splits)
_COMBINE_S, _COMBINE_D = 16, 64  # a combine program's tile: partials at a time x dims


def available() -> bool:
    return _TRITON and torch.cuda.is_available()


def supports(query: Tensor, key: Tensor, value: Tensor) -> bool:
    """Whether :func:`split_kv_attention` takes this call (CUDA, fp16/bf16, at most ``MAX_CHUNKS`` tiles of
    ``MAX_ROWS`` query rows per KV head: a decode token, or a short Phase 2 query)."""
    groups = query.shape[1] // key.shape[1]
    return (
        available()
        and query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16)
        and key.dtype == query.dtype == value.dtype
        and groups <= MAX_ROWS
        and query.shape[2] <= MAX_CHUNKS * (MAX_ROWS // groups)
        and query.shape[-1] <= 256
        and key.shape[-1] == value.shape[-1] == query.shape[-1]
        and query.stride(-1) == key.stride(-1) == value.stride(-1) == 1
    )


def num_splits(batch: int, kv_heads: int, capacity: int, device: torch.device) -> tuple[int, int]:
    """(splits, keys per split): about four programs per multiprocessor, each at least one tile of keys."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = max(1, math.ceil(4 * sms / max(1, batch * kv_heads)))
    split_len = max(_BLOCK_N, math.ceil(capacity / want / _BLOCK_N) * _BLOCK_N)
    return math.ceil(capacity / split_len), split_len


def split_kv_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    scale: float,
    causal: bool,
    valid_length: Tensor | None = None,
    window: SlidingWindow | None = None,
) -> tuple[Tensor, Tensor]:
    """``query`` ``[B, Hq, Lq, D]`` over the first ``valid_length`` keys of ``key``/``value`` ``[B, Hkv, Lk, D]``.

    ``valid_length`` is a one-element integer tensor on the GPU (no host sync; default: all ``Lk`` keys). With
    ``window`` a sliding window applies too, by the query's and keys' true positions (read on the device, so a
    captured step replays new positions); a row that sees no key gets ``out = 0``, ``lse = -inf``.
    Returns ``out`` ``[B, Hq, Lq, D]`` in the query's dtype and ``lse`` ``[B, Hq, Lq]`` float32 (natural log).
    A query of more than one tile of rows runs tile by tile, each chunk of positions seeing its causal prefix.
    """
    # Triton launches on the current device: make it the tensors' own (a model spread over several GPUs has layers
    # on devices other than the current one, and a launch there would run on the wrong device's stream).
    with torch.cuda.device(query.device):
        if valid_length is None:
            valid_length = torch.full((1,), key.shape[2], dtype=torch.int32, device=query.device)
        q_len = query.shape[2]
        chunk = max(1, MAX_ROWS // (query.shape[1] // key.shape[1]))
        if q_len <= chunk:
            return _split_kv_attention(
                query, key, value, scale=scale, causal=causal, valid_length=valid_length, window=window
            )
        outs, lses = [], []
        for start in range(0, q_len, chunk):
            stop = min(q_len, start + chunk)
            part = None if window is None else window.part(slice(start, stop))  # the chunk's query positions
            out, lse = _split_kv_attention(
                query[:, :, start:stop], key, value, scale=scale, causal=causal, valid_length=valid_length,
                key_shift=q_len - stop if causal else 0, window=part,
            )  # fmt: skip
            outs.append(out)
            lses.append(lse)
        return torch.cat(outs, dim=2), torch.cat(lses, dim=2)  # [B, Hq, Lq, D], [B, Hq, Lq]


def _split_kv_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    scale: float,
    causal: bool,
    valid_length: Tensor,
    key_shift: int = 0,
    window: SlidingWindow | None = None,
) -> tuple[Tensor, Tensor]:
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads, capacity = key.shape[1], key.shape[2]
    groups = q_heads // kv_heads
    rows = groups * q_len
    splits, split_len = num_splits(batch, kv_heads, capacity, query.device)
    part_out = torch.empty(batch, kv_heads, splits, rows, head_dim, device=query.device, dtype=torch.float32)
    part_lse = torch.empty(batch, kv_heads, splits, rows, device=query.device, dtype=torch.float32)
    block_m = max(16, triton.next_power_of_2(rows))
    block_d = triton.next_power_of_2(head_dim)
    _split_kv_kernel[(batch * kv_heads, splits)](
        query,
        key,
        value,
        valid_length,
        valid_length if window is None else window.query_positions.contiguous(),  # read only when WINDOWED
        valid_length if window is None else window.key_positions.contiguous(),
        part_out,
        part_lse,
        query.stride(0),
        query.stride(1),
        query.stride(2),
        key.stride(0),
        key.stride(1),
        key.stride(2),
        value.stride(0),
        value.stride(1),
        value.stride(2),
        kv_heads,
        q_len,
        rows,
        split_len,
        splits,
        key_shift,
        0 if window is None else window.size,
        scale * 1.4426950408889634,
        CAUSAL=causal,
        WINDOWED=window is not None,
        BLOCK_M=block_m,
        BLOCK_N=_BLOCK_N,
        BLOCK_D=block_d,
        HEAD_DIM=head_dim,
        num_warps=4,
        num_stages=3,
    )
    out = torch.empty(batch, kv_heads, rows, head_dim, device=query.device, dtype=query.dtype)  # [B, Hkv, M, D]
    lse = torch.empty(batch, kv_heads, rows, device=query.device, dtype=torch.float32)  # [B, Hkv, M]
    _combine_kernel[(batch * kv_heads * rows, triton.cdiv(head_dim, _COMBINE_D))](
        part_out,
        part_lse,
        out,
        lse,
        splits,
        rows,
        splits * rows * head_dim,
        rows * head_dim,
        head_dim,
        splits * rows,
        rows,
        1,
        BLOCK_S=min(_COMBINE_S, triton.next_power_of_2(splits)),
        BLOCK_D=min(_COMBINE_D, block_d),
        HEAD_DIM=head_dim,
        num_warps=2,
    )
    # rows are (group, position), so the views are [B, Hq, Lq, D] and [B, Hq, Lq]
    return out.view(batch, q_heads, q_len, head_dim), lse.view(batch, q_heads, q_len)


def merge_supports(outs: Tensor, lses: Tensor) -> bool:
    """Whether :func:`merge_partials` takes these stacked partials: CUDA, float32 lse, every partial's rows evenly
    strided (a stacked, gathered or broadcast tensor), and small enough for 32-bit offsets."""
    if not (available() and outs.is_cuda and lses.is_cuda and lses.dtype == torch.float32):
        return False
    if outs.dtype not in (torch.float16, torch.bfloat16, torch.float32) or outs.shape[-1] > 256:
        return False
    if outs.shape[0] > _MAX_PARTS or outs.stride(-1) != 1:
        return False
    last_offset = sum((size - 1) * abs(stride) for size, stride in zip(outs.shape, outs.stride(), strict=True))
    return last_offset < 2**31 and _row_stride(outs[0], 1) is not None and _row_stride(lses[0], 0) is not None


def _row_stride(x: Tensor, trailing: int) -> int | None:
    """The stride between consecutive rows of ``x`` when its leading dims (all but ``trailing`` last ones) flatten
    to one evenly strided row index; ``None`` where they do not."""
    lead = [(size, stride) for size, stride in zip(x.shape, x.stride(), strict=True)][: x.dim() - trailing]
    lead = [(size, stride) for size, stride in lead if size != 1]
    if not lead:
        return 0  # a single row
    for (_, outer), (size, inner) in itertools.pairwise(lead):
        if outer != inner * size:
            return None
    return lead[-1][1]


def merge_partials(outs: Tensor, lses: Tensor) -> tuple[Tensor, Tensor]:
    """Every host's partials merged in one kernel: ``outs`` ``[N, ..., D]``, ``lses`` ``[N, ...]`` (float32) ->
    ``out`` ``[..., D]`` in ``outs``' dtype and ``lse`` ``[...]`` float32; the arithmetic of
    :func:`star_lightning.attention.merge.merge_partials` (its torch form is the reference the tests hold this to)."""
    with torch.cuda.device(outs.device):
        parts, head_dim = outs.shape[0], outs.shape[-1]
        rows = lses[0].numel()
        out = torch.empty(outs.shape[1:], device=outs.device, dtype=outs.dtype)  # [..., D]
        lse = torch.empty(lses.shape[1:], device=lses.device, dtype=torch.float32)  # [...]
        _combine_kernel[(rows, triton.cdiv(head_dim, _COMBINE_D))](
            outs,
            lses,
            out,
            lse,
            parts,
            rows,
            0,
            outs.stride(0),
            _row_stride(outs[0], 1),
            0,
            lses.stride(0),
            _row_stride(lses[0], 0),
            BLOCK_S=min(_COMBINE_S, max(2, triton.next_power_of_2(parts))),
            BLOCK_D=min(_COMBINE_D, triton.next_power_of_2(head_dim)),
            HEAD_DIM=head_dim,
            num_warps=2,
        )
        return out, lse
