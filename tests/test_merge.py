"""The exact merge and the log-sum-exp kernels against float64 softmax attention."""

from __future__ import annotations

import pytest
import torch

from star_lightning.attention.kernels import KernelChoice, attention_with_lse
from star_lightning.attention.merge import merge_pair, merge_partials


def _reference(q, k, v, scale, causal):
    """Plain float64 softmax attention with a bottom-right causal mask; GQA by repeating heads."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) * scale  # [B, H, Lq, Lk]
    if causal:
        lq, lk = q.shape[2], k.shape[2]
        hidden = torch.arange(lk)[None, :] > (torch.arange(lq)[:, None] + lk - lq)
        scores = scores.masked_fill(hidden, float("-inf"))
    return torch.softmax(scores, -1) @ v, torch.logsumexp(scores, -1)


def _qkv(lq: int, lk: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, lq, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, lk, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, lk, 8, generator=g, dtype=torch.float64)
    return q, k, v


@pytest.mark.parametrize(("lq", "lk", "causal"), [(5, 5, True), (3, 11, True), (1, 9, False), (4, 7, False)])
def test_math_kernel_matches_reference(lq: int, lk: int, causal: bool) -> None:
    q, k, v = _qkv(lq, lk, seed=lq * 100 + lk)
    out, lse = attention_with_lse(q, k, v, scale=0.3, causal=causal, kernels=KernelChoice("math"))
    ref_out, ref_lse = _reference(q, k, v, 0.3, causal)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


@pytest.mark.parametrize("splits", [[4], [1, 3], [2, 2, 5], [3, 1, 1, 4]])
def test_merging_any_split_of_the_keys_equals_attention_over_all(splits: list[int]) -> None:
    q, k, v = _qkv(3, sum(splits), seed=len(splits))
    outs, lses, start = [], [], 0
    for size in splits:
        out, lse = attention_with_lse(
            q, k[:, :, start : start + size], v[:, :, start : start + size], scale=0.5, causal=False
        )
        outs.append(out)
        lses.append(lse)
        start += size
    merged, merged_lse = merge_partials(torch.stack(outs), torch.stack(lses))
    ref_out, ref_lse = _reference(q, k, v, 0.5, causal=False)
    torch.testing.assert_close(merged, ref_out)
    torch.testing.assert_close(merged_lse, ref_lse)


def test_merge_is_overflow_free_and_ignores_empty_partials() -> None:
    out_a, out_b = torch.ones(1, 1, 2, 4), torch.full((1, 1, 2, 4), 3.0)
    lse_a, lse_b = torch.tensor([[[1000.0, -1000.0]]]), torch.tensor([[[-1000.0, 1000.0]]])
    out, lse = merge_pair(out_a, lse_a, out_b, lse_b)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out[..., 0, :], out_a[..., 0, :])
    torch.testing.assert_close(out[..., 1, :], out_b[..., 1, :])
    empty = torch.full((1, 1, 2), float("-inf"))
    for first, second in ((empty, lse_b), (lse_b, empty)):
        merged, merged_lse = merge_pair(
            out_b if first is lse_b else out_a, first, out_b if second is lse_b else out_a, second
        )
        torch.testing.assert_close(merged, out_b)
        torch.testing.assert_close(merged_lse, lse_b)


def test_no_keys_gives_an_empty_partial() -> None:
    q, k, v = _qkv(2, 0, seed=1)
    out, lse = attention_with_lse(q, k, v, scale=1.0, causal=False)
    assert torch.isneginf(lse).all() and (out == 0).all()


def test_merging_many_partials_is_overflow_free_and_ignores_empty_ones() -> None:
    """Phase 2's N-way merge: huge lse gaps, empty hosts, all-empty rows; and the same as folding pairs."""
    g = torch.Generator().manual_seed(7)
    outs = torch.randn(4, 1, 2, 3, 5, generator=g)
    lses = torch.tensor([1000.0, -1000.0, float("-inf"), 0.5]).view(4, 1, 1, 1).expand(4, 1, 2, 3).clone()
    lses[:, 0, 1, 2] = float("-inf")  # a row no host has keys for
    out, lse = merge_partials(outs, lses)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 0, :2], outs[0, 0, 0, :2])  # the 1000 partial dominates
    assert torch.isneginf(lse[0, 1, 2]) and (out[0, 1, 2] == 0).all()
    folded, folded_lse = outs[0], lses[0]
    for i in range(1, 4):
        folded, folded_lse = merge_pair(folded, folded_lse, outs[i], lses[i])
    seen = torch.isfinite(lse)  # rows with keys somewhere: the fold's answer (it has no rule for all-empty rows)
    torch.testing.assert_close(out[seen], folded[seen])
    torch.testing.assert_close(lse, folded_lse)
