"""Joint transforms: one geometric change applied identically to an image, its keypoints, box and mask.

Coordinate conventions (the one place they are defined; everything in ``ivpt.data`` follows them)
--------------------------------------------------------------------------------------------------
* **Pixel centres.** The pixel in column ``i``, row ``j`` has its centre at ``(x, y) = (i, j)`` and covers
  ``[i - 0.5, i + 0.5] x [j - 0.5, j + 0.5]``; a ``W x H`` image spans ``[-0.5, W - 0.5] x [-0.5, H - 0.5]``.
* **Keypoints** are ``(P, 2)`` float ``(x, y)`` in pixels of the *current* image, with ``visible`` ``(P,)`` bool.
  A keypoint is in frame when the pixel it rounds to exists (``-0.5 <= x < W - 0.5``, same for ``y``); one that
  leaves the frame becomes invisible. Items report invisible keypoints as ``(0, 0)``, as CUB files do.
* **Boxes** ``(4,)`` = ``x0, y0, x1, y1`` are box *edges* in the same coordinates: a CUB box ``x y w h`` covering
  pixel columns ``x .. x+w-1`` is ``(x - 0.5, y - 0.5, x + w - 0.5, y + h - 0.5)``, so ``x1 - x0 == w``. After a
  rotation a box becomes the hull of its four mapped corners; boxes are clipped to the frame.
* Every geometric op is an affine map of these coordinates, applied to keypoints and box corners exactly as the
  pixels move:

  - resize ``W -> W'``: ``x' = (x + 0.5) * W' / W - 0.5`` (PIL resamples pixel *edges* linearly);
  - crop at ``(left, top)``: ``x' = x - left`` (regions outside the image are filled, see ``fill``);
  - horizontal flip, as torchvision/PIL flip pixels (column ``i`` -> ``W - 1 - i``): ``x' = W - 1 - x``.
    Left/right part *names* (e.g. CUB's "left eye") are not swapped;
  - affine: the matrix of torchvision's ``F.affine`` (rotation about the image centre ``((W-1)/2, (H-1)/2)``,
    positive angle = clockwise on screen, isotropic scale, translation in whole pixels).

Ops take and return a :class:`Sample`; :class:`ToTensorNormalize` ends a pipeline by turning it into tensors.
Randomness comes from torch's global RNG, which :class:`ivpt.engine.ordering.SeededDataset` seeds per item. Each
random op separates drawing from applying (``draw(size)`` then ``apply(sample, params)``), so that the device-side
training augmentation (``data.gpu_augment``, :class:`DeviceAugmentPlan` here and :mod:`ivpt.data.device_augment`)
draws exactly the parameters the CPU pipeline would for the same item.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from .joint import (  # noqa: F401 (re-exported: callers import them from here)
    IGNORE,
    JointCompose,
    JointOp,
    JointTransform,
    Sample,
    is_joint,
    mean_fill,
)
from .joint_ops import (  # noqa: F401 (re-exported: callers import them from here)
    BBoxCrop,
    CenterCrop,
    ColorJitter,
    Crop,
    RandomAffine,
    RandomCrop,
    RandomHorizontalFlip,
    Resize,
    ResizeShorter,
    ToTensorNormalize,
    affine_matrix,
    apply_affine,
    hflip,
)

if TYPE_CHECKING:
    from ..config import DataConfig

__all__ = [
    "BBoxCrop",
    "CenterCrop",
    "ColorJitter",
    "Crop",
    "DeviceAugmentPlan",
    "IGNORE",
    "JointCompose",
    "JointOp",
    "RandomAffine",
    "RandomCrop",
    "RandomHorizontalFlip",
    "Resize",
    "ResizeShorter",
    "Sample",
    "ToTensorNormalize",
    "affine_matrix",
    "apply_affine",
    "apply_transform",
    "build_device_train_transform",
    "build_eval_transform",
    "build_train_transform",
    "hflip",
    "is_joint",
    "mean_fill",
]


def apply_transform(sample: Sample, transform: Callable | None, *, bbox_crop: bool = False) -> Sample:
    """What datasets do with a loaded sample: the optional box crop, then ``transform`` (joint, or image-only, in
    which case the geometry is dropped), then tensors (ImageNet normalisation when the pipeline did not end in
    :class:`ToTensorNormalize`)."""
    if bbox_crop:
        sample = BBoxCrop()(sample)
    if transform is not None:
        sample = transform(sample) if is_joint(transform) else Sample(image=transform(sample.image))
    if not isinstance(sample.image, Tensor):
        sample = ToTensorNormalize()(sample)
    return sample


def _train_ops(cfg: DataConfig, img_size: int) -> list[JointTransform]:
    """The ops of the training pipeline before the conversion to tensors (see :func:`build_train_transform`);
    with ``cfg.augment`` false, those of the evaluation pipeline."""
    fill = mean_fill(cfg.mean)
    ops: list[JointTransform] = [ResizeShorter(cfg.resize or img_size)]
    if not cfg.augment:
        return ops + [CenterCrop(img_size, fill=fill)]
    if cfg.hflip > 0:
        ops.append(RandomHorizontalFlip(cfg.hflip))
    if cfg.affine_degrees > 0 or cfg.affine_translate > 0 or tuple(cfg.affine_scale) != (1.0, 1.0):
        ops.append(RandomAffine(cfg.affine_degrees, translate=cfg.affine_translate, scale=cfg.affine_scale,
                                fill=fill if cfg.affine_fill == "mean" else (0, 0, 0),
                                interpolation=cfg.affine_interpolation))
    ops.append(RandomCrop(img_size, fill=fill))
    if any(v > 0 for v in cfg.color_jitter):
        ops.append(ColorJitter(*cfg.color_jitter))
    return ops


def build_train_transform(cfg: DataConfig, img_size: int) -> JointCompose:
    """The paper's training augmentation: resize the shorter side to ``cfg.resize or img_size``, random
    horizontal flip (``cfg.hflip``), random affine (``cfg.affine_*``, about the centre), random crop
    ``img_size``, colour jitter (``cfg.color_jitter``), to tensor and normalise. Ops with no effect are left out.
    The affine warp resamples with ``cfg.affine_interpolation`` and fills exposed areas with ``cfg.affine_fill``
    (``mean``: the colour that normalises to ~0; ``zero``: black). A random crop that must pad uses the mean colour.
    (``cfg.augment`` is not consulted here: :func:`ivpt.data.build_datasets` picks the eval transform instead.)"""
    return JointCompose([*_train_ops(replace(cfg, augment=True), img_size), ToTensorNormalize(cfg.mean, cfg.std)])


def build_device_train_transform(cfg: DataConfig, img_size: int) -> JointCompose:
    """The loader half of ``data.gpu_augment``: resize the shorter side (PIL, as the CPU pipeline), then
    :class:`DeviceAugmentPlan` over the same random ops as :func:`build_train_transform` (or, with
    ``cfg.augment`` false, the centre crop of the eval transform). Items carry uint8 pixels and ``augment``;
    :class:`ivpt.data.device_augment.DeviceAugment` finishes them on the device."""
    resize, *ops = _train_ops(cfg, img_size)
    return JointCompose([resize, DeviceAugmentPlan(ops, img_size)])


class DeviceAugmentPlan(JointOp):
    """End of a ``data.gpu_augment`` pipeline, run in the loader workers: draws the parameters of the random
    ``ops`` (flip, affine, crop, colour jitter, in pipeline order, each with its own ``draw``, so from the same
    per-item seed exactly the numbers the CPU pipeline draws) without applying them, and returns the image as a
    uint8 tensor (3, H, W) with ``Sample.augment``:

    * ``matrix`` (2, 3) float32: output pixel centre (u, v) of the ``img_size`` crop → pixel centre in this
      image (flip, then affine about the centre, then crop, inverted into one map);
    * ``frame`` (4,) int64: crop offset (left, top) and this image's (W, H); an output pixel whose
      (u + left, v + top) lies outside [0, W) x [0, H) is crop padding;
    * ``jitter`` (4,) float32: brightness, contrast, saturation and hue factors (identity when switched off), and
      ``order`` (4,) int64: the order torchvision would apply them in.

    Geometry of the sample (keypoints, boxes) is not moved: the training split carries none.
    """

    def __init__(self, ops: Sequence[JointTransform], img_size: int) -> None:
        kinds = (RandomHorizontalFlip, RandomAffine, RandomCrop, CenterCrop, ColorJitter)
        for op in ops:
            if not isinstance(op, kinds):
                raise ValueError(f"DeviceAugmentPlan cannot defer {op!r} to the device")
        self.ops, self.size = list(ops), int(img_size)

    def __call__(self, sample: Sample) -> Sample:
        width, height = size = sample.size
        forward = np.eye(3)  # pixel centres of this image -> of the output crop
        left = top = 0
        order, factors = [0, 1, 2, 3], ColorJitter.IDENTITY
        for op in self.ops:
            drawn = op.draw(size)
            if isinstance(op, RandomHorizontalFlip):
                if drawn:
                    forward = np.array([[-1.0, 0.0, width - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) @ forward
            elif isinstance(op, RandomAffine):
                forward = np.vstack([affine_matrix(size, *drawn), [0.0, 0.0, 1.0]]) @ forward
            elif isinstance(op, ColorJitter):
                order, factors = drawn
            else:  # the crop
                left, top = drawn
                forward = np.array([[1.0, 0.0, -left], [0.0, 1.0, -top], [0.0, 0.0, 1.0]]) @ forward
        pixels = torch.from_numpy(np.asarray(sample.image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
        augment = {
            "matrix": torch.from_numpy(np.linalg.inv(forward)[:2].astype(np.float32)),
            "frame": torch.tensor([left, top, width, height], dtype=torch.int64),
            "jitter": torch.tensor(factors, dtype=torch.float32),
            "order": torch.tensor(order, dtype=torch.int64),
        }
        return replace(sample, image=pixels, augment=augment)

    def __repr__(self) -> str:
        inner = "".join(f"\n    {op!r}," for op in self.ops)
        return f"DeviceAugmentPlan(size={self.size},{inner}\n)"


def build_eval_transform(cfg: DataConfig, img_size: int, *, square: bool = False,
                         clip_box: bool = True) -> JointCompose:
    """Deterministic evaluation transform: shorter side to ``cfg.resize or img_size``, centre crop ``img_size``,
    to tensor and normalise. ``square=True`` instead resizes straight to ``img_size x img_size`` (no crop), as the
    consistency/stability protocol does with bounding-box crops. ``clip_box=False`` leaves items' ``bbox``
    unclipped by the centre crop (keypoint regression clips it per protocol)."""
    fill = mean_fill(cfg.mean)
    geometry: list[JointTransform]
    if square:
        geometry = [Resize(img_size)]
    else:
        geometry = [ResizeShorter(cfg.resize or img_size, clip_box=clip_box),
                    CenterCrop(img_size, fill=fill, clip_box=clip_box)]
    return JointCompose([*geometry, ToTensorNormalize(cfg.mean, cfg.std)])
