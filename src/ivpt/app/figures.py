"""The app's drawings as RGB arrays (what a web page shows), in the library's palette: concept ``k`` has
:func:`~ivpt.explain.draw.concept_color` everywhere, regions are drawn by :func:`~ivpt.explain.draw.show_regions`."""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from ..explain.draw import MUTED, concept_color, figure_bytes, shorten, show_regions
from ..explain.render import GLOBAL_COLOR

__all__ = ["figure_array", "canvas_array", "region_overlay", "contrast_figure"]


def figure_array(fig: Figure, *, dpi: int = 100) -> np.ndarray:
    """``fig`` as the library saves it (tight box: text outside the axes kept) at ``dpi``, as (H, W, 3) uint8."""
    with Image.open(io.BytesIO(figure_bytes(fig, "png", dpi=dpi))) as im:
        return np.asarray(im.convert("RGB"))


def canvas_array(fig: Figure) -> np.ndarray:
    """``fig`` drawn once as it is laid out, as (H, W, 3) uint8: faster than :func:`figure_array` (no box to fit,
    no PNG), for figures whose content lies inside them."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def region_overlay(image: np.ndarray, maps: np.ndarray, *, alpha: float = 0.5, size: int = 256) -> np.ndarray:
    """``image`` (H, W, 3) uint8 with each foreground concept's region of ``maps`` (n, h, w; background last)
    tinted at opacity ``alpha``, its id at the region, resampled to ``size`` pixels on the longer side."""
    height, width = image.shape[:2]
    scale = size / max(height, width)
    fig = Figure(figsize=(width * scale / 100, height * scale / 100), dpi=100)
    show_regions(fig.add_axes((0, 0, 1, 1)), image, maps, size=size, alpha=alpha)
    return canvas_array(fig)


def contrast_figure(values: Sequence[Sequence[float]], titles: Sequence[str], present: Sequence[bool], *,
                    with_global: bool) -> Figure:
    """Bars per coarse concept, one panel per column of ``values`` ((rows, panels): e.g. evidence for A, for B and
    A − B) titled ``titles``; the last row is the global token's when ``with_global``. A concept absent from the
    image (``present`` False) is hatched and faded, as in :func:`~ivpt.explain.render_evidence`."""
    data = np.asarray(values, dtype=np.float64)
    rows = data.shape[0]
    names = [f"concept {n}" for n in range(rows - with_global)] + (["global"] if with_global else [])
    colours = [concept_color(n) for n in range(rows - with_global)] + ([GLOBAL_COLOR] if with_global else [])
    here = list(present)[: rows - with_global] + ([True] if with_global else [])
    fig = Figure(figsize=(3.2 * len(titles), 1.0 + 0.3 * rows), dpi=100)
    span = max(float(np.abs(data).max()), 1e-6)
    for j, title in enumerate(titles):
        ax = fig.add_axes((0.1 + j * 0.9 / len(titles), 0.2, 0.9 / len(titles) - 0.05, 0.68))
        bars = ax.barh(range(rows), data[:, j], color=colours, edgecolor=colours, height=0.7)
        for r, bar in enumerate(bars):
            v = float(data[r, j])
            if not here[r]:
                bar.set(alpha=0.35, hatch="///")
            ax.text(v, r, f" {v:+.2f} ", va="center", ha="left" if v >= 0 else "right", fontsize=7,
                    color="#222" if here[r] else MUTED)
        ax.axvline(0, color="#999", lw=0.8)
        ax.set_xlim(-1.35 * span, 1.35 * span)
        ax.set_ylim(rows - 0.5, -0.5)
        ax.set_yticks(range(rows), names if j == 0 else [""] * rows, fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
        ax.spines[["top", "right"]].set_visible(False)
        ax.set_title(shorten(title, 40), fontsize=8, loc="left")
    fig.text(0.01, 0.02, "contribution to the class logit; hatched: the concept claims no pixel of this image",
             fontsize=7, color=MUTED)
    return fig
