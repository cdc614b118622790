"""Passing tokens: in Phase 1 every host hands the hosts after it a few of its block's tokens, chosen by the query.

APB (Huang et al., ACL 2025) closed most of Star Attention's accuracy gap by letting each host pass a compressed part
of its block to the hosts after it; its compressor is a trained per-model module. The choice here is training-free,
SnapKV's rule (Li et al., 2024): keep the tokens the *selection queries* attend to most. The selection queries are
the request's query tokens in the anchor (``--model.anchor_query true``), else the anchor's last
:data:`SELECTION_WINDOW` tokens. At every layer, once a host has its block's keys (:func:`select_passing`):

1. ``p`` = the softmax of the selection queries' scores over everything they are given: the anchor prefix's keys and
   the host's candidate keys (its block; the first host's block without the anchor itself, which every host has);
2. a candidate's score: ``p`` summed over the selection queries and over the query heads (``shared``: one choice for
   every head) or over the query heads of each KV head (``per_head``: each KV head chooses its own tokens);
3. the score max-pooled over ``pool_kernel`` neighbouring positions, so a needle's neighbours come with it;
4. the ``tokens`` best pooled scores (a tie goes to the earlier position), in position order.

The group all-gathers every host's choice (:class:`PassingExchange`, one fixed-size message per layer: unused slots
carry position -1). Host ``h`` then attends, besides the anchor (and query) and its own block, to the tokens of hosts
``0..h-1``, each at its true position; a host never sees a token from later in the context. Passing tokens are not
stored: their owner keeps them with its block for Phase 2. With one host nothing is passed: it is exactly Star.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from star_lightning.engine.settings import SELECTIONS, Selection
from star_lightning.parallel.group import ContextGroup, Transfer
from star_lightning.partition import SELECTION_WINDOW

__all__ = ["SELECTION_WINDOW", "PassedTokens", "PassingExchange", "PassingSettings", "select_passing"]


@dataclass(frozen=True)
class PassingSettings:
    """``tokens`` per host and layer (0: off), how heads choose, the pooling kernel (odd; 1 = no pooling)."""

    tokens: int = 0
    selection: Selection = "shared"
    pool_kernel: int = 7

    def __post_init__(self) -> None:
        if self.selection not in SELECTIONS:
            raise ValueError(f"passing_selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        if self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            raise ValueError(f"passing_pool_kernel must be an odd number >= 1, got {self.pool_kernel}")


@dataclass(frozen=True)
class PassedTokens:
    """Keys and values ``[B, Hkv, m, D]`` and their true positions ``[Hkv, m]`` (the same row for every head when
    the choice is shared)."""

    keys: Tensor
    values: Tensor
    positions: Tensor
    shared: bool = True


def candidate_scores(
    selection_queries: Tensor, prefix_keys: Tensor, candidate_keys: Tensor, *, scale: float, softcap: float | None
) -> Tensor:
    """``[B, Hq, n]``: the attention mass the selection queries ``[B, Hq, s, D]`` of each query head give each of the
    ``n`` candidate keys ``[B, Hkv, n, D]``, normalised over the prefix keys ``[B, Hkv, P, D]`` and the candidates."""
    batch, q_heads, length, _ = selection_queries.shape
    kv_heads, count = candidate_keys.shape[1], candidate_keys.shape[2]
    dtype = torch.float64 if selection_queries.dtype == torch.float64 else torch.float32
    queries = selection_queries.to(dtype).reshape(batch, kv_heads, -1, selection_queries.shape[-1])  # [B, Hkv, G*s, D]

    def logits(keys: Tensor) -> Tensor:
        scores = torch.matmul(queries, keys.to(dtype).transpose(-1, -2)) * scale  # [B, Hkv, G*s, k]
        return torch.tanh(scores / softcap) * softcap if softcap is not None else scores

    candidates = logits(candidate_keys)  # [B, Hkv, G*s, n]
    total = torch.logsumexp(candidates, dim=-1)  # [B, Hkv, G*s]
    if prefix_keys.shape[2]:
        total = torch.logaddexp(total, torch.logsumexp(logits(prefix_keys), dim=-1))
    mass = torch.exp(candidates - total.unsqueeze(-1))  # [B, Hkv, G*s, n]
    return mass.view(batch, q_heads, length, count).sum(dim=2)  # [B, Hq, n]


def choose(scores: Tensor, tokens: int, kv_heads: int, settings: PassingSettings) -> Tensor:
    """The chosen candidates ``[B, 1 or Hkv, k]`` (indices, in position order) from ``scores`` ``[B, Hq, n]``."""
    batch, q_heads, count = scores.shape
    if settings.selection == "per_head":
        pooled = scores.view(batch, kv_heads, q_heads // kv_heads, count).sum(dim=2)  # [B, Hkv, n]
    else:
        pooled = scores.sum(dim=1, keepdim=True)  # [B, 1, n]
    if settings.pool_kernel > 1:
        kernel = settings.pool_kernel
        pooled = torch.nn.functional.max_pool1d(pooled, kernel, stride=1, padding=kernel // 2)
    best = torch.sort(pooled, dim=-1, descending=True, stable=True).indices[..., : min(tokens, count)]
    return best.sort(dim=-1).values  # [B, 1 or Hkv, k]


def select_passing(
    selection_queries: Tensor,
    prefix_keys: Tensor,
    keys: Tensor,
    values: Tensor,
    positions: Tensor,
    settings: PassingSettings,
    *,
    scale: float,
    softcap: float | None,
) -> PassedTokens:
    """This host's passing tokens of one layer, by the rule of the module docstring, from its candidates: ``keys``
    and ``values`` ``[B, Hkv, n, D]`` at true ``positions`` ``[n]``."""
    batch, kv_heads, _, head_dim = keys.shape
    if keys.shape[2] == 0:
        empty = keys.new_empty(batch, kv_heads, 0, head_dim)
        return PassedTokens(empty, empty, positions.new_empty(kv_heads, 0))
    scores = candidate_scores(selection_queries, prefix_keys, keys, scale=scale, softcap=softcap)  # [B, Hq, n]
    chosen = choose(scores, settings.tokens, kv_heads, settings).expand(batch, kv_heads, -1)  # [B, Hkv, k]
    index = chosen.unsqueeze(-1).expand(-1, -1, -1, head_dim)  # [B, Hkv, k, D]
    shared = settings.selection == "shared"
    return PassedTokens(keys.gather(2, index), values.gather(2, index), positions[chosen[0]], shared)  # [Hkv, k]


class PassingExchange:
    """The all-gather of every host's passing tokens, one fixed-size message per layer, and what a host has received.

    A message is ``tokens`` slots of keys and values (bytes) followed by their positions (int64, -1 for an unused
    slot), so one collective carries both; how many slots each host filled is known from the block plan
    (:meth:`begin_round`), so nothing waits on the device. :meth:`start` sends this host's choice for a layer and
    returns at once; :meth:`earlier` waits for the layer's message and gives the tokens of every host before this
    one, from this round and every earlier round (a host with several blocks encodes one per round, in step with the
    others).
    :meth:`idle` is a round in which this host has no block: it only takes part in the collectives.
    """

    def __init__(
        self,
        group: ContextGroup,
        settings: PassingSettings,
        num_layers: int,
        kv_shape: tuple[int, int, int],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.group = group
        self.settings = settings
        self.num_layers = num_layers
        self.batch, self.kv_heads, self.head_dim = kv_shape
        self.dtype = dtype
        self.device = device
        self._pending: list[Transfer | None] = [None] * num_layers
        self._received: list[list[PassedTokens]] = [[] for _ in range(num_layers)]
        self._counts: list[int] = []

    def begin_round(self, counts: list[int]) -> None:
        """How many tokens each host passes this round (``min(tokens, its candidates)``: every host knows it from the
        block plan, so reading the messages never waits on the device)."""
        self._counts = [min(self.settings.tokens, count) for count in counts]

    @property
    def _kv_bytes(self) -> int:
        slots = 2 * self.batch * self.kv_heads * self.settings.tokens * self.head_dim
        return slots * torch.empty((), dtype=self.dtype).element_size()

    def _pack(self, passed: PassedTokens) -> Tensor:
        count, tokens = passed.keys.shape[2], self.settings.tokens
        kv = torch.zeros(2, self.batch, self.kv_heads, tokens, self.head_dim, dtype=self.dtype, device=self.device)
        kv[0, :, :, :count] = passed.keys
        kv[1, :, :, :count] = passed.values
        positions = torch.full((self.kv_heads, tokens), -1, dtype=torch.long, device=self.device)  # [Hkv, K]
        positions[:, :count] = passed.positions
        return torch.cat([kv.reshape(-1).view(torch.uint8), positions.reshape(-1).view(torch.uint8)])  # [bytes]

    def _unpack(self, message: Tensor, count: int) -> PassedTokens:
        tokens = self.settings.tokens
        kv = message[: self._kv_bytes].view(self.dtype).view(2, self.batch, self.kv_heads, tokens, self.head_dim)
        positions = message[self._kv_bytes :].view(torch.long).view(self.kv_heads, tokens)  # [Hkv, K]
        shared = self.settings.selection == "shared"
        return PassedTokens(kv[0, :, :, :count], kv[1, :, :, :count], positions[:, :count], shared)

    def start(self, layer: int, passed: PassedTokens) -> None:
        if self._pending[layer] is not None:
            raise RuntimeError(f"layer {layer}: the last round's passing tokens were not received")
        self._pending[layer] = self.group.start_all_gather(self._pack(passed))

    def earlier(self, layer: int) -> PassedTokens | None:
        """The passing tokens of every host before this one (None for the first host, or where none were chosen)."""
        pending = self._pending[layer]
        if pending is None:
            raise RuntimeError(f"layer {layer}: no passing tokens were sent this round")
        gathered = pending.wait()  # [N, bytes]
        self._pending[layer] = None
        counts = self._counts
        self._received[layer].extend(self._unpack(gathered[host], counts[host]) for host in range(self.group.rank))
        parts = [part for part in self._received[layer] if part.keys.shape[2]]
        if not parts:
            return None
        return PassedTokens(
            torch.cat([part.keys for part in parts], dim=2),  # [B, Hkv, m, D]
            torch.cat([part.values for part in parts], dim=2),
            torch.cat([part.positions for part in parts], dim=1),  # [Hkv, m]
            self.settings.selection == "shared",
        )

    def idle(self) -> None:
        """A round without a block: send nothing chosen, receive the others' (they count for later rounds)."""
        nothing = torch.empty(self.batch, self.kv_heads, 0, self.head_dim, dtype=self.dtype, device=self.device)
        for layer in range(self.num_layers):
            self.start(layer, PassedTokens(nothing, nothing, torch.empty(self.kv_heads, 0, dtype=torch.long)))
            self.earlier(layer)
