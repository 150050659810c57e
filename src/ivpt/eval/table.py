"""A readable text table of an ``eval.json`` result."""
from __future__ import annotations

__all__ = ["ACCURACY_KEYS", "format_table"]

ACCURACY_KEYS = ("top1", "top5", "balanced_top1")  # the same under both eval.protocol values


def format_table(result: dict) -> str:
    """A readable summary of an eval.json dict."""
    names = [("top1", "top-1"), ("top5", "top-5"), ("balanced_top1", "balanced top-1"),
             ("consistency", "consistency"), ("stability", "stability"), ("nmi", "NMI"), ("ari", "ARI"),
             ("part_purity", "part purity"), ("part_coverage", "part coverage"),
             ("kpr", "keypoint error (lower better)"), ("fg_iou", "foreground IoU")]
    # Accuracy is measured one way; every interpretability score depends on eval.protocol (docs/deviations.md).
    protocol = result.get("eval_protocol", "corrected")
    lines = [f"{'metric':<32}{'value':>10}  protocol"]
    for key, label in names:
        if key in result:
            lines.append(f"{label:<32}{result[key]:>10.2f}  {'-' if key in ACCURACY_KEYS else protocol}")
    if "stage" in result:
        st = result["stage"]
        lines.append(f"(interpretability at stage {st['index']}, {st['n_pro']} prototypes, eval.stage={st['spec']})")
    if result.get("per_stage"):
        keys = [k for k in ("consistency", "stability", "nmi", "ari", "part_purity", "part_coverage", "kpr", "fg_iou")
                if any(k in r for r in result["per_stage"])]
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
