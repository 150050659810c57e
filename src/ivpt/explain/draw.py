"""What every figure shares: the one concept palette, the region overlay and writing a matplotlib figure.

Colour rule of all views (regions, hierarchy, evidence, galleries): concept ``k`` of any stage is drawn in
``concept_color(k)``; the final stage's colours are also the coarse concepts' colours in the hierarchy and the
evidence bars. Background is never coloured. Figures are built with matplotlib's object API (``Figure``, Agg:
no display, no pyplot state), so a researcher restyles them with ordinary matplotlib and saves PNG, SVG or PDF.
"""
from __future__ import annotations

import base64
import io
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from PIL import Image

from .core import upsample_labels

__all__ = ["FORMATS", "PALETTE", "concept_color", "concept_rgb", "shorten", "boundaries", "show_regions",
           "save_figure", "figure_bytes", "data_uri"]

FORMATS = ("png", "svg", "pdf")
# tab10 without its grey (grey reads as background), then lighter and extra hues; concepts beyond 20 reuse colours.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
           "#393b79", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#008080", "#e7ba52", "#843c39",
           "#9edae5", "#ce6dbd")
MUTED = "#6b6b6b"  # secondary text
# Text editable in SVG/PDF (fonts named, not outlined); fixed SVG ids and no dates, so equal figures give equal files.
SAVE_RC = {"svg.fonttype": "none", "svg.hashsalt": "ivpt", "pdf.fonttype": 42}
METADATA = {"png": {"Software": None}, "svg": {"Date": None}, "pdf": {"CreationDate": None}}


def shorten(text: str, width: int = 30) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def concept_color(k: int) -> str:
    """Colour of concept ``k`` (any stage) as '#rrggbb'."""
    return PALETTE[k % len(PALETTE)]


def concept_rgb(k: int) -> np.ndarray:
    """``concept_color(k)`` as uint8 RGB."""
    return (np.array(matplotlib.colors.to_rgb(concept_color(k))) * 255).round().astype(np.uint8)


def boundaries(labels: np.ndarray) -> np.ndarray:
    """Boolean mask of the pixels of ``labels`` (H, W) with a 4-neighbour of another label (both sides of a border)."""
    edge = np.zeros(labels.shape, dtype=bool)
    for a, b, before, after in ((labels[:, 1:], labels[:, :-1], np.s_[:, 1:], np.s_[:, :-1]),
                                (labels[1:], labels[:-1], np.s_[1:], np.s_[:-1])):
        edge[before] |= a != b
        edge[after] |= a != b
    return edge


def show_regions(ax: Axes, image: np.ndarray, maps: np.ndarray | None, *, size: int = 224, alpha: float = 0.5,
                 ids: bool = True) -> np.ndarray | None:
    """Draw ``image`` (H, W, 3) uint8 on ``ax`` with each foreground concept's argmax region of ``maps`` (n, h, w;
    background last) tinted in its colour, boundaries in white, background desaturated and ids at the regions.

    The longer side is resampled to ``size`` pixels first. Returns the labels (H', W'), or None without maps."""
    H, W = image.shape[:2]
    scale = size / max(H, W)
    hw = (max(1, round(H * scale)), max(1, round(W * scale)))
    base = np.asarray(Image.fromarray(image).resize(hw[::-1], Image.BICUBIC), dtype=np.float32) / 255
    ax.set_axis_off()
    if maps is None:
        ax.imshow(base)
        return None
    labels, n = upsample_labels(maps, hw), maps.shape[0]
    bg = (labels == n - 1)[..., None]
    colours = np.array([matplotlib.colors.to_rgb(concept_color(k)) for k in range(n - 1)] + [(0, 0, 0)])
    grey = base.mean(axis=-1, keepdims=True)
    out = np.where(bg, 0.55 * base + 0.38 * grey, (1 - alpha) * base + alpha * colours[labels])
    edge = boundaries(labels)
    out[edge] = 0.25 * out[edge] + 0.75
    ax.imshow(out.clip(0, 1), interpolation="bilinear")
    for k in range(n - 1) if ids else ():
        ys, xs = np.nonzero(labels == k)
        if ys.size:  # the region pixel nearest its centroid (the centroid may fall outside a concave region)
            j = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
            ax.text(xs[j], ys[j], str(k), ha="center", va="center", fontsize=8, fontweight="bold", color="white",
                    bbox=dict(boxstyle="round,pad=0.2", fc=concept_color(k), ec="white", lw=0.8))
    return labels


def save_figure(fig: Figure, path: str | Path | io.BytesIO, fmt: str = "png", *, dpi: int = 150) -> None:
    """Write ``fig`` as ``fmt`` (png, svg or pdf) with editable text, reproducibly (no dates, fixed ids)."""
    if fmt not in FORMATS:
        raise ValueError(f"figure format {fmt!r}: choose from {', '.join(FORMATS)}")
    with matplotlib.rc_context(SAVE_RC):
        fig.savefig(path, format=fmt, dpi=dpi, bbox_inches="tight", pad_inches=0.08, metadata=METADATA[fmt],
                    facecolor="white")


def figure_bytes(fig: Figure, fmt: str = "png", *, dpi: int = 150) -> bytes:
    buf = io.BytesIO()
    save_figure(fig, buf, fmt, dpi=dpi)
    return buf.getvalue()


def data_uri(fig: Figure, *, dpi: int = 110) -> str:
    """``data:image/png;base64,...`` of ``fig`` (what a self-contained page inlines)."""
    return "data:image/png;base64," + base64.b64encode(figure_bytes(fig, "png", dpi=dpi)).decode("ascii")
