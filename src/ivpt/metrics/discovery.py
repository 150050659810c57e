"""Part-discovery metrics (PDiscoFormer protocol, docs/method.md §4): NMI / ARI between keypoint ids and the
concept found at each keypoint, and foreground IoU; keypoint regression from concept centroids is
:mod:`ivpt.metrics.keypoints`.

Conventions
-----------
* Maps are (B, K, h, w) with the background as the LAST channel.
* Pure functions return fractions (NMI, ARI in [−0.5, 1]); meters' ``compute`` returns percent.
* Input-pixel coordinates (for :func:`concepts_at_keypoints`): (x, y) continuous, pixel column j spans
  [j, j + 1), so a keypoint lies in pixel (floor(y), floor(x)).
* Keypoint regression works in the bbox-normalised frame: (x, y) ∈ [0, 1] over the bbox crop's width and
  height, for the landmarks and for the centroids alike (when the model input is the bbox crop, this is
  the map's own [0, 1] frame returned by :func:`soft_centroids`). Errors are reported in these units × 100.
* ``protocol`` (``eval.protocol``): ``corrected`` (ours) or ``reference`` (the authors' evaluation code) where
  the two differ — the input images (:func:`discovery_input`), the centroid grid (:func:`soft_centroids`) and
  the box normalisation (:func:`to_bbox_frame`); docs/deviations.md lists them.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .state import SumState

__all__ = [
    "nmi_ari_from_contingency",
    "nmi_ari",
    "contingency_table",
    "concepts_at_keypoints",
    "ContingencyMeter",
    "fg_iou",
    "FgIoUMeter",
]


def as_numpy(x: Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


# --------------------------------------------------------------------------------------------- NMI / ARI

def nmi_ari_from_contingency(table: Tensor | np.ndarray) -> tuple[float, float]:
    """(NMI, ARI) as fractions from a contingency table of counts (R true labels × S predicted labels).

    Equal to scikit-learn's ``normalized_mutual_info_score`` (arithmetic-mean normalisation) and
    ``adjusted_rand_score`` on the labelings the table counts, special cases included: all-zero rows and
    columns (labels that never occur) are ignored; an empty table or two single-cluster labelings give
    NMI = ARI = 1; a single cluster on one side only gives NMI = 0.
    """
    t = as_numpy(table).astype(np.int64)
    t = t[t.sum(axis=1) > 0][:, t.sum(axis=0) > 0]
    n = int(t.sum())
    rows, cols = t.sum(axis=1), t.sum(axis=0)

    # ARI from pair counts, in Python integers: n² · Σ n_ij² products overflow int64 on large tables.
    sum_sq = int((t.astype(object) ** 2).sum()) if t.size else 0
    sum_rows = sum(int(r) ** 2 for r in rows)
    sum_cols = sum(int(c) ** 2 for c in cols)
    tp = sum_sq - n
    fp = sum_rows - sum_sq  # same true label, different predicted label
    fn = sum_cols - sum_sq
    tn = n * n - fp - fn - sum_sq
    if fn == 0 and fp == 0:
        ari = 1.0
    else:
        ari = 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))

    if len(rows) == len(cols) and len(rows) <= 1:
        return 1.0, ari
    if len(rows) == 1 or len(cols) == 1:
        return 0.0, ari
    nzx, nzy = np.nonzero(t)
    nz = t[nzx, nzy].astype(np.float64)
    # Same algebra and order as scikit-learn, so the two agree to the last few ulps.
    outer = rows[nzx].astype(np.int64) * cols[nzy].astype(np.int64)
    log_outer = -np.log(outer.astype(np.float64)) + math.log(rows.sum()) + math.log(cols.sum())
    p = nz / n
    mi = p * (np.log(nz) - math.log(n)) + p * log_outer
    mi = np.where(np.abs(mi) < np.finfo(np.float64).eps, 0.0, mi)
    mi = max(float(mi.sum()), 0.0)
    if mi == 0.0:
        return 0.0, ari

    def entropy(counts: np.ndarray) -> float:
        c = counts.astype(np.float64)
        return float(-np.sum((c / c.sum()) * (np.log(c) - math.log(c.sum()))))

    return mi / ((entropy(rows) + entropy(cols)) / 2.0), ari


def contingency_table(labels_true: Tensor | np.ndarray, labels_pred: Tensor | np.ndarray) -> np.ndarray:
    """(R, S) int64 counts over the distinct values of each labeling (sorted)."""
    a, b = as_numpy(labels_true).reshape(-1), as_numpy(labels_pred).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"labelings have {a.size} and {b.size} entries")
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    r, s = (int(ia.max()) + 1, int(ib.max()) + 1) if a.size else (0, 0)
    table = np.zeros((r, s), dtype=np.int64)
    np.add.at(table, (ia, ib), 1)
    return table


def nmi_ari(labels_true: Tensor | np.ndarray, labels_pred: Tensor | np.ndarray) -> tuple[float, float]:
    """(NMI, ARI) as fractions between two labelings of the same samples (any integer values)."""
    return nmi_ari_from_contingency(contingency_table(labels_true, labels_pred))


def concepts_at_keypoints(maps: Tensor, keypoints: Tensor, visible: Tensor,
                          image_size: tuple[int, int]) -> Tensor:
    """The argmax concept (background = channel K-1 included) at each keypoint.

    maps (B, K, h, w); keypoints (B, P, 2): (x, y) in input pixels; visible (B, P) bool; image_size (H, W)
    → (B, P) long, -1 where invisible.

    The value is that of the map upsampled bilinearly (``align_corners=False``) to H×W at the pixel holding
    the keypoint, (floor(y), floor(x)) clamped into the image — as the reference reads it — but obtained with
    ``grid_sample`` at that pixel's centre, which gives the same numbers without building H×W maps.
    """
    height, width = image_size
    kp = keypoints.to(maps.device, torch.float32)
    px = kp[..., 0].floor().clamp(0, width - 1)
    py = kp[..., 1].floor().clamp(0, height - 1)
    # Pixel centre (j + 0.5) in grid_sample's align_corners=False coordinates: 2·(j + 0.5)/W − 1.
    grid = torch.stack((2 * (px + 0.5) / width - 1, 2 * (py + 0.5) / height - 1), dim=-1).unsqueeze(2)
    sampled = F.grid_sample(maps.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    concept = sampled.squeeze(3).argmax(dim=1)  # (B, P)
    return torch.where(visible.to(concept.device, torch.bool), concept, torch.full_like(concept, -1))


class ContingencyMeter(SumState):
    """Counts of (keypoint id, concept) pairs at visible keypoints; NMI and ARI at the end.

    State (int64, summed under DDP): ``table`` (num_parts, num_concepts) — ground-truth keypoint id j by
    concept (background included, so num_concepts = K).
    """

    def __init__(self, num_parts: int, num_concepts: int, *, device: torch.device | str = "cpu") -> None:
        super().__init__(device=device)
        self.num_parts, self.num_concepts = num_parts, num_concepts
        self._add_state("table", (num_parts, num_concepts))

    def update(self, concepts: Tensor, *, valid: Tensor | None = None) -> None:
        """Add concepts (B, P) long from :func:`concepts_at_keypoints` (-1 = invisible, skipped); valid (B,)."""
        if concepts.shape[1] != self.num_parts:
            raise ValueError(f"concepts have {concepts.shape[1]} keypoints, the meter {self.num_parts}")
        keep = self._rows(concepts.shape[0], valid, concepts.device).unsqueeze(1) & (concepts >= 0)
        part = torch.arange(self.num_parts, device=concepts.device).expand_as(concepts)
        if concepts.numel() and int(concepts.max()) >= self.num_concepts:
            raise ValueError(f"concept ids must lie in [0, {self.num_concepts})")
        flat = part[keep] * self.num_concepts + concepts[keep]
        counts = torch.bincount(flat, minlength=self.num_parts * self.num_concepts)
        self.table.add_(counts.view(self.num_parts, self.num_concepts).to(self.device))

    def no_data(self) -> dict[str, str]:
        reason = "no visible part keypoint in the evaluated images"
        return {"nmi": reason, "ari": reason} if int(self.table.sum()) == 0 else {}

    def compute(self) -> dict[str, float]:
        """{"nmi", "ari"} in percent; {} without a visible keypoint (an empty table is no agreement at all)."""
        if self.no_data():
            return {}
        nmi, ari = nmi_ari_from_contingency(self.table)
        return {"nmi": 100.0 * nmi, "ari": 100.0 * ari}


def fg_iou(maps: Tensor, masks: Tensor, *, align_corners: bool = False) -> tuple[Tensor, Tensor]:
    """Per-image foreground intersection and union pixel counts.

    maps (B, K, h, w), background last; masks (B, 1, H, W) or (B, H, W), foreground where > 0.5 →
    (intersection (B,), union (B,)) int64. Predicted foreground = argmax ≠ K-1 after bilinear upsampling to
    H×W (PDiscoFormer's own evaluation uses ``align_corners=True``; pass it to reproduce that).
    """
    gt = (masks.reshape(masks.shape[0], *masks.shape[-2:]) > 0.5).to(maps.device)
    up = F.interpolate(maps.float(), size=gt.shape[-2:], mode="bilinear", align_corners=align_corners)
    pred = up.argmax(dim=1) != maps.shape[1] - 1
    return (pred & gt).sum(dim=(1, 2)), (pred | gt).sum(dim=(1, 2))


class FgIoUMeter(SumState):
    """Dataset-level (pooled) foreground and background IoU: Σ intersection / Σ union over all pixels.

    State (int64, summed under DDP): ``inter``, ``union``, ``pixels`` (each (1,)); the background IoU follows
    from them (bg ∩ = pixels − fg ∪, bg ∪ = pixels − fg ∩).
    """

    def __init__(self, *, align_corners: bool = False, device: torch.device | str = "cpu") -> None:
        super().__init__(device=device)
        self.align_corners = align_corners
        for name in ("inter", "union", "pixels"):
            self._add_state(name, (1,))

    def update(self, maps: Tensor, masks: Tensor, *, valid: Tensor | None = None) -> None:
        """Add a batch: maps (B, K, h, w), masks (B, 1, H, W) or (B, H, W), valid (B,) bool or None."""
        inter, union = fg_iou(maps, masks, align_corners=self.align_corners)
        keep = self._rows(inter.shape[0], valid, inter.device)
        self.inter += int(inter[keep].sum())
        self.union += int(union[keep].sum())
        self.pixels += int(keep.sum()) * masks.shape[-2] * masks.shape[-1]

    def no_data(self) -> dict[str, str]:
        if int(self.pixels) == 0:
            return {"fg_iou": "no image with a foreground mask was evaluated",
                    "bg_iou": "no image with a foreground mask was evaluated"}
        reasons = {}
        if int(self.union) == 0:
            reasons["fg_iou"] = "neither the masks nor the maps show any foreground pixel"
        if int(self.pixels) - int(self.inter) == 0:
            reasons["bg_iou"] = "neither the masks nor the maps show any background pixel"
        return reasons

    def compute(self) -> dict[str, float]:
        """{"fg_iou", "bg_iou"} in percent; a score whose union is empty is left out (see :meth:`no_data`)."""
        inter, union, pixels = int(self.inter), int(self.union), int(self.pixels)
        bg_inter, bg_union = pixels - union, pixels - inter
        scores = {}
        if union:
            scores["fg_iou"] = 100.0 * inter / union
        if bg_union:
            scores["bg_iou"] = 100.0 * bg_inter / bg_union
        return scores
