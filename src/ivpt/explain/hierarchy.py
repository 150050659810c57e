"""The concept hierarchy as a layered graph: which intermediate concepts feed each coarse concept, and how much.

One column per stage (fine stages left, the N coarse concepts of the final stage right); an edge from concept k
of stage i to coarse concept n has width and opacity proportional to the assignment weight Q_i[k, n] and the
coarse concept's colour. Weights at or above ``label_weight`` are printed beside the source node in the edge's
colour; edges below ``min_weight`` are hidden. Fine nodes are sorted by their strongest coarse concept and each
coarse node sits at the mean height of the fine nodes it dominates, so each coarse concept's family reads as one
horizontal band.

One geometric layout feeds two renderers that therefore show the same numbers: :func:`hierarchy_svg` (crisp
text, tooltips; used inline in the HTML pages) and :func:`render_hierarchy` (a PNG via PIL, drawn at twice the
size and downsampled for anti-aliasing; used for the per-image files).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .core import Explanation, Hierarchy, stage_title
from .draw import concept_color, font, hex_color, ink_color, text_color_on, text_size

__all__ = ["hierarchy_layout", "hierarchy_svg", "render_hierarchy", "HierarchyLayout"]

FONT_FAMILY = "DejaVu Sans, Helvetica, Arial, sans-serif"
INK = (40, 40, 40)
MUTED = (120, 120, 120)


@dataclass
class _Node:
    stage: int
    concept: int
    x: float
    y: float
    r: float
    color: tuple[int, int, int]
    opacity: float
    absent: bool
    title: str


@dataclass
class _Edge:
    stage: int
    concept: int
    coarse: int
    weight: float
    points: list[tuple[float, float]]
    width: float
    opacity: float
    color: tuple[int, int, int]


@dataclass
class _Label:
    stage: int
    concept: int
    coarse: int
    x: float
    y: float
    text: str
    color: tuple[int, int, int]


@dataclass
class HierarchyLayout:
    """Everything both renderers draw, in pixel coordinates of a ``width`` × ``height`` canvas."""

    width: int
    height: int
    nodes: list[_Node] = field(default_factory=list)
    edges: list[_Edge] = field(default_factory=list)
    labels: list[_Label] = field(default_factory=list)
    headers: list[tuple[float, list[str]]] = field(default_factory=list)
    caption: list[str] = field(default_factory=list)


def _as_hierarchy(source: Hierarchy | Explanation | Sequence[np.ndarray], index: int | None) -> Hierarchy:
    if isinstance(source, Hierarchy):
        return source
    if isinstance(source, Explanation):
        return source.hierarchy(0 if index is None else index)
    arrays = [np.asarray(a, dtype=np.float32) for a in source]
    if not arrays:
        raise ValueError("a hierarchy needs at least one stage of assignments")
    N = arrays[0].shape[1]
    n_pro = [a.shape[0] + 1 for a in arrays] + [N + 1]
    presence = [np.isfinite(a).all(axis=1).astype(np.float32) for a in arrays]
    return Hierarchy(arrays, presence, 1, n_pro, depth=0)  # depth unknown: captions omit block numbers


def _bezier(p0: tuple[float, float], p1: tuple[float, float], steps: int = 40) -> list[tuple[float, float]]:
    """Cubic curve leaving ``p0`` and entering ``p1`` horizontally."""
    (x0, y0), (x1, y1) = p0, p1
    c = (x1 - x0) * 0.5
    pts = []
    for j in range(steps + 1):
        t = j / steps
        a, b, cc, d = (1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t**2, t**3
        pts.append((a * x0 + b * (x0 + c) + cc * (x1 - c) + d * x1, a * y0 + b * y0 + cc * y1 + d * y1))
    return pts


def _spread(ys: list[float], gap: float, top: float, bottom: float) -> list[float]:
    """Move sorted positions apart to at least ``gap`` while keeping them inside [top, bottom]."""
    out = list(ys)
    for j in range(1, len(out)):
        out[j] = max(out[j], out[j - 1] + gap)
    overflow = out[-1] - bottom if out else 0.0
    if overflow > 0:
        out = [y - overflow for y in out]
        for j in range(len(out) - 2, -1, -1):
            out[j] = min(out[j], out[j + 1] - gap)
    shift = top - out[0] if out and out[0] < top else 0.0
    return [y + shift for y in out]


def hierarchy_layout(
    source: Hierarchy | Explanation | Sequence[np.ndarray],
    index: int | None = None,
    *,
    min_weight: float = 0.1,
    label_weight: float = 0.25,
    decimals: int = 2,
    row_height: float = 30.0,
    column_gap: float = 190.0,
) -> HierarchyLayout:
    """Place nodes, edges and printed weights.

    Args:
        source: a dataset :class:`Hierarchy`, an :class:`Explanation` with ``index`` (one image), or a list of m
            (P_i, N) assignment arrays.
        min_weight: edges with a smaller weight are not drawn.
        label_weight: edges with at least this weight get their weight printed (rounded to ``decimals``).
    """
    h = _as_hierarchy(source, index)
    m, N = len(h.assignments), h.num_coarse
    rows = max([a.shape[0] for a in h.assignments] + [N])
    margin, header_h, r_fine, r_coarse = 28.0, 64.0, 10.0, 15.0
    top, span = margin + header_h, rows * row_height
    bottom = top + span
    xs = [margin + 40 + i * column_gap for i in range(m + 1)]
    layout = HierarchyLayout(width=int(max(xs[-1] + 150, 600)), height=int(bottom + 64))

    fine_pos: dict[tuple[int, int], tuple[float, float]] = {}
    dominant_ys: list[list[float]] = [[] for _ in range(N)]
    for i, q in enumerate(h.assignments):
        P = q.shape[0]
        present = np.isfinite(q).all(axis=1)
        order = sorted(
            range(P),
            key=lambda k: (0, int(np.argmax(q[k])), -float(np.max(q[k])), k) if present[k] else (1, 0, 0.0, k),
        )
        step = span / P
        for slot, k in enumerate(order):
            y = top + (slot + 0.5) * step
            fine_pos[(i, k)] = (xs[i], y)
            if present[k]:
                dominant_ys[int(np.argmax(q[k]))].append(y)
            presence = float(h.presence[i][k])
            if present[k]:
                split = ", ".join(f"→{n}: {q[k, n]:.{decimals}f}" for n in range(N))
                where = f"present in {presence:.0%} of {h.num_images} images; " if h.num_images > 1 else ""
                title = f"stage {i} concept {k}: {where}{split}"
            else:
                title = f"stage {i} concept {k}: claims no pixel" + (" in any image" if h.num_images > 1 else "")
            layout.nodes.append(
                _Node(i, k, xs[i], y, r_fine, concept_color(k), 0.35 + 0.65 * presence, not present[k], title)
            )

    default = [top + (n + 0.5) * span / N for n in range(N)]
    wanted = [float(np.mean(ys)) if ys else default[n] for n, ys in enumerate(dominant_ys)]
    order = sorted(range(N), key=lambda n: (wanted[n], n))
    placed = _spread([wanted[n] for n in order], 2 * r_coarse + 10, top + r_coarse, bottom - r_coarse)
    coarse_y = {n: y for n, y in zip(order, placed)}
    for n in range(N):
        layout.nodes.append(_Node(m, n, xs[m], coarse_y[n], r_coarse, concept_color(n), 1.0, False,
                                  f"coarse concept {n} (final stage)"))

    label_font = font(11)
    for i, q in enumerate(h.assignments):
        for k in range(q.shape[0]):
            if not np.isfinite(q[k]).all():
                continue
            x0, y0 = fine_pos[(i, k)]
            strong = []
            for n in range(N):
                w = float(q[k, n])
                if w < min_weight:
                    continue
                layout.edges.append(_Edge(
                    i, k, n, w, _bezier((x0 + r_fine, y0), (xs[m] - r_coarse, coarse_y[n])),
                    width=1.0 + 8.0 * w, opacity=0.18 + 0.6 * w, color=concept_color(n),
                ))
                if w >= label_weight:
                    strong.append((w, n))
            lx = x0 + r_fine + 4
            for w, n in sorted(strong, key=lambda t: (-t[0], t[1])):
                text = f"{w:.{decimals}f}"
                layout.labels.append(_Label(i, k, n, lx, y0 - 17, text, ink_color(concept_color(n))))
                # Browsers render the SVG in a wider font than Pillow's: advance by the larger estimate.
                lx += max(text_size(text, label_font)[0], 6.8 * len(text)) + 6
    layout.edges.sort(key=lambda e: e.weight)  # strongest drawn last, on top

    for i in range(m + 1):
        count = h.n_pro[i] - 1
        name = f"stage {i}" + (" · coarse" if i == m else "")
        layout.headers.append((xs[i], [name, stage_title(i, h.n_pro, h.depth), f"{count} concepts"]))
    scope = f"mean over {h.num_images} images" if h.num_images > 1 else "this image"
    layout.caption = [
        f"Fine→coarse assignment ({scope}). Edge width and opacity ∝ weight.",
        f"Weights ≥ {label_weight:g} printed; edges < {min_weight:g} hidden; hollow nodes claim no pixel.",
    ]
    return layout


def _svg_color(rgb: tuple[int, int, int]) -> str:
    return hex_color(rgb)


def hierarchy_svg(
    source: Hierarchy | Explanation | Sequence[np.ndarray],
    index: int | None = None,
    *,
    min_weight: float = 0.1,
    label_weight: float = 0.25,
    decimals: int = 2,
) -> str:
    """The hierarchy graph as standalone SVG text (see :func:`hierarchy_layout` for the arguments).

    Every printed weight is a ``<text class="weight" data-stage data-concept data-coarse>`` element, so tools
    and tests can read the numbers back; nodes and edges carry ``<title>`` tooltips with the full split.
    """
    lay = hierarchy_layout(source, index, min_weight=min_weight, label_weight=label_weight, decimals=decimals)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="hierarchy" width="{lay.width}" height="{lay.height}" '
        f'viewBox="0 0 {lay.width} {lay.height}" font-family="{FONT_FAMILY}" role="img">',
        f'<rect width="{lay.width}" height="{lay.height}" fill="#ffffff"/>',
    ]
    for x, lines in lay.headers:
        out.append(f'<text x="{x:.1f}" y="30" text-anchor="middle" font-size="13" font-weight="bold" '
                   f'fill="{_svg_color(INK)}">{escape(lines[0])}</text>')
        for j, line in enumerate(lines[1:]):
            out.append(f'<text x="{x:.1f}" y="{47 + 14 * j}" text-anchor="middle" font-size="11" '
                       f'fill="{_svg_color(MUTED)}">{escape(line)}</text>')
    out.append('<g fill="none" stroke-linecap="round">')
    for e in lay.edges:
        d = "M" + " L".join(f"{x:.1f},{y:.1f}" for x, y in e.points)
        out.append(
            f'<path class="edge" d="{d}" stroke="{_svg_color(e.color)}" stroke-width="{e.width:.2f}" '
            f'stroke-opacity="{e.opacity:.3f}" data-stage="{e.stage}" data-concept="{e.concept}" '
            f'data-coarse="{e.coarse}"><title>stage {e.stage} concept {e.concept} → coarse {e.coarse}: '
            f'{e.weight:.3f}</title></path>'
        )
    out.append("</g>")
    for nd in lay.nodes:
        fill = "#ffffff" if nd.absent else _svg_color(nd.color)
        stroke = _svg_color(MUTED) if nd.absent else "#ffffff"
        dash = ' stroke-dasharray="3,2"' if nd.absent else ""
        out.append(
            f'<g class="node" data-stage="{nd.stage}" data-concept="{nd.concept}"><title>{escape(nd.title)}</title>'
            f'<circle cx="{nd.x:.1f}" cy="{nd.y:.1f}" r="{nd.r:.1f}" fill="{fill}" fill-opacity="{nd.opacity:.2f}" '
            f'stroke="{stroke}" stroke-width="1.5"{dash}/>'
            f'<text x="{nd.x:.1f}" y="{nd.y + 4:.1f}" text-anchor="middle" font-size="{12 if nd.r > 12 else 10}" '
            f'font-weight="bold" fill="{_svg_color(MUTED if nd.absent else text_color_on(nd.color))}">'
            f"{nd.concept}</text></g>"
        )
    for lb in lay.labels:
        out.append(
            f'<text class="weight" x="{lb.x:.1f}" y="{lb.y + 10:.1f}" font-size="11" fill="{_svg_color(lb.color)}" '
            f'stroke="#ffffff" stroke-width="3" paint-order="stroke" data-stage="{lb.stage}" '
            f'data-concept="{lb.concept}" data-coarse="{lb.coarse}">{escape(lb.text)}</text>'
        )
    for j, line in enumerate(lay.caption):
        out.append(f'<text x="28" y="{lay.height - 30 + 14 * j}" font-size="11" fill="{_svg_color(MUTED)}">'
                   f"{escape(line)}</text>")
    out.append("</svg>")
    return "\n".join(out)


def _band(points: list[tuple[float, float]], width: float) -> list[tuple[float, float]]:
    """Polygon of a stroke of ``width`` along ``points``; filling it once avoids double blending at joints."""
    left, right = [], []
    for j, (x, y) in enumerate(points):
        xa, ya = points[max(j - 1, 0)]
        xb, yb = points[min(j + 1, len(points) - 1)]
        dx, dy = xb - xa, yb - ya
        norm = math.hypot(dx, dy) or 1.0
        nx, ny = -dy / norm * width / 2, dx / norm * width / 2
        left.append((x + nx, y + ny))
        right.append((x - nx, y - ny))
    return left + right[::-1]


def _ascii(text: str) -> str:
    """Pillow's bundled font lacks arrows and maths symbols; spell them out for the PNG."""
    for a, b in (("Fine→coarse", "Fine-to-coarse"), ("→", "->"), ("∝ weight", "grow with the weight"),
                 ("≥", ">=")):
        text = text.replace(a, b)
    return text


def _text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, fnt: ImageFont.ImageFont,
          fill: tuple[int, int, int], *, center: bool = False, halo: int = 0) -> None:
    w, h = text_size(text, fnt)
    x, y = xy
    if center:
        x, y = x - w / 2, y - h / 2
    kwargs = {"stroke_width": halo, "stroke_fill": (255, 255, 255)} if halo and hasattr(fnt, "path") else {}
    draw.text((x, y), text, font=fnt, fill=fill, **kwargs)


def render_hierarchy(
    source: Hierarchy | Explanation | Sequence[np.ndarray],
    index: int | None = None,
    *,
    min_weight: float = 0.1,
    label_weight: float = 0.25,
    decimals: int = 2,
) -> Image.Image:
    """The hierarchy graph as a PIL image (same layout and numbers as :func:`hierarchy_svg`)."""
    lay = hierarchy_layout(source, index, min_weight=min_weight, label_weight=label_weight, decimals=decimals)
    s = 2  # supersampling factor
    img = Image.new("RGB", (lay.width * s, lay.height * s), (255, 255, 255))
    draw = ImageDraw.Draw(img, "RGBA")
    f_head, f_sub, f_label = font(13 * s), font(11 * s), font(11 * s)
    for x, lines in lay.headers:
        _text(draw, (x * s, 24 * s), lines[0], f_head, INK, center=True)
        for j, line in enumerate(lines[1:]):
            _text(draw, (x * s, (43 + 14 * j) * s), line, f_sub, MUTED, center=True)
    for e in lay.edges:
        pts = [(x * s, y * s) for x, y in e.points]
        draw.polygon(_band(pts, e.width * s), fill=(*e.color, int(round(255 * e.opacity))))
    for nd in lay.nodes:
        box = [(nd.x - nd.r) * s, (nd.y - nd.r) * s, (nd.x + nd.r) * s, (nd.y + nd.r) * s]
        if nd.absent:
            draw.ellipse(box, fill=(255, 255, 255), outline=MUTED, width=s)
            _text(draw, (nd.x * s, nd.y * s), str(nd.concept), font(10 * s), MUTED, center=True)
        else:
            fill = tuple(int(round(255 - nd.opacity * (255 - c))) for c in nd.color)
            draw.ellipse(box, fill=fill, outline=(255, 255, 255), width=int(1.5 * s))
            size = 12 if nd.r > 12 else 10
            _text(draw, (nd.x * s, nd.y * s), str(nd.concept), font(size * s), text_color_on(nd.color), center=True)
    for lb in lay.labels:
        _text(draw, (lb.x * s, (lb.y + 1) * s), lb.text, f_label, lb.color, halo=3)
    for j, line in enumerate(lay.caption):
        _text(draw, (28 * s, (lay.height - 40 + 14 * j) * s), _ascii(line), f_sub, MUTED)
    return img.resize((lay.width, lay.height), Image.LANCZOS)
