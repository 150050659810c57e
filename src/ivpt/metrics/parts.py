"""Part consistency and stability (Huang et al., ICCV 2023), as docs/method.md §4 states them.

Geometry lives in a ``frame``×``frame`` pixel frame (224 in the protocol) laid over the bounding-box crop that
the model sees. Keypoints are (x, y) = (column, row) in that frame's pixel units, compared as given with the
integer pixel indices of the map's argmax. :func:`part_frame_keypoints` puts them there under either protocol
(``eval.protocol``): ``corrected`` floors the crop's pixel-centre coordinates and drops keypoints outside the box;
``reference`` computes ``int(frame * (int(x) - x1) / w)`` from the full-image annotation as the authors' code does
and keeps every visible keypoint (docs/deviations.md).

The unit of both scores is the pair (class, prototype), over the classes that occur in the evaluated data.
Both scores only need, per class, the number of images, how often each keypoint is visible, how often each
prototype hits each keypoint and how often a prototype's keypoint vector survives the noise. The meter keeps
exactly these counts — O(C·K·P) integers, independent of the number of images, and summable under DDP.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import EVAL_PROTOCOLS
from .state import SumState

__all__ = [
    "PROTOCOLS",
    "check_protocol",
    "part_frame_keypoints",
    "keypoint_hits",
    "add_protocol_noise",
    "part_counts",
    "consistency_from_counts",
    "stability_from_counts",
    "consistency_score",
    "stability_score",
    "keypoint_prototypes",
    "keypoint_patches",
    "PartMeter",
]


PROTOCOLS = EVAL_PROTOCOLS  # the values of eval.protocol


def check_protocol(protocol: str) -> None:
    """Raise ValueError unless ``protocol`` is one of :data:`PROTOCOLS`."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r} must be one of {', '.join(PROTOCOLS)}")


def part_frame_keypoints(crop_keypoints: Tensor, crop_visible: Tensor, crop_size: int, *, keypoints: Tensor,
                         visible: Tensor, boxes: Tensor, frame: int = 224,
                         protocol: str = "corrected") -> tuple[Tensor, Tensor]:
    """Keypoints in the frame×frame part frame over the box crop, and which of them count, for :func:`keypoint_hits`.

    crop_keypoints (B, P, 2), crop_visible (B, P): the item's keypoints in the crop_size×crop_size model input
    made from the box crop (keypoints outside the box already invisible); keypoints (B, P, 2), visible (B, P),
    boxes (B, 4): the same images' full-image annotation (pixel centres; box edges x0, y0, x1, y1, so a CUB box
    ``x y w h`` is x0 = x - 0.5, x1 = x + w - 0.5) → (keypoints (B, P, 2) float, visible (B, P) bool).

    ``corrected``: floor(crop_keypoints · frame / crop_size); a keypoint outside the box is invisible, so it
    leaves both the numerator and the denominator of consistency.
    ``reference`` (the authors' code): x' = int(frame · (int(x) - int(bx)) / int(bw)), where bx, bw are the CUB
    box's x and width (Python ``int``: truncation toward zero), same for y; EVERY annotated-visible keypoint
    counts, so one outside the box lands outside the frame and is a miss that still counts in the denominator
    (truncation toward zero puts a keypoint less than bw/frame pixels left of or above the box on the frame's
    edge 0, where it can still be hit; one exactly on the far edge maps to ``frame``, which the box test includes).
    """
    check_protocol(protocol)
    if protocol == "corrected":
        return (crop_keypoints.float() * frame / crop_size).floor(), crop_visible.bool()
    kp, box = keypoints.double(), boxes.double()
    origin = (box[:, :2] + 0.5).trunc().unsqueeze(1)  # (B, 1, 2) the CUB box's x, y as int()
    size = (box[:, 2:] - box[:, :2]).trunc().unsqueeze(1)  # (B, 1, 2) its width and height as int()
    ratio = (kp.trunc() - origin) / size
    return (frame * ratio).trunc(), visible.bool()


def keypoint_hits(maps: Tensor, keypoints: Tensor, visible: Tensor, *, frame: int = 224,
                  half_size: int = 36) -> Tensor:
    """Which visible keypoints fall in each prototype's box.

    maps (B, K, h, w): the K prototype maps to score (foreground channels only — drop the background first);
    keypoints (B, P, 2): (x, y) in frame pixels; visible (B, P) bool → hits (B, K, P) bool.

    Each map is upsampled bicubically (``align_corners=False``, as OpenCV's ``INTER_CUBIC``) to frame×frame; the
    argmax (first in row-major order on ties) gives the peak (row r, column c); the box is
    [c - half_size, c + half_size] × [r - half_size, r + half_size] clipped to [0, frame], bounds inclusive.
    hit = visible & x, y inside the box. Only keypoints outside the frame are affected by the clipping.
    """
    b = maps.shape[0]
    if keypoints.shape[:1] != (b,) or keypoints.shape[-1] != 2 or visible.shape != keypoints.shape[:2]:
        raise ValueError(f"keypoints {tuple(keypoints.shape)} / visible {tuple(visible.shape)} do not match "
                         f"maps {tuple(maps.shape)} as (B, P, 2) / (B, P)")
    up = F.interpolate(maps.float(), size=(frame, frame), mode="bicubic", align_corners=False)
    peak = up.flatten(2).argmax(dim=2)  # (B, K)
    row, col = (peak // frame).unsqueeze(-1), (peak % frame).unsqueeze(-1)  # (B, K, 1)
    x = keypoints[..., 0].to(up.device, torch.float32).unsqueeze(1)  # (B, 1, P)
    y = keypoints[..., 1].to(up.device, torch.float32).unsqueeze(1)
    inside = ((x >= (col - half_size).clamp(min=0)) & (x <= (col + half_size).clamp(max=frame))
              & (y >= (row - half_size).clamp(min=0)) & (y <= (row + half_size).clamp(max=frame)))
    return inside & visible.to(up.device, torch.bool).unsqueeze(1)


def add_protocol_noise(images: Tensor, *, std: float = 0.2, clip: float = 0.25,
                       generator: torch.Generator | None = None) -> Tensor:
    """``images`` (already mean/std-normalised, any shape) plus N(0, std²) noise clamped to [-clip, clip].

    With a ``generator`` the noise is drawn on the generator's device, then moved to the images' device.
    """
    device = images.device if generator is None else generator.device
    noise = torch.randn(images.shape, generator=generator, device=device, dtype=torch.float32).mul_(std)
    return images + noise.clamp_(-clip, clip).to(images.device, images.dtype)


def part_counts(hits: Tensor, visible: Tensor, labels: Tensor, num_classes: int, *,
                valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-class sufficient statistics of the consistency score (int64).

    hits (N, K, P) bool, visible (N, P) bool, labels (N,) long →
    ``hit_counts`` (C, K, P): images of class c where prototype k hits keypoint j;
    ``vis_counts`` (C, P): images of class c where keypoint j is visible; ``n_images`` (C,).
    """
    keep = torch.ones(labels.shape[0], dtype=torch.bool, device=hits.device) if valid is None \
        else valid.to(hits.device, torch.bool)
    lab = labels.to(hits.device).long()[keep]
    _, k, p = hits.shape
    hit_counts = torch.zeros(num_classes, k, p, dtype=torch.int64, device=hits.device)
    hit_counts.index_add_(0, lab, hits[keep].long())
    vis_counts = torch.zeros(num_classes, p, dtype=torch.int64, device=hits.device)
    vis_counts.index_add_(0, lab, visible.to(hits.device)[keep].long())
    n_images = torch.bincount(lab, minlength=num_classes)
    return hit_counts, vis_counts, n_images


def _unchanged_counts(hits_clean: Tensor, hits_noisy: Tensor, labels: Tensor, num_classes: int, *,
                      valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(C, K) images of class c whose keypoint vector of prototype k is unchanged, and (C,) images."""
    keep = torch.ones(labels.shape[0], dtype=torch.bool, device=hits_clean.device) if valid is None \
        else valid.to(hits_clean.device, torch.bool)
    lab = labels.to(hits_clean.device).long()[keep]
    same = (hits_clean[keep] == hits_noisy.to(hits_clean.device)[keep]).all(dim=2)  # (n, K)
    unchanged = torch.zeros(num_classes, hits_clean.shape[1], dtype=torch.int64, device=hits_clean.device)
    unchanged.index_add_(0, lab, same.long())
    return unchanged, torch.bincount(lab, minlength=num_classes)


def consistency_from_counts(hit_counts: Tensor, vis_counts: Tensor, n_images: Tensor, *,
                            threshold: float = 0.8) -> float:
    """Percent of consistent (class, prototype) units over the classes with at least one image.

    A unit is consistent when, for some keypoint j visible in at least one image of its class,
    hit_counts / vis_counts ≥ threshold. A unit of a class that never shows any keypoint is inconsistent.
    NaN when no class has an image.
    """
    present = n_images > 0
    if not bool(present.any()):
        return float("nan")
    vis = vis_counts.unsqueeze(1).double()  # (C, 1, P)
    ratio = torch.where(vis > 0, hit_counts.double() / vis.clamp(min=1), torch.zeros_like(vis))
    consistent = ((ratio >= threshold) & (vis > 0)).any(dim=2)  # (C, K)
    return 100.0 * float(consistent[present].double().mean())


def stability_from_counts(unchanged: Tensor, n_images: Tensor) -> float:
    """100 × mean over (class, prototype) units, classes with images only, of unchanged / n_images."""
    present = n_images > 0
    if not bool(present.any()):
        return float("nan")
    frac = unchanged[present].double() / n_images[present].double().unsqueeze(1)
    return 100.0 * float(frac.mean())


def consistency_score(hits: Tensor, visible: Tensor, labels: Tensor, *, threshold: float = 0.8) -> float:
    """Consistency in percent from per-image hits (N, K, P) bool, visible (N, P) bool and labels (N,)."""
    num_classes = int(labels.max()) + 1 if labels.numel() else 0
    return consistency_from_counts(*part_counts(hits, visible, labels, num_classes), threshold=threshold)


def stability_score(hits_clean: Tensor, hits_noisy: Tensor, labels: Tensor) -> float:
    """Stability in percent from clean and noisy hits (N, K, P) bool and labels (N,)."""
    if hits_clean.shape != hits_noisy.shape:
        raise ValueError(f"clean {tuple(hits_clean.shape)} and noisy {tuple(hits_noisy.shape)} hits differ")
    num_classes = int(labels.max()) + 1 if labels.numel() else 0
    return stability_from_counts(*_unchanged_counts(hits_clean, hits_noisy, labels, num_classes))


def keypoint_patches(keypoints: Tensor, visible: Tensor, grid: tuple[int, int], *, image_size: int) -> Tensor:
    """(B, P) long: the row-major index on the H×W patch ``grid`` of the patch under each keypoint (x, y) of
    ``keypoints`` (B, P, 2), in the pixels of the image_size × image_size model input: (floor(y · H / image_size),
    floor(x · W / image_size)), clipped to the grid. A hidden keypoint (``visible`` (B, P) False) gets patch 0
    whatever its coordinates, NaN included."""
    h, w = grid
    kp = keypoints.double().masked_fill(~visible.bool().unsqueeze(-1), 0.0)
    col = (kp[..., 0] * w / image_size).floor().clamp(0, w - 1).long()
    row = (kp[..., 1] * h / image_size).floor().clamp(0, h - 1).long()
    return row * w + col


def keypoint_prototypes(features: Tensor, keypoints: Tensor, visible: Tensor, background: Tensor, *,
                        image_size: int) -> Tensor:
    """Prototypes that the keypoint annotation gives a stage's features: a reference for what concepts could score.

    features (B, D, H, W): the features a concept stage reads; keypoints (B, P, 2): (x, y) in the pixels of the
    image_size × image_size model input; visible (B, P) bool; background (B, H, W) bool: the patches that count as
    background → prototypes (P + 1, D) float32: row j the mean feature of the patch under keypoint j over the
    images where j is visible (a hidden keypoint's coordinates are ignored, NaN included), the last row the mean
    feature of the background patches (accumulated in float64). The patch under a keypoint is
    :func:`keypoint_patches`.
    """
    b, d, h, w = features.shape
    if keypoints.shape[:1] != (b,) or keypoints.shape[-1] != 2 or visible.shape != keypoints.shape[:2]:
        raise ValueError(f"keypoints {tuple(keypoints.shape)} / visible {tuple(visible.shape)} do not match "
                         f"features {tuple(features.shape)} as (B, P, 2) / (B, P)")
    if background.shape != (b, h, w):
        raise ValueError(f"background {tuple(background.shape)} is not (B, H, W) = {(b, h, w)}")
    vis = visible.bool()
    if not bool(vis.any(dim=0).all()):
        missing = [j for j in range(vis.shape[1]) if not bool(vis[:, j].any())]
        raise ValueError(f"keypoint(s) {missing} are visible in none of the {b} images: no prototype for them")
    if not bool(background.any()):
        raise ValueError("no background patch in any image: no background prototype")
    f = features.detach().double().flatten(2).transpose(1, 2)  # (B, L, D)
    patch = keypoint_patches(keypoints, vis, (h, w), image_size=image_size)
    at = f.gather(1, patch.unsqueeze(-1).expand(-1, -1, d))  # (B, P, D): the feature under each keypoint
    weight = vis.double().unsqueeze(-1)
    parts = (at * weight).sum(0) / weight.sum(0)
    bg = f[background.reshape(b, -1).bool()].mean(0, keepdim=True)
    return torch.cat([parts, bg]).float()


class PartMeter(SumState):
    """Consistency and stability of one evaluated stage, accumulated batch by batch.

    State (int64, summed under DDP): ``hit_counts`` (C, K, P), ``vis_counts`` (C, P), ``n_images`` (C,) for
    consistency; ``unchanged`` (C, K), ``n_noisy`` (C,) for stability (only batches given ``hits_noisy``).
    Use one meter per stage: K is that stage's number of foreground prototypes.
    """

    def __init__(self, num_classes: int, num_prototypes: int, num_keypoints: int, *, threshold: float = 0.8,
                 device: torch.device | str = "cpu") -> None:
        super().__init__(device=device)
        self.num_classes, self.num_prototypes, self.num_keypoints = num_classes, num_prototypes, num_keypoints
        self.threshold = threshold
        c, k, p = num_classes, num_prototypes, num_keypoints
        self._add_state("hit_counts", (c, k, p))
        self._add_state("vis_counts", (c, p))
        self._add_state("n_images", (c,))
        self._add_state("unchanged", (c, k))
        self._add_state("n_noisy", (c,))

    def update(self, hits: Tensor, visible: Tensor, labels: Tensor, *, hits_noisy: Tensor | None = None,
               valid: Tensor | None = None) -> None:
        """Add a batch: hits (B, K, P) bool from :func:`keypoint_hits` on the clean input, visible (B, P) bool,
        labels (B,), optionally hits_noisy (B, K, P) bool on the same images with :func:`add_protocol_noise`,
        valid (B,) bool or None (False rows are padding)."""
        if hits.shape[1:] != (self.num_prototypes, self.num_keypoints):
            raise ValueError(f"hits {tuple(hits.shape)} do not match (B, {self.num_prototypes}, "
                             f"{self.num_keypoints})")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes})")
        for state, add in zip((self.hit_counts, self.vis_counts, self.n_images),
                              part_counts(hits, visible, labels, self.num_classes, valid=valid)):
            state.add_(add.to(self.device))
        if hits_noisy is not None:
            if hits_noisy.shape != hits.shape:
                raise ValueError(f"noisy hits {tuple(hits_noisy.shape)} != clean {tuple(hits.shape)}")
            unchanged, n = _unchanged_counts(hits, hits_noisy, labels, self.num_classes, valid=valid)
            self.unchanged.add_(unchanged.to(self.device))
            self.n_noisy.add_(n.to(self.device))

    def no_data(self) -> dict[str, str]:
        """Both scores need a visible keypoint somewhere (without one every unit would be trivially inconsistent
        and trivially stable); stability also needs the noisy pass."""
        reasons = {}
        if int(self.n_images.sum()) == 0:
            reasons = {"consistency": "no image was evaluated", "stability": "no image was evaluated"}
        elif int(self.vis_counts.sum()) == 0:
            reasons = {k: "no visible part keypoint in the evaluated images" for k in ("consistency", "stability")}
        if "stability" not in reasons and int(self.n_noisy.sum()) == 0:
            reasons["stability"] = "no noisy pass was evaluated"
        return reasons

    def compute(self) -> dict[str, float]:
        """{"consistency", "stability"} in percent; a score without data is left out (see :meth:`no_data`)."""
        missing = self.no_data()
        scores = {}
        if "consistency" not in missing:
            scores["consistency"] = consistency_from_counts(self.hit_counts, self.vis_counts, self.n_images,
                                                            threshold=self.threshold)
        if "stability" not in missing:
            scores["stability"] = stability_from_counts(self.unchanged, self.n_noisy)
        return scores

    def per_prototype(self) -> dict[str, list[float]]:
        """For reports: per prototype, the percent of classes in which it is consistent, and its stability."""
        present = self.n_images > 0
        vis = self.vis_counts.unsqueeze(1).double()
        ratio = self.hit_counts.double() / vis.clamp(min=1)
        consistent = ((ratio >= self.threshold) & (vis > 0)).any(dim=2)[present]  # (C', K)
        noisy = self.n_noisy > 0
        stab = self.unchanged[noisy].double() / self.n_noisy[noisy].double().unsqueeze(1)
        return {"consistency": (100.0 * consistent.double().mean(0)).tolist(),
                "stability": (100.0 * stab.mean(0)).tolist()}
