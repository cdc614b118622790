"""The predict DataModule: requests from a JSONL file, minus those the output file already holds.

Each item is one request (no collation): a context-parallel group works on one request at a time. Lightning
splits the items between data-parallel groups through the strategy's sampler settings.
"""

from __future__ import annotations

from typing import Any

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
        output: the predictions file (the command line links ``--output`` here); the requests it already holds are
            skipped, so a rerun resumes.
    """

    def __init__(self, *, path: str, limit: int | None = None, output: str | None = None) -> None:
        super().__init__()
        self.path = path
        self.limit = limit
        self.output = output
        self.requests: list[dict[str, Any]] = []
        self.total_requests = 0

    def setup(self, stage: str) -> None:
        requests = read_requests(self.path)
        if self.limit is not None:
            requests = requests[: self.limit]
        self.total_requests = len(requests)
        done = self._completed_indices()
        self.requests = [r for r in requests if r["index"] not in done]

    def _completed_indices(self) -> set[int]:
        """Requests an earlier run already wrote; read once and broadcast so every rank splits the same list."""
        if self.output is None:
            return set()
        trainer = self.trainer
        if trainer is None:
            return completed_indices(self.output)
        done = completed_indices(self.output) if trainer.is_global_zero else set()
        return trainer.strategy.broadcast(done, src=0)

    def predict_dataloader(self) -> DataLoader[dict[str, Any]]:
        return DataLoader(RequestDataset(self.requests), batch_size=None, shuffle=False)
