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

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import ColorJitter as _TvColorJitter
from torchvision.transforms import functional as TF

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


@dataclass
class Sample:
    """One image and its geometry while it moves through a pipeline.

    Attributes:
        image: PIL RGB image; after :class:`ToTensorNormalize` a float tensor (3, H, W).
        keypoints: (P, 2) float64 (x, y), or None. After ToTensorNormalize a float32 tensor.
        visible: (P,) bool, or None.
        bbox: (4,) float64 x0, y0, x1, y1 box edges, or None.
        mask: PIL "L" image (0..255), or None. After ToTensorNormalize a float tensor (1, H, W) in [0, 1].
        part_mask: PIL "L" label image (part j = j, background = the number of parts, :data:`IGNORE` = no
            label), or None; resampled with nearest neighbour, areas a crop or warp exposes become IGNORE.
            After ToTensorNormalize an int64 tensor (H, W) with IGNORE turned into -1.
        augment: the per-image parameters of the augmentation left to the training device
            (:class:`DeviceAugmentPlan`), or None.
    """

    image: Image.Image | Tensor
    keypoints: np.ndarray | None = None
    visible: np.ndarray | None = None
    bbox: np.ndarray | None = None
    mask: Image.Image | Tensor | None = None
    part_mask: Image.Image | Tensor | None = None
    augment: dict[str, Tensor] | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(W, H) of the current image."""
        if isinstance(self.image, Tensor):
            return int(self.image.shape[-1]), int(self.image.shape[-2])
        return self.image.size


JointTransform = Callable[[Sample], Sample]

IGNORE = 255  # part-mask value of pixels without a label (outside the image after a crop or warp)


class JointOp:
    """Base of the joint ops: datasets recognise them (``joint = True``) and pass a whole :class:`Sample`, where a
    plain torchvision transform would get the image alone."""

    joint = True

    def __call__(self, sample: Sample) -> Sample:
        raise NotImplementedError


class JointCompose(JointOp):
    """Apply joint ops in order."""

    def __init__(self, ops: Sequence[JointTransform]) -> None:
        self.ops = list(ops)

    def __call__(self, sample: Sample) -> Sample:
        for op in self.ops:
            sample = op(sample)
        return sample

    def __repr__(self) -> str:
        inner = "".join(f"\n    {op!r}," for op in self.ops)
        return f"{type(self).__name__}({inner}\n)"


def mean_fill(mean: Sequence[float]) -> tuple[int, int, int]:
    """The RGB colour that normalises to ~0: areas a crop or warp exposes then carry no signal."""
    return tuple(round(255 * m) for m in mean)  # type: ignore[return-value]


def _in_frame(points: np.ndarray, width: int, height: int) -> np.ndarray:
    x, y = points[:, 0], points[:, 1]
    return (x >= -0.5) & (x < width - 0.5) & (y >= -0.5) & (y < height - 0.5)


def _map_geometry(sample: Sample, matrix: np.ndarray, new_size: tuple[int, int], *, clip_box: bool = True) -> Sample:
    """Move keypoints and box by the (2, 3) affine ``matrix`` (pixel-centre coordinates) into a frame of
    ``new_size`` = (W, H); keypoints leaving it become invisible, the box is clipped to it unless ``clip_box`` is
    false (the reference's keypoint-regression protocol needs the box's unclipped size)."""
    width, height = new_size
    keypoints, visible, bbox = sample.keypoints, sample.visible, sample.bbox
    if keypoints is not None:
        keypoints = keypoints @ matrix[:, :2].T + matrix[:, 2]
        if visible is not None:
            visible = visible & _in_frame(keypoints, width, height)
    if bbox is not None:
        x0, y0, x1, y1 = bbox
        corners = np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]]) @ matrix[:, :2].T + matrix[:, 2]
        lo, hi = corners.min(0), corners.max(0)
        bbox = np.concatenate([lo, hi])
        if clip_box:
            bbox = np.clip(bbox, -0.5, np.array([width, height, width, height]) - 0.5)
    return replace(sample, keypoints=keypoints, visible=visible, bbox=bbox)


def _crop(img: Image.Image, left: int, top: int, width: int, height: int, fill) -> Image.Image:
    """Crop with the part outside the image filled with ``fill`` (PIL alone would fill with zeros)."""
    w, h = img.size
    if left >= 0 and top >= 0 and left + width <= w and top + height <= h:
        return img.crop((left, top, left + width, top + height))
    out = Image.new(img.mode, (width, height), fill)
    out.paste(img, (-left, -top))
    return out


class Crop(JointOp):
    """Crop the box of pixels [left, left + width) x [top, top + height); may extend past the image (filled).
    ``clip_box=False`` moves the bounding box without clipping it to the crop."""

    def __init__(self, left: int, top: int, width: int, height: int, *, fill=(0, 0, 0), clip_box: bool = True) -> None:
        self.box = (int(left), int(top), int(width), int(height))
        self.fill, self.clip_box = fill, clip_box

    def __call__(self, sample: Sample) -> Sample:
        left, top, width, height = self.box
        matrix = np.array([[1.0, 0.0, -left], [0.0, 1.0, -top]])
        out = _map_geometry(sample, matrix, (width, height), clip_box=self.clip_box)
        out.image = _crop(sample.image, left, top, width, height, self.fill)
        if sample.mask is not None:
            out.mask = _crop(sample.mask, left, top, width, height, 0)
        if sample.part_mask is not None:
            out.part_mask = _crop(sample.part_mask, left, top, width, height, IGNORE)
        return out

    def __repr__(self) -> str:
        return f"Crop(box={self.box})"


class BBoxCrop(JointOp):
    """Crop to the sample's bounding box: pixels ``floor(x0 + 0.5) .. ceil(x1 + 0.5) - 1`` (for a CUB box exactly
    its ``w x h`` pixels), at least one pixel. Used by the consistency / stability protocol."""

    def __call__(self, sample: Sample) -> Sample:
        if sample.bbox is None:
            raise ValueError("BBoxCrop needs a sample with a bounding box")
        width, height = sample.size
        x0, y0, x1, y1 = sample.bbox
        left = min(max(math.floor(x0 + 0.5), 0), width - 1)
        top = min(max(math.floor(y0 + 0.5), 0), height - 1)
        right = max(min(math.ceil(x1 + 0.5), width), left + 1)
        bottom = max(min(math.ceil(y1 + 0.5), height), top + 1)
        return Crop(left, top, right - left, bottom - top)(sample)

    def __repr__(self) -> str:
        return "BBoxCrop()"


def _resize(sample: Sample, new_w: int, new_h: int, clip_box: bool = True) -> Sample:
    width, height = sample.size
    sx, sy = new_w / width, new_h / height
    matrix = np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5]])
    out = _map_geometry(sample, matrix, (new_w, new_h), clip_box=clip_box)
    out.image = sample.image.resize((new_w, new_h), Image.BILINEAR)
    if sample.mask is not None:
        out.mask = sample.mask.resize((new_w, new_h), Image.BILINEAR)
    if sample.part_mask is not None:
        out.part_mask = sample.part_mask.resize((new_w, new_h), Image.NEAREST)
    return out


class ResizeShorter(JointOp):
    """Resize so the shorter side is ``size``, keeping the aspect ratio; the longer side is
    ``int(size * long / short)`` as in torchvision. Bilinear (antialiased when shrinking). ``clip_box`` as
    :class:`Crop`."""

    def __init__(self, size: int, *, clip_box: bool = True) -> None:
        self.size, self.clip_box = int(size), clip_box

    def __call__(self, sample: Sample) -> Sample:
        width, height = sample.size
        if width <= height:
            new_w, new_h = self.size, int(self.size * height / width)
        else:
            new_w, new_h = int(self.size * width / height), self.size
        if (new_w, new_h) == (width, height):
            return sample
        return _resize(sample, new_w, new_h, self.clip_box)

    def __repr__(self) -> str:
        return f"ResizeShorter({self.size})"


class Resize(JointOp):
    """Resize to exactly ``size`` = (H, W) (an int means square), ignoring the aspect ratio."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))

    def __call__(self, sample: Sample) -> Sample:
        height, width = self.size
        if (width, height) == sample.size:
            return sample
        return _resize(sample, width, height)

    def __repr__(self) -> str:
        return f"Resize({self.size})"


class RandomHorizontalFlip(JointOp):
    """Mirror left-right with probability ``p``: pixel column i -> W-1-i, keypoint x -> W-1-x."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = float(p)

    def draw(self, size: tuple[int, int]) -> bool:
        """Whether to flip (one number from torch's RNG)."""
        return torch.rand(()).item() < self.p

    def apply(self, sample: Sample, flip: bool) -> Sample:
        return hflip(sample) if flip else sample

    def __call__(self, sample: Sample) -> Sample:
        return self.apply(sample, self.draw(sample.size))

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


def hflip(sample: Sample) -> Sample:
    """Deterministic horizontal flip of a sample."""
    width, height = sample.size
    matrix = np.array([[-1.0, 0.0, width - 1.0], [0.0, 1.0, 0.0]])
    out = _map_geometry(sample, matrix, (width, height))
    out.image = sample.image.transpose(Image.FLIP_LEFT_RIGHT)
    if sample.mask is not None:
        out.mask = sample.mask.transpose(Image.FLIP_LEFT_RIGHT)
    if sample.part_mask is not None:
        out.part_mask = sample.part_mask.transpose(Image.FLIP_LEFT_RIGHT)
    return out


def affine_matrix(size: tuple[int, int], angle: float, translate: tuple[float, float], scale: float) -> np.ndarray:
    """Forward (2, 3) map of torchvision's ``F.affine(img, angle, translate, scale, shear=0)`` in pixel-centre
    coordinates: rotate by ``angle`` degrees (clockwise on screen) and scale about ((W-1)/2, (H-1)/2), then
    translate."""
    width, height = size
    cx, cy = (width - 1) / 2, (height - 1) / 2
    rad = math.radians(angle)
    a, b = scale * math.cos(rad), -scale * math.sin(rad)
    c, d = scale * math.sin(rad), scale * math.cos(rad)
    tx, ty = translate
    return np.array([
        [a, b, cx + tx - a * cx - b * cy],
        [c, d, cy + ty - c * cx - d * cy],
    ])


_RESAMPLE = {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def _warp(img: Image.Image, matrix: np.ndarray, fill, interpolation: str = "bilinear") -> Image.Image:
    """Resample ``img`` under the forward centre-coordinate ``matrix`` (``interpolation``: bilinear | nearest). PIL
    wants the inverse map in pixel-edge coordinates (edge = centre + 0.5), output to input."""
    shift = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    forward = np.vstack([matrix, [0.0, 0.0, 1.0]])
    inverse = np.linalg.inv(shift @ forward @ np.linalg.inv(shift))
    return img.transform(img.size, Image.AFFINE, tuple(inverse[:2].ravel()), resample=_RESAMPLE[interpolation],
                         fillcolor=fill)


class RandomAffine(JointOp):
    """Random rotation in [-degrees, degrees], translation up to ``translate`` x the side (whole pixels, as
    torchvision), isotropic scale in ``scale``; output keeps the input size, exposed areas get ``fill``. The image is
    resampled with ``interpolation`` (bilinear | nearest; torchvision's RandomAffine defaults to nearest)."""

    def __init__(self, degrees: float, *, translate: float = 0.0, scale: Sequence[float] = (1.0, 1.0),
                 fill=(0, 0, 0), interpolation: str = "bilinear") -> None:
        if interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation={interpolation!r} must be one of {', '.join(_RESAMPLE)}")
        self.degrees, self.translate = float(degrees), float(translate)
        self.scale = (float(scale[0]), float(scale[1]))
        self.fill, self.interpolation = fill, interpolation

    def draw(self, size: tuple[int, int]) -> tuple[float, tuple[float, float], float]:
        """Sample (angle, (tx, ty), scale) with torch's RNG, in torchvision's order."""
        angle = (torch.rand(()).item() * 2 - 1) * self.degrees
        max_dx, max_dy = self.translate * size[0], self.translate * size[1]
        tx = float(round((torch.rand(()).item() * 2 - 1) * max_dx))
        ty = float(round((torch.rand(()).item() * 2 - 1) * max_dy))
        scale = self.scale[0] + torch.rand(()).item() * (self.scale[1] - self.scale[0])
        return angle, (tx, ty), scale

    def apply(self, sample: Sample, params: tuple[float, tuple[float, float], float]) -> Sample:
        angle, translate, scale = params
        return apply_affine(sample, angle, translate, scale, fill=self.fill, interpolation=self.interpolation)

    def __call__(self, sample: Sample) -> Sample:
        return self.apply(sample, self.draw(sample.size))

    def __repr__(self) -> str:
        return (f"RandomAffine(degrees={self.degrees}, translate={self.translate}, scale={self.scale}, "
                f"fill={self.fill}, interpolation={self.interpolation})")


def apply_affine(sample: Sample, angle: float, translate: tuple[float, float], scale: float, *,
                 fill=(0, 0, 0), interpolation: str = "bilinear") -> Sample:
    """Deterministic affine warp of a sample (see :func:`affine_matrix`); the image is resampled with
    ``interpolation`` (bilinear | nearest), the mask always bilinearly."""
    matrix = affine_matrix(sample.size, angle, translate, scale)
    out = _map_geometry(sample, matrix, sample.size)
    out.image = _warp(sample.image, matrix, fill, interpolation)
    if sample.mask is not None:
        out.mask = _warp(sample.mask, matrix, 0)
    if sample.part_mask is not None:
        out.part_mask = _warp(sample.part_mask, matrix, IGNORE, "nearest")
    return out


class CenterCrop(JointOp):
    """Crop ``size`` x ``size`` around the centre, offsets ``int(round((W - size) / 2))`` as torchvision; an image
    smaller than ``size`` is padded with ``fill``. ``clip_box`` as :class:`Crop`."""

    def __init__(self, size: int, *, fill=(0, 0, 0), clip_box: bool = True) -> None:
        self.size, self.fill, self.clip_box = int(size), fill, clip_box

    def draw(self, size: tuple[int, int]) -> tuple[int, int]:
        """(left, top) of the crop in an image of ``size`` = (W, H) (nothing random)."""
        width, height = size
        return round((width - self.size) / 2.0), round((height - self.size) / 2.0)

    def __call__(self, sample: Sample) -> Sample:
        left, top = self.draw(sample.size)
        return Crop(left, top, self.size, self.size, fill=self.fill, clip_box=self.clip_box)(sample)

    def __repr__(self) -> str:
        return f"CenterCrop({self.size})"


class RandomCrop(JointOp):
    """Crop ``size`` x ``size`` at a uniformly random offset; a side shorter than ``size`` is padded with
    ``fill`` at a random position instead."""

    def __init__(self, size: int, *, fill=(0, 0, 0)) -> None:
        self.size, self.fill = int(size), fill

    def _offset(self, extent: int) -> int:
        slack = extent - self.size
        offset = int(torch.randint(0, abs(slack) + 1, ()).item())
        return offset if slack >= 0 else -offset

    def draw(self, size: tuple[int, int]) -> tuple[int, int]:
        """(left, top) of the crop in an image of ``size`` = (W, H), from torch's RNG."""
        width, height = size
        top = self._offset(height)  # torchvision draws the row first
        left = self._offset(width)
        return left, top

    def __call__(self, sample: Sample) -> Sample:
        left, top = self.draw(sample.size)
        return Crop(left, top, self.size, self.size, fill=self.fill)(sample)

    def __repr__(self) -> str:
        return f"RandomCrop({self.size})"


class ColorJitter(JointOp):
    """torchvision's colour jitter on the image only (brightness, contrast, saturation, hue); a real jitter, not
    the argument-less no-op of the reference code."""

    # Identity factors of the four adjustments (brightness, contrast, saturation, hue), for those switched off.
    IDENTITY = (1.0, 1.0, 1.0, 0.0)

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0,
                 hue: float = 0.0) -> None:
        self.jitter = _TvColorJitter(brightness, contrast, saturation, hue)

    @property
    def enabled(self) -> tuple[bool, bool, bool, bool]:
        """Which of brightness, contrast, saturation and hue vary (torchvision leaves the others out)."""
        j = self.jitter
        return tuple(v is not None for v in (j.brightness, j.contrast, j.saturation, j.hue))  # type: ignore

    def draw(self, size: tuple[int, int]) -> tuple[list[int], tuple[float, float, float, float]]:
        """(order of the four adjustments, their factors) from torch's RNG exactly as torchvision's
        ``ColorJitter.forward`` draws them; switched-off adjustments get their identity factor."""
        j = self.jitter
        order, *factors = j.get_params(j.brightness, j.contrast, j.saturation, j.hue)
        return order.tolist(), tuple(ident if f is None else float(f)  # type: ignore[return-value]
                                     for f, ident in zip(factors, self.IDENTITY))

    def apply(self, sample: Sample, params: tuple[list[int], tuple[float, float, float, float]]) -> Sample:
        """The adjustments in ``order``, as torchvision's ``ColorJitter.forward`` applies them."""
        order, factors = params
        adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        image = sample.image
        for i in order:
            if self.enabled[i]:
                image = adjust[i](image, factors[i])
        return replace(sample, image=image)

    def __call__(self, sample: Sample) -> Sample:
        return self.apply(sample, self.draw(sample.size))

    def __repr__(self) -> str:
        return repr(self.jitter)


class ToTensorNormalize(JointOp):
    """End of a pipeline: image -> float tensor (3, H, W) normalised by ``mean``/``std``; mask -> float (1, H, W)
    in [0, 1]; part_mask -> int64 (H, W) with IGNORE as -1; keypoints -> float32 (P, 2) with invisible ones set to
    (0, 0); visible -> bool (P,); bbox -> float32 (4,)."""

    def __init__(self, mean: Sequence[float] = (0.485, 0.456, 0.406),
                 std: Sequence[float] = (0.229, 0.224, 0.225)) -> None:
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]

    def __call__(self, sample: Sample) -> Sample:
        image = TF.normalize(TF.to_tensor(sample.image), self.mean, self.std)
        mask = None if sample.mask is None else TF.to_tensor(sample.mask)
        keypoints, visible, bbox = sample.keypoints, sample.visible, sample.bbox
        if visible is not None:
            visible = torch.from_numpy(np.asarray(visible, dtype=bool).copy())
        if keypoints is not None:
            keypoints = torch.from_numpy(np.asarray(keypoints, dtype=np.float32).copy())
            if visible is not None:
                keypoints[~visible] = 0.0
        if bbox is not None:
            bbox = torch.from_numpy(np.asarray(bbox, dtype=np.float32).copy())
        part_mask = None
        if sample.part_mask is not None:
            part_mask = torch.from_numpy(np.asarray(sample.part_mask, dtype=np.int64).copy())
            part_mask[part_mask == IGNORE] = -1
        return Sample(image=image, keypoints=keypoints, visible=visible, bbox=bbox, mask=mask, part_mask=part_mask)

    def __repr__(self) -> str:
        return f"ToTensorNormalize(mean={self.mean}, std={self.std})"


def is_joint(transform: Callable) -> bool:
    """Whether ``transform`` takes a whole :class:`Sample` (a joint op) rather than an image alone."""
    return bool(getattr(transform, "joint", False))


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
