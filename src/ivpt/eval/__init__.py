"""Dataset-level evaluation (docs/method.md §4): :func:`evaluate` (:mod:`.evaluator`), the metric table
(:mod:`.registry`, the built-in metrics in :mod:`.builtin`), the pass runner (:mod:`.runner`), the
interpretability protocols (:mod:`.protocols`) and the ``ivpt eval`` table (:mod:`.table`)."""
from __future__ import annotations

from . import builtin  # noqa: F401  (registers the built-in metrics)
from .evaluator import evaluate, evaluate_checkpoint, unsupported_metrics
from .registry import (ALL_METRICS, DEFAULT_METRICS, EvalContext, Metric, Score, register_metric,
                       unregister_metric)
from .runner import eval_loader, evaluate_accuracy
from .table import ACCURACY_KEYS, format_table

__all__ = ["ALL_METRICS", "ACCURACY_KEYS", "DEFAULT_METRICS", "EvalContext", "Metric", "Score", "evaluate",
           "evaluate_checkpoint", "evaluate_accuracy", "eval_loader", "format_table", "register_metric",
           "unregister_metric", "unsupported_metrics"]
