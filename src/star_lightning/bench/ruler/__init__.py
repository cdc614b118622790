"""RULER synthetic tasks, generated for a given tokenizer and target length (Hsieh et al., 2024)."""

from star_lightning.bench.ruler.tasks import TASKS, TaskSpec, generate_samples

__all__ = ["TASKS", "TaskSpec", "generate_samples"]
