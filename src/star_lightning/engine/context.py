"""An encoded context (Phase 1's result on this host) and the key that says which requests it answers.

The key is made once a request (:func:`context_key`) and compared on the device: the context's token ids themselves
(``torch.equal``, one scalar back to the host), not a hash of a copy to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from star_lightning.cache import KVStore
from star_lightning.engine.settings import StarSettings
from star_lightning.parallel.group import ContextGroup
from star_lightning.rope import rope_length_key


@dataclass(frozen=True, eq=False)
class ContextKey:
    """What identifies an encoded context: its tokens ``[1, T]`` (with the query in the anchor, the query's too),
    and ``shape``: its length, the layout of hosts and every setting that shaped its KV (with the prompt length a
    length-dependent rope was pinned to, :mod:`star_lightning.rope`)."""

    context_ids: Tensor
    query_ids: Tensor | None
    shape: tuple[object, ...]

    def matches(self, other: ContextKey | None) -> bool:
        """The same context under the same settings: exact, on the tokens' device."""
        if other is None or self.shape != other.shape:
            return False
        return _same(self.context_ids, other.context_ids) and _same(self.query_ids, other.query_ids)


def _same(a: Tensor | None, b: Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and a.device == b.device and bool(torch.equal(a, b))


def context_key(
    model: nn.Module,
    context_ids: Tensor,
    query_ids: Tensor,
    star: StarSettings,
    group: ContextGroup,
    anchor_query_ids: Tensor | None = None,
) -> ContextKey:
    """The key a request's context is encoded under (a kept context answers the request when they match);
    ``anchor_query_ids``: what the anchor holds when it is not ``query_ids`` (:mod:`star_lightning.anchor_text`)."""
    rope_length = rope_length_key(model, context_ids.shape[1] + query_ids.shape[1])
    in_anchor = star.attention == "star" and star.anchor_query
    anchor = query_ids if anchor_query_ids is None else anchor_query_ids
    shape = (context_ids.shape[1], *star.shapes_kv(), rope_length, group.rank, group.size)
    return ContextKey(context_ids.detach(), anchor.detach() if in_anchor else None, shape)


@dataclass
class EncodedContext:
    """This host's share of an encoded context (Phase 1's result), kept to answer every query that shares it.

    ``store``: star/ring's KV store (this host's blocks or chunks); ``cache``: dense's transformers cache. ``key``
    identifies the context's tokens and every setting that shaped its KV.
    """

    key: ContextKey
    context_length: int
    local_length: int
    store: KVStore | None = None
    cache: DynamicCache | None = None
    phase1_s: float = 0.0
    phase1_bytes: int = 0

    def rollback(self) -> None:
        """Forget what the last query and its generated tokens added; keep the context."""
        if self.store is not None:
            self.store.truncate(self.local_length)
        if self.cache is not None:
            added = self.cache.get_seq_length() - self.context_length
            if added > 0:  # a negative crop removes tokens: the form every transformers 5.x release takes
                self.cache.crop(-added)
