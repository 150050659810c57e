"""The dataset side of the app, computed once: one batched pass over a split gives every map stage's top patches
per concept (:class:`~ivpt.explain.gallery.GalleryAccumulator`), how often each concept is present and, for IVPT,
the dataset's fine→coarse hierarchy (:class:`~ivpt.explain.core.HierarchyAccumulator`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..explain.core import Hierarchy, HierarchyAccumulator, run_batches
from ..explain.gallery import Gallery, GalleryAccumulator, batch_indices, loader_for
from ..models.prototypes import present_concepts

__all__ = ["DatasetIndex", "build_index"]

Progress = Callable[[int, int], None]  # (images done, images in all)


@dataclass
class DatasetIndex:
    """What one pass over ``num_images`` dataset images found, per map stage (positions in the model's ``maps``).

    presence: per stage, (n,) share of the images in which each concept (background last) claims >= 1 patch.
    galleries: per stage, concept → [(dataset index, crop (s, s, 3) uint8, score)], best first.
    captions: per stage, concept → one caption per crop (the image's class).
    hierarchy: the mean fine→coarse assignments (IVPT), else None.
    """

    num_images: int
    presence: list[np.ndarray]
    galleries: list[Gallery]
    captions: list[dict[int, list[str]]]
    hierarchy: Hierarchy | None


def build_index(model: nn.Module, dataset: Any, num_stages: int, *, n_pro: Sequence[int] = (), depth: int = 0,
                class_names: Sequence[str] | None = None, topk: int = 8, batch_size: int = 16,
                limit: int | None = None, mean: Sequence[float], std: Sequence[float],
                progress: Progress | None = None) -> DatasetIndex:
    """One pass over ``dataset`` (or its first ``limit`` items) with ``model``: :class:`DatasetIndex` of its
    ``num_stages`` map stages. The hierarchy is averaged when the outputs carry assignments (``n_pro``, ``depth``:
    the model's geometry, for its captions). ``progress(done, total)`` is called after every batch."""
    used = len(dataset) if limit is None else min(limit, len(dataset))
    subset = dataset if used == len(dataset) else torch.utils.data.Subset(dataset, range(used))
    galleries = [GalleryAccumulator(j, topk=topk, mean=mean, std=std) for j in range(num_stages)]
    counts: list[Tensor] = []
    hierarchy, assigned, seen = HierarchyAccumulator(), False, 0
    for batch, x, out in run_batches(model, loader_for(subset, batch_size=batch_size)):
        indices = batch_indices(batch, seen, x.shape[0])
        for acc in galleries:
            acc.update(x, out, indices, batch)
        found = [present_concepts(m.float()).sum(dim=0).cpu() for m in out.maps[:num_stages]]
        counts = found if not counts else [a + b for a, b in zip(counts, found)]
        if out.assignments:
            hierarchy.update(out)
            assigned = True
        seen += x.shape[0]
        if progress is not None:
            progress(seen, used)
    captions = [acc.captions(class_names)[0] for acc in galleries]
    return DatasetIndex(
        num_images=seen, presence=[(c.double() / max(seen, 1)).numpy() for c in counts],
        galleries=[acc.result() for acc in galleries], captions=captions,
        hierarchy=hierarchy.result(n_pro, depth) if assigned else None)
