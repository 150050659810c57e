"""The device half of ``data.gpu_augment``: flip, affine warp, crop, colour jitter and normalisation of a whole
uint8 batch on the training device, with the per-image parameters the loader workers drew
(:class:`ivpt.data.transforms.DeviceAugmentPlan`, from the same per-item seeds and the same ``draw`` methods as the
CPU pipeline).

Geometry is ONE resampling per image: the worker composed flip, affine and crop into a map from output pixel
centres to source pixel centres (the coordinate conventions of :mod:`ivpt.data.transforms`), sampled here with
``grid_sample`` the way PIL's affine transform samples: a source point outside ``[-0.5, W - 0.5) x [-0.5, H - 0.5)``
takes the affine fill, inside it bilinear (or nearest) interpolation with edge pixels repeated; an output pixel
outside the affine frame takes the crop's fill. Without an affine op the map is a flip plus a whole-pixel shift
and nearest sampling copies pixels exactly. Colour jitter follows torchvision's tensor formulas in float, in the
per-image order torchvision would use; images stay in float from the uint8 decode to the normalisation, where
the CPU path rounds to uint8 after every PIL op.

Shapes: B images, canvas (Hc, Wc) = the largest decoded image of the batch (smaller ones zero-padded at the
bottom/right by :func:`ivpt.data.collate_skip_corrupt`), S = ``model.img_size``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from ..runtime import to_device
from .transforms import ColorJitter, mean_fill

if TYPE_CHECKING:
    from ..config import DataConfig

__all__ = ["DeviceAugment", "adjust_brightness", "adjust_contrast", "adjust_saturation", "adjust_hue"]

_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def _factor(f: Tensor) -> Tensor:
    return f.view(-1, 1, 1, 1)


def _gray(x: Tensor) -> Tensor:
    r, g, b = x.unbind(dim=1)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).unsqueeze(1)


def _blend(x: Tensor, other: Tensor, f: Tensor) -> Tensor:
    f = _factor(f)
    return (f * x + (1.0 - f) * other).clamp(0.0, 1.0)


def adjust_brightness(x: Tensor, f: Tensor) -> Tensor:
    """torchvision's ``adjust_brightness`` of float images (B, 3, H, W) in [0, 1], one factor per image (B,): its
    blend with black, ``f·x + (1 - f)·0``, is ``f·x`` exactly."""
    return (_factor(f) * x).clamp(0.0, 1.0)


def adjust_contrast(x: Tensor, f: Tensor) -> Tensor:
    """torchvision's ``adjust_contrast`` (blend with the mean grey level), one factor per image."""
    return _blend(x, _gray(x).mean(dim=(-3, -2, -1), keepdim=True), f)


def adjust_saturation(x: Tensor, f: Tensor) -> Tensor:
    """torchvision's ``adjust_saturation`` (blend with the grey image), one factor per image."""
    return _blend(x, _gray(x), f)


def adjust_hue(x: Tensor, f: Tensor) -> Tensor:
    """torchvision's ``adjust_hue`` (hue shifted in HSV space), one shift in [-0.5, 0.5] per image.

    RGB → HSV as torchvision computes it; HSV → RGB in the closed form ``c_n = v - v·s·clamp(min(k, 4 - k), 0, 1)``
    with ``k = (n + 6h) mod 6`` for n = 5, 3, 1 (R, G, B), the same function as torchvision's six-sextant select
    in a few passes instead of a (B, 3, 6, H, W) product."""
    r, g, b = x.unbind(dim=1)
    v = x.amax(dim=1)
    chroma = v - x.amin(dim=1)
    grey = chroma == 0
    s = chroma / torch.where(grey, torch.ones_like(v), v)
    c = torch.where(grey, torch.ones_like(chroma), chroma)
    h = torch.where(v == r, (v - b) / c - (v - g) / c,
                    torch.where(v == g, 2.0 + (v - r) / c - (v - b) / c, 4.0 + (v - g) / c - (v - r) / c))
    h = torch.where(grey, torch.zeros_like(h), h)
    h = (torch.fmod(h / 6.0 + 1.0, 1.0) + f.view(-1, 1, 1)) % 1.0
    vs = v * s
    return torch.stack([v - vs * torch.minimum((n + 6.0 * h) % 6.0, 4.0 - (n + 6.0 * h) % 6.0).clamp(0.0, 1.0)
                        for n in (5.0, 3.0, 1.0)], dim=1)


_ADJUST = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)  # torchvision's order indices


class DeviceAugment:
    """Finish a ``data.gpu_augment`` batch on its device: ``DeviceAugment(cfg.data, img_size)(images, augment)``.

    Args (of the call):
        images: uint8 (B, 3, Hc, Wc) on the training device.
        augment: the batch's ``augment`` dict (collated :class:`~ivpt.data.transforms.DeviceAugmentPlan` output,
            on the host: the jitter order is grouped there, so nothing is read back from the device).
    Returns:
        float32 (B, 3, S, S), normalised by ``data.mean`` / ``data.std`` — what the CPU pipeline's items hold.
    """

    def __init__(self, cfg: DataConfig, img_size: int) -> None:
        self.size = int(img_size)
        warps = cfg.augment and (cfg.affine_degrees > 0 or cfg.affine_translate > 0
                                 or tuple(cfg.affine_scale) != (1.0, 1.0))
        self.mode = cfg.affine_interpolation if warps else "nearest"  # no warp: whole-pixel copies
        fill = mean_fill(cfg.mean)
        self.crop_fill = torch.tensor(fill, dtype=torch.float32) / 255
        self.affine_fill = self.crop_fill if cfg.affine_fill == "mean" else torch.zeros(3)
        enabled = ColorJitter(*cfg.color_jitter).enabled if cfg.augment else (False,) * 4
        self.adjust = [(i, fn) for i, (fn, on) in enumerate(zip(_ADJUST, enabled)) if on]
        self.mean = torch.tensor(cfg.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.std, dtype=torch.float32).view(1, 3, 1, 1)
        self._constants: dict[torch.device, dict[str, Tensor]] = {}

    def constants(self, device: torch.device) -> dict[str, Tensor]:
        """mean, std, affine_fill, crop_fill as (1, 3, 1, 1) tensors on ``device``, copied there once."""
        if device not in self._constants:
            values = {"mean": self.mean, "std": self.std, "affine_fill": self.affine_fill, "crop_fill": self.crop_fill}
            self._constants[device] = {k: to_device(v.view(1, 3, 1, 1), device) for k, v in values.items()}
        return self._constants[device]

    def __call__(self, images: Tensor, augment: dict[str, Tensor]) -> Tensor:
        device = images.device
        x = self.geometry(images.float().div_(255), augment)
        x = self.jitter(x, to_device(augment["jitter"], device), augment["order"])
        c = self.constants(device)
        return x.sub_(c["mean"]).div_(c["std"])

    def geometry(self, x: Tensor, augment: dict[str, Tensor]) -> Tensor:
        """Resample float images (B, 3, Hc, Wc) into the (B, 3, S, S) crops (flip, affine and crop in one map)."""
        device, (b, _, hc, wc), s = x.device, x.shape, self.size
        matrix = to_device(augment["matrix"], device)  # (B, 2, 3): output -> source pixel centres
        frame = to_device(augment["frame"], device).view(b, 4, 1, 1).float()
        left, top, width, height = frame.unbind(dim=1)  # (B, 1, 1) each
        u = torch.arange(s, device=device, dtype=torch.float32)
        src = (matrix[:, None, None, :, 0] * u.view(1, 1, s, 1) + matrix[:, None, None, :, 1] * u.view(1, s, 1, 1)
               + matrix[:, None, None, :, 2])  # (B, S, S, 2): x, y of every output pixel (row v, column u)
        sx, sy = src.unbind(dim=-1)
        inside = (sx >= -0.5) & (sx < width - 0.5) & (sy >= -0.5) & (sy < height - 0.5)
        in_frame = ((u.view(1, 1, s) + left >= 0) & (u.view(1, 1, s) + left < width)
                    & (u.view(1, s, 1) + top >= 0) & (u.view(1, s, 1) + top < height))
        # PIL repeats edge pixels for points within half a pixel of the border: clamp, then normalise to the
        # canvas (align_corners=False: pixel centre i sits at (2i + 1) / size - 1).
        sx = torch.minimum(sx.clamp_min(0.0), width - 1)
        sy = torch.minimum(sy.clamp_min(0.0), height - 1)
        grid = torch.stack(((2 * sx + 1) / wc - 1, (2 * sy + 1) / hc - 1), dim=-1)
        out = F.grid_sample(x, grid, mode=self.mode, padding_mode="zeros", align_corners=False)
        c = self.constants(device)
        out = torch.where(inside.unsqueeze(1), out, c["affine_fill"])
        return torch.where(in_frame.unsqueeze(1), out, c["crop_fill"])

    def jitter(self, x: Tensor, factors: Tensor, order: Tensor) -> Tensor:
        """Colour jitter of float images (B, 3, S, S) with per-image ``factors`` (B, 4) on the device, in the
        per-image ``order`` (B, 4) given on the host: at each of the four positions, each adjustment runs once on
        the images that take it there (index sets computed on the host, no device read-back)."""
        if not self.adjust:
            return x
        b = x.shape[0]
        order = order.cpu()
        steps = [(i, fn, (order[:, position] == i).nonzero().flatten()) for position in range(4)
                 for i, fn in self.adjust]
        index = to_device(torch.cat([rows for _, _, rows in steps]), x.device)  # every index set, one copy
        at = 0
        for i, fn, rows in steps:
            n, rows, at = rows.numel(), index[at : at + rows.numel()], at + rows.numel()
            if n == b:
                x = fn(x, factors[:, i])
            elif n:
                x = x.index_copy(0, rows, fn(x.index_select(0, rows), factors.index_select(0, rows)[:, i]))
        return x
