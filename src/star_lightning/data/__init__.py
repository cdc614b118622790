"""Requests in, predictions out: JSONL readers, the predict DataModule, and the benchmark generators."""
