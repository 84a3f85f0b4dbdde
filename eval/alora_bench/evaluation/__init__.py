"""Evaluation through lm-eval-harness: `alora eval`, the Table-1 markdown, and the task folder."""

from alora_bench.evaluation.runner import TASKS_DIR, evaluate, evaluate_model, task_manager
from alora_bench.evaluation.table import write_table

__all__ = ["TASKS_DIR", "evaluate", "evaluate_model", "task_manager", "write_table"]
