"""Part-discovery metrics from part segmentation masks (PartImageNet), PDiscoFormer's protocol for that dataset.

Every labelled pixel of the model input is a sample: its ground-truth label is its part (background included as a
label of its own) and its prediction is the argmax concept (background concept included) of the maps upsampled
bilinearly (``align_corners=False``) to the input size. From the (label × concept) pixel counts:

* NMI and ARI, equal to scikit-learn's ``normalized_mutual_info_score`` / ``adjusted_rand_score`` on the pixel
  labelings (what PDiscoFormer computes on PartImageNet);
* part purity = Σ_concepts max_label n / n: how much of each concept's area lies in ONE ground-truth part;
* part coverage = Σ_labels max_concept n / n: how much of each part's area ONE concept claims (inverse purity).

The counts are one int64 table, so batches, shards and DDP ranks combine by addition (:mod:`ivpt.metrics.state`).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .discovery import nmi_ari_from_contingency
from .state import SumState

__all__ = ["PartMaskMeter", "concepts_at_pixels", "mask_contingency", "purity_coverage_from_contingency"]


def concepts_at_pixels(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """maps (B, K, h, w) → (B, H, W) long argmax concept after bilinear upsampling to ``size`` = (H, W)."""
    up = F.interpolate(maps.float(), size=size, mode="bilinear", align_corners=False)
    return up.argmax(dim=1)


def mask_contingency(maps: Tensor, part_mask: Tensor, num_labels: int) -> Tensor:
    """(num_labels, K) int64 pixel counts of (ground-truth label, predicted concept).

    maps (B, K, h, w); part_mask (B, H, W) long with labels 0..num_labels-1 and -1 for pixels without a label
    (skipped).
    """
    if part_mask.ndim != 3:
        raise ValueError(f"part_mask must be (B, H, W), got {tuple(part_mask.shape)}")
    labels = part_mask.to(maps.device, torch.int64)
    if labels.numel() and int(labels.max()) >= num_labels:
        raise ValueError(f"part labels must lie in [-1, {num_labels})")
    concepts = concepts_at_pixels(maps, tuple(labels.shape[-2:]))
    keep = labels >= 0
    k = maps.shape[1]
    flat = labels[keep] * k + concepts[keep]
    return torch.bincount(flat, minlength=num_labels * k).view(num_labels, k)


def purity_coverage_from_contingency(table: Tensor | np.ndarray) -> tuple[float, float]:
    """(purity, coverage) as fractions from a (labels × concepts) count table; (nan, nan) when it is empty."""
    t = np.asarray(table.cpu() if isinstance(table, Tensor) else table, dtype=np.int64)
    n = int(t.sum())
    if n == 0:
        return float("nan"), float("nan")
    return float(t.max(axis=0).sum()) / n, float(t.max(axis=1).sum()) / n


class PartMaskMeter(SumState):
    """Pixel counts of (part label, concept) over a split; NMI, ARI, purity and coverage at the end.

    State (int64, summed under DDP): ``table`` (num_labels, num_concepts), with num_labels = parts + 1
    (background) and num_concepts = K (background concept included).
    """

    def __init__(self, num_labels: int, num_concepts: int, *, device: torch.device | str = "cpu") -> None:
        super().__init__(device=device)
        self.num_labels, self.num_concepts = num_labels, num_concepts
        self._add_state("table", (num_labels, num_concepts))

    def update(self, maps: Tensor, part_mask: Tensor, *, valid: Tensor | None = None) -> None:
        """Add a batch: maps (B, K, h, w), part_mask (B, H, W) long (-1 = no label), valid (B,) bool or None."""
        if maps.shape[1] != self.num_concepts:
            raise ValueError(f"maps have {maps.shape[1]} concepts, the meter {self.num_concepts}")
        keep = self._rows(maps.shape[0], valid, maps.device)
        counts = mask_contingency(maps[keep], part_mask.to(maps.device)[keep], self.num_labels)
        self.table.add_(counts.to(self.device))

    def no_data(self) -> dict[str, str]:
        reason = "no labelled part-mask pixel in the evaluated images"
        return dict.fromkeys(("nmi", "ari", "part_purity", "part_coverage"), reason) if int(self.table.sum()) == 0 \
            else {}

    def compute(self) -> dict[str, float]:
        """{"nmi", "ari", "part_purity", "part_coverage"} in percent; {} without a labelled pixel."""
        if self.no_data():
            return {}
        nmi, ari = nmi_ari_from_contingency(self.table)
        purity, coverage = purity_coverage_from_contingency(self.table)
        return {"nmi": 100.0 * nmi, "ari": 100.0 * ari, "part_purity": 100.0 * purity,
                "part_coverage": 100.0 * coverage}
