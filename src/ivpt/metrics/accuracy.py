"""Classification accuracy (docs/method.md §4): top-1, top-5 and class-balanced top-1, in percent.

The meter keeps per-class integer counts, so the result is exact whatever the batch size, the number of
processes or the order of the data; padded duplicates are excluded with ``valid``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .state import SumState

__all__ = ["topk_correct", "AccuracyMeter"]


def topk_correct(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, Tensor]:
    """Whether the label is among the ``k`` highest logits, for each ``k`` in ``ks``.

    logits (B, C), labels (B,) long → {k: (B,) bool}. A ``k`` larger than C is treated as C (always correct),
    so top-5 stays defined for toy problems with fewer than five classes. Ties between equal logits are broken
    by ``torch.topk``.
    """
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match (B, C)/(B,)")
    num_classes = logits.shape[1]
    kmax = min(max(ks), num_classes)
    top = logits.topk(kmax, dim=1).indices  # (B, kmax), best first
    match = top == labels.to(top.device).unsqueeze(1)
    return {k: match[:, :min(k, num_classes)].any(dim=1) for k in ks}


class AccuracyMeter(SumState):
    """Per-class counts of top-1 hits, top-5 hits and samples.

    State (all int64, summed under DDP): ``correct1`` (C,), ``correct5`` (C,), ``total`` (C,).
    """

    def __init__(self, num_classes: int, *, device: torch.device | str = "cpu") -> None:
        super().__init__(device=device)
        self.num_classes = int(num_classes)
        for name in ("correct1", "correct5", "total"):
            self._add_state(name, (self.num_classes,))

    def update(self, logits: Tensor, labels: Tensor, *, valid: Tensor | None = None) -> None:
        """Add a batch: logits (B, C), labels (B,), valid (B,) bool or None (False rows are padding)."""
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"logits have {logits.shape[1]} classes, the meter {self.num_classes}")
        labels = labels.to(logits.device).long()
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes})")
        hits = topk_correct(logits, labels, (1, 5))
        keep = self._rows(labels.numel(), valid, logits.device)
        lab = labels[keep]
        for name, lab_counted in (("correct1", lab[hits[1][keep]]), ("correct5", lab[hits[5][keep]]),
                                  ("total", lab)):
            counts = torch.bincount(lab_counted, minlength=self.num_classes)
            getattr(self, name).add_(counts.to(self.device))

    @property
    def images(self) -> int:
        """Samples counted so far."""
        return int(self.total.sum())

    def no_data(self) -> dict[str, str]:
        return {k: "no image was classified" for k in ("top1", "top5", "balanced_top1")} if self.images == 0 else {}

    def compute(self) -> dict[str, float]:
        """{"top1", "top5", "balanced_top1"} in percent; {} before any sample (see :meth:`no_data`). The balanced
        score is the mean of per-class top-1 over the classes that occur."""
        n = self.images
        if n == 0:
            return {}
        seen = self.total > 0
        per_class = self.correct1[seen].double() / self.total[seen].double()
        return {
            "top1": 100.0 * int(self.correct1.sum()) / n,
            "top5": 100.0 * int(self.correct5.sum()) / n,
            "balanced_top1": 100.0 * float(per_class.mean()),
        }
