"""The concept hierarchy as a layered graph: which intermediate concepts feed each coarse concept, and how much.

One column per stage (fine stages left, the N coarse concepts of the final stage right); an edge from concept k
of stage i to coarse concept n has width and opacity growing with the assignment weight Q_i[k, n] and the
coarse concept's colour. Weights at or above ``label_weight`` are printed beside the source node; edges below
``min_weight`` are hidden. Fine nodes are sorted by their strongest coarse concept and each coarse node sits at
the mean height of the fine nodes it dominates, so each coarse concept's family reads as one horizontal band.

Drawn with matplotlib patches and text; in SVG every printed weight is a ``<g id="weight-<stage>-<concept>-
<coarse>">`` group, every edge ``edge-…`` and every node ``node-<stage>-<concept>``, so tools can read them back.
"""
from __future__ import annotations

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import PathPatch
from matplotlib.path import Path

from .core import Explanation, Hierarchy, prototype_count, stage_title
from .draw import MUTED, concept_color

__all__ = ["render_hierarchy"]


def _ink(colour: str) -> tuple[float, float, float]:
    """``colour`` darkened just enough to read as text on white."""
    rgb = np.array(matplotlib.colors.to_rgb(colour))
    lum = float(rgb @ [0.299, 0.587, 0.114])
    return tuple(rgb * min(1.0, 0.55 / lum)) if lum > 0 else tuple(rgb)


def _spread(ys: list[float], gap: float, top: float, bottom: float) -> list[float]:
    """Move sorted positions apart to at least ``gap`` while keeping them inside [top, bottom]."""
    out = list(ys)
    for j in range(1, len(out)):
        out[j] = max(out[j], out[j - 1] + gap)
    if out and out[-1] > bottom:
        out = [y - (out[-1] - bottom) for y in out]
        for j in range(len(out) - 2, -1, -1):
            out[j] = min(out[j], out[j + 1] - gap)
    return [y + max(0.0, top - out[0]) for y in out] if out else out


def render_hierarchy(source: Hierarchy | Explanation, index: int | None = None, *, min_weight: float = 0.1,
                     label_weight: float = 0.25, decimals: int = 2) -> Figure:
    """The fine→coarse graph of a dataset :class:`Hierarchy` or of image ``index`` of an :class:`Explanation`.
    Edges below ``min_weight`` are hidden; weights of at least ``label_weight`` are printed (``decimals`` places)."""
    h = source.hierarchy(index or 0) if isinstance(source, Explanation) else source
    m, N = len(h.assignments), h.num_coarse
    rows = max([a.shape[0] for a in h.assignments] + [N])
    fig = Figure(figsize=(1.2 + 2.0 * m, 1.5 + 0.34 * rows))
    ax = fig.add_axes((0.02, 0.1, 0.96, 0.78))
    ax.set(xlim=(-0.25, m + 0.45), ylim=(rows, 0))
    ax.set_axis_off()
    fine: dict[tuple[int, int], float] = {}
    dominant: list[list[float]] = [[] for _ in range(N)]
    for i, q in enumerate(h.assignments):
        present = np.isfinite(q).all(axis=1)
        order = sorted(range(q.shape[0]), key=lambda k: (0, int(np.argmax(q[k])), -float(np.max(q[k])), k)
                       if present[k] else (1, 0, 0.0, k))
        for slot, k in enumerate(order):
            fine[(i, k)] = y = (slot + 0.5) * rows / q.shape[0]
            if present[k]:
                dominant[int(np.argmax(q[k]))].append(y)
            ax.scatter(i, y, s=150, zorder=3, gid=f"node-{i}-{k}", linewidths=1.2,
                       c="white" if not present[k] else concept_color(k),
                       alpha=1.0 if not present[k] else 0.35 + 0.65 * float(h.presence[i][k]),
                       edgecolors=MUTED if not present[k] else "white", linestyle="--" if not present[k] else "-")
            ax.text(i, y, str(k), ha="center", va="center", fontsize=7, fontweight="bold", zorder=4,
                    color=MUTED if not present[k] else "white")
    wanted = [float(np.mean(ys)) if ys else (n + 0.5) * rows / N for n, ys in enumerate(dominant)]
    order = sorted(range(N), key=lambda n: (wanted[n], n))
    coarse = dict(zip(order, _spread([wanted[n] for n in order], 0.95, 0.5, rows - 0.5)))
    for n in range(N):
        ax.scatter(m, coarse[n], s=330, c=concept_color(n), edgecolors="white", linewidths=1.5, zorder=3,
                   gid=f"node-{m}-{n}")
        ax.text(m, coarse[n], str(n), ha="center", va="center", fontsize=9, fontweight="bold", color="white",
                zorder=4)
    edges = [(float(q[k, n]), i, k, n) for i, q in enumerate(h.assignments) for k in range(q.shape[0])
             if np.isfinite(q[k]).all() for n in range(N) if q[k, n] >= min_weight]
    halo = dict(boxstyle="square,pad=0.05", fc="white", ec="none", alpha=0.8)  # a bbox keeps SVG text editable
    for w, i, k, n in sorted(edges):  # strongest drawn last, on top
        (x0, y0), (x1, y1) = (i, fine[(i, k)]), (m, coarse[n])
        c = (x1 - x0) * 0.5
        path = Path([(x0, y0), (x0 + c, y0), (x1 - c, y1), (x1, y1)], [Path.MOVETO] + [Path.CURVE4] * 3)
        ax.add_patch(PathPatch(path, fc="none", ec=concept_color(n), lw=0.8 + 6 * w, alpha=0.18 + 0.6 * w,
                               capstyle="round", zorder=1, gid=f"edge-{i}-{k}-{n}"))
    for i, q in enumerate(h.assignments):
        for k in range(q.shape[0]):
            strong = sorted(((float(q[k, n]), n) for n in range(N) if np.isfinite(q[k, n]) and
                             q[k, n] >= label_weight), key=lambda t: (-t[0], t[1]))
            dx = 9.0
            for w, n in strong:
                text = f"{w:.{decimals}f}"
                ax.annotate(text, (i, fine[(i, k)]), xytext=(dx, 5), textcoords="offset points", fontsize=7,
                            color=_ink(concept_color(n)), bbox=halo, zorder=5, gid=f"weight-{i}-{k}-{n}")
                dx += 4.6 * len(text) + 4
    for i in range(m + 1):
        name = f"stage {i}" + (" · coarse" if i == m else "")
        ax.text(i, -0.25, f"{name}\n{stage_title(i, h.n_pro, h.depth)}\n{prototype_count(h.n_pro[i])}",
                ha="center", va="bottom", fontsize=7.5, color="#333", linespacing=1.3)
    scope = f"mean over {h.num_images} images" if h.num_images > 1 else "this image"
    fig.text(0.02, 0.01, f"Fine→coarse assignment ({scope}); edge width and opacity grow with the weight.\n"
             f"Weights ≥ {label_weight:g} printed; edges < {min_weight:g} hidden; hollow nodes claim no pixel.",
             fontsize=7, color=MUTED)
    return fig
