"""Prototype galleries: for each concept of a stage, the dataset patches it claims most strongly.

A concept's score on an image is the maximum of its map S̃_i over the patch grid; the patch is a square crop of
the input centred on the grid cell where the 3×3-averaged map peaks (the strongest neighbourhood, not a lone
saturated cell). One batched pass over the dataset keeps a running top-k per concept, cropping only the
candidates that enter it, with each crop's class label and, when the items carry keypoints, the ground-truth part
it shows (the visible keypoint inside the crop nearest its centre) for the captions.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .core import IMAGENET_MEAN, IMAGENET_STD, denormalise, run_batches, upsample_labels
from .draw import boundaries, concept_rgb, shorten

__all__ = ["concept_gallery", "GalleryAccumulator", "collate_images", "Gallery"]

Gallery = dict[int, list[tuple[int, np.ndarray, float]]]


def collate_images(items: list[dict[str, Any]]) -> dict[str, Tensor] | None:
    """Stack ``image`` and ``index`` of dataset items, and ``label``, ``keypoints`` and ``visible`` when every item
    has them (other fields, such as masks, may not stack).

    Items that are None (unreadable images) are dropped; an all-None batch gives None."""
    items = [it for it in items if it is not None]
    if not items:
        return None
    out = {"image": torch.stack([it["image"] for it in items]),
           "index": torch.tensor([int(it.get("index", -1)) for it in items])}
    for key in ("label", "keypoints", "visible"):
        if all(key in it for it in items):
            out[key] = torch.stack([torch.as_tensor(it[key]) for it in items])
    return out


def _crop_box(H: int, W: int, cy: float, cx: float, side: int) -> tuple[int, int, int]:
    """(top, left, side) of a square of ``side`` pixels centred near (cy, cx), shifted to stay inside H × W."""
    side = min(side, H, W)
    y0 = int(round(min(max(cy - side / 2, 0), H - side)))
    x0 = int(round(min(max(cx - side / 2, 0), W - side)))
    return y0, x0, side


class GalleryAccumulator:
    """Running top-k patches per foreground concept of one stage.

    Args:
        stage: index into the model's maps (negative counts from the end; -1 is the final stage).
        topk: patches kept per concept.
        patch: crop side in input pixels; None gives 40% of the shorter image side.
        outline: draw the concept's region boundary (argmax of the upsampled maps) on each crop in its colour.
    """

    def __init__(self, stage: int, *, topk: int = 8, patch: int | None = None, outline: bool = True,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.stage, self.topk, self.patch, self.outline = stage, topk, patch, outline
        self.mean, self.std = tuple(mean), tuple(std)
        # concept → [(rank key, (image index, crop, score), class label, part)]; the key orders best first.
        self.best: dict[int, list[tuple[tuple[float, float, int], tuple[int, np.ndarray, float], int | None,
                                        int | None]]] = {}

    def update(self, x: Tensor, out: Any, indices: Sequence[int], batch: Any = None) -> None:
        """Add one batch: inputs ``x`` (B, 3, H, W), the model output, each item's dataset index and the batch
        (its ``label``, ``keypoints`` and ``visible`` name the crops' class and part when present)."""
        fields = batch if isinstance(batch, dict) else {}
        labels_of = fields["label"].tolist() if "label" in fields else None
        kp = fields["keypoints"].numpy() if "keypoints" in fields and "visible" in fields else None
        maps = out.maps[self.stage].float()  # (B, n, h, w)
        B, n, h, w = maps.shape
        fg = maps[:, :-1]
        scores = fg.flatten(2).amax(dim=-1).cpu().numpy()  # (B, P): the concept's map maximum
        # The crop centres on the strongest 3×3 neighbourhood, not a lone saturated pixel at a region's edge; its
        # value also breaks ties between equal maxima.
        pooled = F.avg_pool2d(fg, 3, stride=1, padding=1, count_include_pad=False).flatten(2)
        pooled_max, where = (t.cpu().numpy() for t in pooled.max(dim=-1))
        H, W = x.shape[-2:]
        side = self.patch or max(8, int(round(0.4 * min(H, W))))
        images: np.ndarray | None = None
        regions: dict[int, np.ndarray] = {}
        for k in range(n - 1):
            current = self.best.setdefault(k, [])
            for b in range(B):
                key = (-float(scores[b, k]), -float(pooled_max[b, k]), int(indices[b]))
                if len(current) >= self.topk and key >= current[-1][0]:
                    continue
                if images is None:  # de-normalise lazily: most batches add nothing once the lists are full
                    images = denormalise(x, mean=self.mean, std=self.std)
                gy, gx = divmod(int(where[b, k]), w)
                y0, x0, sd = _crop_box(H, W, (gy + 0.5) * H / h, (gx + 0.5) * W / w, side)
                crop = np.ascontiguousarray(images[b, y0 : y0 + sd, x0 : x0 + sd])
                if self.outline:
                    if b not in regions:
                        regions[b] = upsample_labels(maps[b].cpu(), (H, W))
                    mask = regions[b][y0 : y0 + sd, x0 : x0 + sd] == k
                    crop = crop.copy()
                    crop[mask & boundaries(mask)] = concept_rgb(k)  # the concept's region outlined in its colour
                part = None
                if kp is not None:  # the visible keypoint inside the crop nearest its centre
                    inside = fields["visible"][b].numpy().astype(bool) & (kp[b, :, 0] >= x0) & \
                        (kp[b, :, 0] < x0 + sd) & (kp[b, :, 1] >= y0) & (kp[b, :, 1] < y0 + sd)
                    if inside.any():
                        dist = ((kp[b, :, 0] - x0 - sd / 2) ** 2 + (kp[b, :, 1] - y0 - sd / 2) ** 2)
                        part = int(np.argmin(np.where(inside, dist, np.inf)))
                label = None if labels_of is None else int(labels_of[b])
                current.append((key, (int(indices[b]), crop, float(scores[b, k])), label, part))
                current.sort(key=lambda t: t[0])
                del current[self.topk :]

    def result(self) -> Gallery:
        return {k: [entry for _, entry, _, _ in v] for k, v in sorted(self.best.items())}

    def captions(self, class_names: Sequence[str] | None = None, part_names: Sequence[str] | None = None
                 ) -> tuple[dict[int, list[str]], dict[int, str]]:
        """({concept: one caption per crop: class name, and the part shown when keypoints were given},
        {concept: the part most of its crops show, e.g. 'shows head in 5 of 8'})."""
        def name(names: Sequence[str] | None, j: int, what: str) -> str:
            return str(names[j]) if names is not None and 0 <= j < len(names) else f"{what} {j}"

        captions, summary = {}, {}
        for k, entries in sorted(self.best.items()):
            lines, parts = [], [p for *_, p in entries if p is not None]
            for _, _, label, part in entries:
                text = "" if label is None else shorten(name(class_names, label, "class"), 18)
                lines.append(text + ("" if part is None else f"\npart: {name(part_names, part, 'part')}"))
            captions[k] = lines
            if parts:
                top = max(set(parts), key=lambda p: (parts.count(p), -p))
                summary[k] = f"shows {name(part_names, top, 'part')}\nin {parts.count(top)} of {len(entries)}"
        return captions, summary


def batch_indices(batch: Any, start: int, size: int) -> list[int]:
    """Dataset indices of a batch: its ``index`` field when present and valid, else running positions."""
    if isinstance(batch, dict) and "index" in batch:
        idx = [int(i) for i in batch["index"]]
        if all(i >= 0 for i in idx):
            return idx
    return list(range(start, start + size))


def loader_for(dataset: Dataset | Iterable[Any], *, batch_size: int = 32, num_workers: int = 0) -> Iterable[Any]:
    """A sequential loader over ``dataset`` (items: dicts with ``image``); an iterable of batches is passed
    through unchanged."""
    indexable = hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")
    if isinstance(dataset, Dataset) or (indexable and not isinstance(dataset, (list, tuple))):
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,  # type: ignore
                          collate_fn=collate_images)
    return dataset


def concept_gallery(model: nn.Module, dataset: Dataset | Iterable[Any], stage: int, *, topk: int = 8,
                    patch: int | None = None, outline: bool = True, batch_size: int = 32, num_workers: int = 0,
                    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Gallery:
    """Top-``topk`` patches of every foreground concept of ``stage`` over ``dataset``, in one batched pass.

    Args:
        model: an IVPT model (run in eval mode without gradient).
        dataset: items are dicts with ``image`` (3, H, W) normalised and optionally ``index``; or an iterable of
            such batches.
        stage: stage index (negative from the end; -1 is the final stage).
        patch: crop side in input pixels (default 40% of the shorter side).
        outline: draw the concept's region boundary on each crop, in the concept's colour.
    Returns:
        concept → [(image index, crop (patch, patch, 3) uint8, score)], best first; score is the concept's map
        maximum on that image, in [0, 1] (ties broken by the 3×3-averaged maximum, then the index). The crop is
        centred on the concept's strongest 3×3 neighbourhood.
    """
    acc = GalleryAccumulator(stage, topk=topk, patch=patch, outline=outline, mean=mean, std=std)
    seen = 0
    for batch, x, out in run_batches(model, loader_for(dataset, batch_size=batch_size, num_workers=num_workers)):
        acc.update(x, out, batch_indices(batch, seen, x.shape[0]), batch)
        seen += x.shape[0]
    return acc.result()
