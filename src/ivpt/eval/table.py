"""A readable text table of an ``eval.json`` result; its rows are the scores of :mod:`ivpt.eval.registry`."""
from __future__ import annotations

from .registry import LiveView, scores

__all__ = ["ACCURACY_KEYS", "format_table"]

# Whole-model scores (accuracy, ...): the same under both eval.protocol values.
ACCURACY_KEYS: LiveView[str] = LiveView(lambda: tuple(s.key for m, s in scores() if not m.per_stage))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def format_table(result: dict) -> str:
    """A readable summary of an eval.json dict."""
    # Accuracy is measured one way; every interpretability score depends on eval.protocol (docs/deviations.md).
    protocol = result.get("eval_protocol", "corrected")
    lines = [f"{'metric':<32}{'value':>10}  protocol"]
    for metric, score in scores():
        if _number(result.get(score.key)):
            lines.append(f"{score.table_label:<32}{result[score.key]:>10.2f}  "
                         f"{protocol if metric.per_stage else '-'}")
    if "stage" in result:
        st = result["stage"]
        lines.append(f"(interpretability at stage {st['index']}, {st['n_pro']} prototypes, eval.stage={st['spec']})")
    if result.get("per_stage"):
        keys = [s.key for m, s in scores() if m.per_stage and any(s.key in r for r in result["per_stage"])]
        lines.append("")
        width = {k: max(13, len(k) + 2) for k in keys}
        lines.append(f"per stage, eval.protocol={protocol}:")
        lines.append(f"{'stage':<7}{'n_pro':>6}" + "".join(f"{k:>{width[k]}}" for k in keys))
        for r in result["per_stage"]:
            lines.append(f"{r['stage']:<7}{r['n_pro']:>6}" + "".join(
                f"{r[k]:>{width[k]}.2f}" if k in r else f"{'-':>{width[k]}}" for k in keys))
    for metric, reason in result.get("skipped", {}).items():
        lines.append(f"skipped {metric}: {reason}")
    return "\n".join(lines)
