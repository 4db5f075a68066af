"""Answering inputs without a task id: every task's adapter kept as a leaf, a router that picks
the leaf from the input's features by descending the task tree, and routed evaluation."""

from .router import STATS_FILE, Router, TaskStats, confusion, load_stats, save_stats

__all__ = ["STATS_FILE", "Router", "TaskStats", "confusion", "load_stats", "save_stats"]
