"""The predict DataModule: requests from a JSONL file, minus those the output file already holds (and those the
command line's checks excluded: too long for the model, with ``--data.on_too_long skip``).

Each item is one request (no collation): a context-parallel group works on one request at a time. Lightning
splits the items between data-parallel groups through the strategy's sampler settings.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from star_lightning.data.jsonl import completed_indices, read_requests


class RequestDataset(Dataset[dict[str, Any]]):
    def __init__(self, requests: list[dict[str, Any]]) -> None:
        self.requests = requests

    def __len__(self) -> int:
        return len(self.requests)

    def __getitem__(self, item: int) -> dict[str, Any]:
        return self.requests[item]


class RequestDataModule(LightningDataModule):
    """Requests for ``predict``.

    Args:
        path: JSONL file, one request a line (``input_context``, ``input_query``, optional ``index``,
            ``output``/``outputs`` and other fields copied to the predictions).
        limit: only the first ``limit`` requests (for a quick look).
        on_too_long: a request longer than the model can place (context + query + max_new_tokens beyond its
            positions): ``error`` refuses the run before any work, naming the request; ``skip`` leaves it out (it is
            not written, and listed at the end). A resumed run checks such requests again.
        output: the predictions file (the command line links ``--output`` here); the requests it already holds are
            skipped, so a rerun resumes.
    """

    def __init__(
        self,
        *,
        path: str,
        limit: int | None = None,
        on_too_long: Literal["error", "skip"] = "error",
        output: str | None = None,
    ) -> None:
        super().__init__()
        self.path = path
        self.limit = limit
        self.on_too_long = on_too_long
        self.output = output
        self.requests: list[dict[str, Any]] = []
        self.total_requests = 0
        self._excluded: set[int] = set()

    def exclude(self, indices: Iterable[int]) -> None:
        """Leave these requests out (set on global rank 0 before the run; every rank learns them in :meth:`setup`)."""
        self._excluded.update(indices)

    def setup(self, stage: str) -> None:
        requests = read_requests(self.path)
        if self.limit is not None:
            requests = requests[: self.limit]
        done, excluded = self._indices_to_leave_out()
        requests = [r for r in requests if r["index"] not in excluded]
        self.total_requests = len(requests)
        self.requests = [r for r in requests if r["index"] not in done]

    def _indices_to_leave_out(self) -> tuple[set[int], set[int]]:
        """Requests an earlier run already wrote, and the excluded ones; read on global rank 0 and broadcast so
        every rank splits the same list."""
        trainer = self.trainer
        if trainer is None:
            return self._completed_indices(), set(self._excluded)
        local = (self._completed_indices(), set(self._excluded)) if trainer.is_global_zero else (set(), set())
        done, excluded = trainer.strategy.broadcast(local, src=0)
        return done, excluded

    def _completed_indices(self) -> set[int]:
        return set() if self.output is None else completed_indices(self.output)

    def predict_dataloader(self) -> DataLoader[dict[str, Any]]:
        return DataLoader(RequestDataset(self.requests), batch_size=None, shuffle=False)
