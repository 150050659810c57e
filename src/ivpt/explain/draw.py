"""Drawing primitives shared by every figure: the one concept palette, fonts, text chips and the region overlay.

Colour rule used by all views (regions, hierarchy, evidence, galleries, HTML): concept ``k`` of any stage is drawn
in ``concept_color(k)``. A concept's id is stable across images, so the same colour always means the same
prototype of that stage; the final stage's colours are also the coarse concepts' colours in the hierarchy and
the evidence bars. Background is never coloured.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "PALETTE",
    "concept_color",
    "hex_color",
    "text_color_on",
    "ink_color",
    "font",
    "text_size",
    "upsample_labels",
    "overlay_regions",
    "draw_chip",
]

# Categorical palette: tab10 without its grey (grey reads as background), then lighter and extra hues. Fixed, so
# figures from different runs and images compare directly. Concepts beyond 20 reuse colours (ids stay labelled).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207), (57, 59, 121),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (0, 128, 128), (231, 186, 82), (132, 60, 57), (158, 218, 229), (206, 109, 189),
)

BACKGROUND_TEXT = (90, 90, 90)


def concept_color(k: int) -> tuple[int, int, int]:
    """RGB colour of concept ``k`` (any stage)."""
    return PALETTE[k % len(PALETTE)]


def hex_color(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def _luminance(rgb: tuple[int, int, int]) -> float:
    r, g, b = rgb
    return 0.299 * r + 0.587 * g + 0.114 * b


def text_color_on(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever reads better on a fill of colour ``rgb``."""
    return (20, 20, 20) if _luminance(rgb) > 150 else (255, 255, 255)


def ink_color(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """``rgb`` darkened just enough to be legible as text or a thin line on white paper."""
    lum = _luminance(rgb)
    if lum <= 140:
        return rgb
    f = 140.0 / lum
    return tuple(int(c * f) for c in rgb)  # type: ignore[return-value]


@lru_cache(maxsize=None)
def font(size: int = 13) -> ImageFont.ImageFont:
    """Pillow's bundled font at ``size`` px (a scalable TrueType on Pillow >= 10.1, else the fixed bitmap one),
    so figures need no system fonts and render identically everywhere the same Pillow is installed."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: bitmap font only
        return ImageFont.load_default()


def text_size(text: str, fnt: ImageFont.ImageFont) -> tuple[int, int]:
    """(width, height) of ``text`` drawn in ``fnt``: the ink box from the drawing origin."""
    left, top, right, bottom = fnt.getbbox(text)
    return int(right), int(bottom)


def upsample_labels(maps: np.ndarray | torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Argmax concept of every pixel after bilinear upsampling of soft maps.

    Args:
        maps: (n, h, w) or (B, n, h, w) soft maps.
        size: (H, W) output resolution.
    Returns:
        int16 labels (H, W) or (B, H, W). Upsampling the soft maps before the argmax (rather than upsampling the
        labels) gives smooth region boundaries at any display size.
    """
    t = torch.as_tensor(maps, dtype=torch.float32)
    single = t.dim() == 3
    if single:
        t = t[None]
    up = F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)
    labels = up.argmax(dim=1).to(torch.int16).numpy()
    return labels[0] if single else labels


def _boundaries(labels: np.ndarray) -> np.ndarray:
    """Boolean (H, W): pixels whose right or lower neighbour has another label, thickened to two pixels."""
    edge = np.zeros(labels.shape, dtype=bool)
    dx = labels[:, 1:] != labels[:, :-1]
    dy = labels[1:, :] != labels[:-1, :]
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    edge[1:, :] |= dy
    edge[:-1, :] |= dy
    return edge


def draw_chip(
    draw: ImageDraw.ImageDraw,
    xy: tuple[float, float],
    text: str,
    fill: tuple[int, int, int],
    *,
    fnt: ImageFont.ImageFont,
    anchor_center: bool = True,
    outline: tuple[int, int, int] | None = (255, 255, 255),
    pad: int = 3,
) -> tuple[int, int, int, int]:
    """A rounded label box filled with ``fill`` holding ``text``; centred on ``xy`` (or with top-left at it).

    Returns the box (x0, y0, x1, y1)."""
    tw, th = text_size(text, fnt)
    w, h = tw + 2 * pad + 2, th + 2 * pad
    x, y = xy
    x0, y0 = (int(round(x - w / 2)), int(round(y - h / 2))) if anchor_center else (int(x), int(y))
    box = (x0, y0, x0 + w, y0 + h)
    draw.rounded_rectangle(box, radius=min(5, h // 2), fill=fill, outline=outline, width=1 if outline else 0)
    draw.text((x0 + pad + 1, y0 + pad), text, font=fnt, fill=text_color_on(fill))
    return box


def _label_point(mask: np.ndarray) -> tuple[int, int]:
    """A point inside ``mask`` close to its centroid (the centroid itself may fall outside a concave region)."""
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    j = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
    return int(xs[j]), int(ys[j])


def overlay_regions(
    image: np.ndarray,
    maps: np.ndarray,
    *,
    size: int = 256,
    alpha: float = 0.5,
    label_ids: bool = True,
    font_size: int = 12,
) -> Image.Image:
    """The input with each foreground concept's argmax region tinted in its colour, boundaries and ids drawn.

    Args:
        image: (H, W, 3) uint8 input.
        maps: (n, h, w) soft maps of one stage, background last.
        size: length of the longer side of the returned image in pixels.
        alpha: opacity of the concept tint.
    Returns:
        RGB PIL image. Background pixels keep the photo, slightly desaturated so the coloured regions stand out.
    """
    H, W = image.shape[:2]
    scale = size / max(H, W)
    out_hw = (max(1, round(H * scale)), max(1, round(W * scale)))
    base = np.asarray(Image.fromarray(image).resize(out_hw[::-1], Image.BICUBIC), dtype=np.float32)
    labels = upsample_labels(maps, out_hw)
    n = maps.shape[0]
    bg = labels == n - 1
    grey = base.mean(axis=-1, keepdims=True)
    out = np.where(bg[..., None], 0.55 * base + 0.45 * grey * 0.85, base)
    colors = np.array([concept_color(k) for k in range(n - 1)] + [(0, 0, 0)], dtype=np.float32)
    tint = colors[labels]
    out = np.where(bg[..., None], out, (1 - alpha) * out + alpha * tint)
    edges = _boundaries(labels)
    out[edges] = 0.25 * out[edges] + 0.75 * 255.0
    img = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    if label_ids:
        draw = ImageDraw.Draw(img)
        fnt = font(font_size)
        for k in range(n - 1):
            mask = labels == k
            if mask.any():
                draw_chip(draw, _label_point(mask), str(k), concept_color(k), fnt=fnt)
    return img
