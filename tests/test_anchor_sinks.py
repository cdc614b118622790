"""What host 0 keeps of each layer's prefix while Phase 1 runs: one copy of its K/V and the selection queries alone.

Found on an H200 as +9 to +12 GB of host 0's peak with passing tokens (Llama-3.1-8B shape, blocks of 32K): the kept
selection queries were views of the forward's whole query (every layer's stayed alive), and with the query in the
anchor the prefix's K/V were kept twice (the appended copy and the message sent)."""

from __future__ import annotations

import torch

from star_lightning.attention.anchor import BroadcastAnchor, KeptAnchor
from star_lightning.parallel.simulated_group import AnchorBoard, SimulatedHostGroup


def _forward_tensors(length: int = 64, prefix: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    query = torch.randn(1, 4, length, 16)  # [B, Hq, L, D]: the forward's whole query
    keys, values = torch.randn(2, 1, 2, prefix, 16).unbind(0)  # [B, Hkv, P, D]
    return query, keys, values


def test_a_kept_selection_does_not_keep_the_forwards_query_alive() -> None:
    query, keys, values = _forward_tensors()
    selection = query[:, :, 40:44]  # [B, Hq, s, D]: a view of the whole query
    sink = KeptAnchor(num_layers=1, length=keys.shape[2])
    sink.put(0, keys, values, selection)
    kept = sink.selection(0, keys)
    assert kept is not None and torch.equal(kept, selection)
    assert kept.untyped_storage().nbytes() == kept.numel() * kept.element_size()


def test_the_broadcasting_host_keeps_the_prefix_once_and_sends_the_same_values() -> None:
    query, keys, values = _forward_tensors()
    board = AnchorBoard()
    sink = BroadcastAnchor(num_layers=1, length=keys.shape[2], group=SimulatedHostGroup(0, 3, board))
    sink.put(0, keys.clone(), values.clone(), query[:, :, 40:44])
    kept_keys, kept_values = sink.kv(0, keys)
    assert torch.equal(kept_keys, keys) and torch.equal(kept_values, values)
    message, selection = board.messages  # the layer's K/V, then its selection queries
    assert kept_keys.untyped_storage().data_ptr() == message.untyped_storage().data_ptr()  # one copy: the message
    assert kept_values.untyped_storage().data_ptr() == message.untyped_storage().data_ptr()
    assert torch.equal(selection, query[:, :, 40:44])
    assert selection.untyped_storage().nbytes() == selection.numel() * selection.element_size()
    sink.finish()
