"""Compute explanations: run the model once and keep everything a figure needs, as plain numpy arrays.

Nothing here draws; :mod:`ivpt.explain.render` and :mod:`ivpt.explain.hierarchy` turn an :class:`Explanation` or a
:class:`Hierarchy` into matplotlib figures without touching the model again. Shapes: B images, m prompted stages, n_i
prototypes of stage i (P_i = n_i - 1 foreground + background last), N coarse concepts, C classes, (h, w) patch
grid, (H, W) input pixels.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..config import IMAGENET_MEAN, IMAGENET_STD  # their one home; re-exported here for the explain modules

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Explanation", "Hierarchy", "explain", "dataset_hierarchy", "denormalise",
           "stage_title", "paper_stage", "prototype_count", "upsample_labels"]



def denormalise(
    images: Tensor, *, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> np.ndarray:
    """Normalised images (B, 3, H, W) → uint8 (B, H, W, 3) for drawing."""
    x = images.detach().float().cpu()
    x = x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def upsample_labels(maps: np.ndarray | Tensor, size: tuple[int, int]) -> np.ndarray:
    """Argmax concept of every pixel after bilinear upsampling of soft maps (n, h, w) or (B, n, h, w) to ``size``
    (smooth region boundaries at any display size); int16 (H, W) or (B, H, W)."""
    t = torch.as_tensor(maps, dtype=torch.float32)
    up = torch.nn.functional.interpolate(t[None] if t.dim() == 3 else t, size=tuple(size), mode="bilinear",
                                         align_corners=False)
    labels = up.argmax(dim=1).to(torch.int16).numpy()
    return labels[0] if t.dim() == 3 else labels


def stage_title(stage: int, n_pro: Sequence[int], depth: int) -> str:
    """Where stage ``stage`` sits, e.g. 'input of block 8' or 'output of last block' (``depth`` <= 0: unknown
    backbone depth, so only 'prompted stage')."""
    m = len(n_pro) - 1
    if stage >= m:
        return "output of last block"
    return f"input of block {depth - m + stage}" if depth > 0 else "prompted stage"


def prototype_count(n: int) -> str:
    """How every figure and page says a stage's ``n`` prototypes (one of them the background)."""
    return f"{n - 1} foreground + background"


def paper_stage(n_pro: Sequence[int]) -> int | None:
    """The stage the paper scores consistency on (n_pro[-3] prototypes), or None with fewer than 3 stages."""
    return len(n_pro) - 3 if len(n_pro) >= 3 else None


@dataclass
class Hierarchy:
    """Fine→coarse assignment of every intermediate concept, for one image or averaged over a dataset.

    assignments: m arrays (P_i, N); row k is how concept k of stage i splits over the N coarse concepts. Rows of
        concepts that claim no pixel are NaN: their assignment is a meaningless uniform placeholder in the model.
    presence: m arrays (P_i,), fraction of images (0 or 1 for one image) where the concept claims >= 1 pixel.
    num_images: images averaged.
    n_pro, depth: model geometry, for captions.
    """

    assignments: list[np.ndarray]
    presence: list[np.ndarray]
    num_images: int
    n_pro: list[int]
    depth: int

    @property
    def num_coarse(self) -> int:
        return self.n_pro[-1] - 1


@dataclass
class Explanation:
    """One forward pass over a batch, kept for drawing. All arrays are numpy on the CPU.

    images: (B, H, W, 3) uint8 de-normalised inputs.
    maps: m+1 arrays (B, n_i, h, w) float32 concept maps S̃_i (background last; the last entry is the final stage).
    labels: m+1 arrays (B, H, W) int16, argmax concept per input pixel (maps upsampled bilinearly first).
    present: m+1 arrays (B, n_i) bool, concept claims >= 1 patch (argmax on the patch grid, as the model pools).
    assignments: m arrays (B, P_i, N), fine→coarse assignment Q_i.
    evidence: (B, N, C) contribution of each coarse concept to each class logit = part_logits · w_part (1/N for
        the parts-only head, (1 - s)/N with ``model.global_part`` and share s; ``ConceptModel.logit_weights``);
        summing over N gives the logits exactly (up to float rounding) for the parts-only head. With
        ``model.global_part`` the rest of the logits is ``global_evidence``.
    global_evidence: (B, C) the global token's contribution (``model.global_part``), else zeros.
    logits: (B, C). probs: (B, C) softmax of the logits.
    top_classes: (B, k) int64 and top_probs: (B, k) float32, the k most probable classes.
    class_names: C names, or None (figures then show class ids).
    n_pro: prototypes per stage; depth: number of backbone blocks (for captions).
    """

    images: np.ndarray
    maps: list[np.ndarray]
    labels: list[np.ndarray]
    present: list[np.ndarray]
    assignments: list[np.ndarray]
    evidence: np.ndarray
    global_evidence: np.ndarray
    logits: np.ndarray
    probs: np.ndarray
    top_classes: np.ndarray
    top_probs: np.ndarray
    class_names: list[str] | None
    n_pro: list[int]
    depth: int

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_stages(self) -> int:
        """m + 1: prompted stages plus the final one."""
        return len(self.maps)

    @property
    def num_coarse(self) -> int:
        return self.n_pro[-1] - 1

    def class_name(self, c: int) -> str:
        """Name of class ``c`` (its id as text when no names are known)."""
        if self.class_names is not None and 0 <= c < len(self.class_names):
            return str(self.class_names[c])
        return f"class {c}"

    def stage_title(self, stage: int) -> str:
        return stage_title(stage, self.n_pro, self.depth)

    @classmethod
    def concat(cls, parts: Sequence["Explanation"]) -> "Explanation":
        """One explanation holding the images of several (e.g. from batches of one model), in order: every array
        field is concatenated (a field added later cannot be dropped), the model's constants come from the first."""
        if len(parts) == 1:
            return parts[0]
        first = parts[0]

        def cat(name: str) -> Any:
            values = [getattr(p, name) for p in parts]
            if isinstance(values[0], list):
                return [np.concatenate(stage) for stage in zip(*values)]
            return np.concatenate(values)

        arrays = [f.name for f in dataclasses.fields(cls) if f.name not in ("class_names", "n_pro", "depth")]
        return cls(**{name: cat(name) for name in arrays}, class_names=first.class_names, n_pro=first.n_pro,
                   depth=first.depth)

    def hierarchy(self, i: int) -> Hierarchy:
        """The fine→coarse assignments of image ``i``; concepts absent from it get NaN rows."""
        rows, presence = [], []
        for q, present in zip(self.assignments, self.present):
            fg = present[i, :-1]
            rows.append(np.where(fg[:, None], q[i], np.nan).astype(np.float32))
            presence.append(fg.astype(np.float32))
        return Hierarchy(rows, presence, 1, list(self.n_pro), self.depth)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Evaluate deterministically (no Gumbel noise) without autograd, restoring the caller's mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _depth(model: nn.Module) -> int:
    return len(model.backbone.blocks)


def explain(model: nn.Module, images: Tensor, *, class_names: Sequence[str] | None = None, topk: int = 5,
            mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Explanation:
    """Explain a batch of images with one forward pass (eval mode, no gradient).

    Args:
        model: an :class:`ivpt.models.IVPT`.
        images: (B, 3, H, W) inputs normalised with ``mean``/``std``; any size the model accepts.
        class_names: C names shown in figures.
        topk: how many classes the prediction keeps.
        mean, std: the normalisation of ``images``, undone for drawing.
    """
    with _eval_mode(model):
        x = images.to(_device(model))
        out = model(x)
        maps = [s.float().cpu() for s in out.maps]
        logits = out.logits.float()
        evidence = out.part_logits.float() * model.logit_weights()[0]
        probs = logits.softmax(dim=-1)
        top_p, top_c = probs.topk(min(topk, logits.shape[-1]), dim=-1)
        global_evidence = logits - evidence.sum(dim=1) if model.cfg.global_part else torch.zeros_like(logits)
        return Explanation(
            images=denormalise(images, mean=mean, std=std), maps=[s.numpy() for s in maps],
            labels=[upsample_labels(s, tuple(x.shape[-2:])) for s in maps],
            present=[(c > 0).cpu().numpy() for c in out.region_counts],
            assignments=[q.float().cpu().numpy() for q in out.assignments], evidence=evidence.cpu().numpy(),
            global_evidence=global_evidence.cpu().numpy(), logits=logits.cpu().numpy(), probs=probs.cpu().numpy(),
            top_classes=top_c.cpu().numpy(), top_probs=top_p.cpu().numpy(),
            class_names=list(class_names) if class_names is not None else None, n_pro=list(model.cfg.n_pro),
            depth=_depth(model))


def batch_images(batch: Any) -> Tensor:
    """The image tensor of a loader batch: a dict with ``image``, a (images, labels) pair, or a tensor."""
    if isinstance(batch, dict):
        return batch["image"]
    if isinstance(batch, (list, tuple)):
        return batch[0]
    return batch


class HierarchyAccumulator:
    """Running sums for :func:`dataset_hierarchy`, fed one forward pass at a time (so a report can share a pass
    with the galleries)."""

    def __init__(self) -> None:
        self.sums: list[Tensor] | None = None
        self.counts: list[Tensor] | None = None
        self.num_images = 0

    def update(self, out: Any) -> None:
        """Add one batch's :class:`ivpt.models.ModelOutput`."""
        present = [(c[:, :-1] > 0).double() for c in out.region_counts[: len(out.assignments)]]  # (B, P_i)
        sums = [(q.double() * p[..., None]).sum(0).cpu() for q, p in zip(out.assignments, present)]
        counts = [p.sum(0).cpu() for p in present]
        self.sums = sums if self.sums is None else [a + b for a, b in zip(self.sums, sums)]
        self.counts = counts if self.counts is None else [a + b for a, b in zip(self.counts, counts)]
        self.num_images += out.logits.shape[0]

    def result(self, n_pro: Sequence[int], depth: int) -> Hierarchy:
        if self.sums is None or self.counts is None:
            raise ValueError("no images were seen; the loader is empty")
        assignments, presence = [], []
        for s, c in zip(self.sums, self.counts):
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = (s / c[:, None]).numpy()  # NaN where the concept never claimed a pixel
            assignments.append(mean.astype(np.float32))
            presence.append((c / max(self.num_images, 1)).numpy().astype(np.float32))
        return Hierarchy(assignments, presence, self.num_images, list(n_pro), depth)


def run_batches(model: nn.Module, loader: Iterable[Any]) -> Iterator[tuple[Any, Tensor, Any]]:
    """Yield (batch, images on the model's device, model output) for every batch, in eval mode without grad."""
    device = _device(model)
    with _eval_mode(model):
        for batch in loader:
            if batch is None:  # loaders that drop corrupt samples may yield an empty batch as None
                continue
            x = batch_images(batch).to(device)
            yield batch, x, model(x)


def dataset_hierarchy(model: nn.Module, loader: Iterable[Any]) -> Hierarchy:
    """Mean fine→coarse assignment of every intermediate concept over a dataset.

    For each stage i and concept k, the average of Q_i[k, :] is taken over the images in which concept k claims
    at least one patch (argmax on the patch grid). In images where it claims none, the model sets its row to the
    uniform 1/N placeholder, which says nothing about the concept, so those rows are left out. A concept that
    never claims a patch gets a NaN row and presence 0.

    Args:
        model: an IVPT model.
        loader: iterable of batches: dicts with ``image`` (B, 3, H, W) normalised, (images, labels) pairs, or
            tensors.
    """
    acc = HierarchyAccumulator()
    for _, _, out in run_batches(model, loader):
        acc.update(out)
    return acc.result(model.cfg.n_pro, _depth(model))
