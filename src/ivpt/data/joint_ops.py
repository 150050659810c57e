"""The joint ops: crops, resizes, flips, affine warps, colour jitter and the final conversion to tensors, each
moving an image, its keypoints, box and masks together (coordinate conventions: :mod:`ivpt.data.transforms`).
The random ones separate drawing from applying (``draw(size)`` then ``apply(sample, params)``)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import ColorJitter as _TvColorJitter
from torchvision.transforms import functional as TF

from ..config import IMAGENET_MEAN, IMAGENET_STD
from .joint import IGNORE, JointOp, Sample


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

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
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
