"""Evaluation: continual-learning metrics over the accuracy matrix (fractions in [0, 1]) and scoring."""

from .evaluator import evaluate_task, evaluate_tasks
from .metrics import average_performance, backward_transfer, forward_transfer, per_task_final, summary

__all__ = ["average_performance", "backward_transfer", "evaluate_task", "evaluate_tasks", "forward_transfer", "per_task_final", "summary"]
