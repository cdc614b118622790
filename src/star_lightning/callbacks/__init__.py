"""Lightning callbacks: the resumable JSONL writer and the TensorBoard profiler scalars."""
