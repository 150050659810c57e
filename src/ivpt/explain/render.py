"""Figures of one explained image (IVPT's concepts, Prompt-CAM's trait maps) or of a gallery: plain matplotlib
``Figure`` objects to restyle at will and save with :func:`ivpt.explain.draw.save_figure` (PNG, SVG, PDF). Nothing
here runs the model; colours follow :func:`ivpt.explain.draw.concept_color`, so concept ``k`` looks the same in the
region, evidence and gallery views (and head ``k`` of a trait map in its region and its heatmap title).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image

from .core import Explanation, prototype_count
from .draw import MUTED, concept_color, concept_rgb, shorten, show_regions
from .traits import TraitExplanation

__all__ = ["render_stage_regions", "render_evidence", "render_gallery", "render_part_map", "render_traits"]

GLOBAL_COLOR = "#5a5a5a"  # the global part (model.global_part) in the evidence figure


def _title(fig: Figure, expl: Explanation, i: int, title: str | None) -> None:
    c, p = int(expl.top_classes[i, 0]), float(expl.top_probs[i, 0])
    fig.suptitle(f"{title or f'Image {i}'} · predicted: {expl.class_name(c)} ({p:.1%})", x=0.01, ha="left",
                 fontsize=11)


def render_stage_regions(expl: Explanation, i: int, *, size: int = 224, alpha: float = 0.5,
                         title: str | None = None) -> Figure:
    """Image ``i`` and every stage's argmax concept regions, one panel per stage (fine to coarse, left to right).

    Each stage panel names where the stage sits, how many of its concepts claim a region and the background share;
    its legend gives each present concept's share of the image. The input panel lists the top classes."""
    fig = Figure(figsize=(2.2 * (expl.num_stages + 1), 3.9), layout="constrained")
    axes = fig.subplots(1, expl.num_stages + 1)
    _title(fig, expl, i, title)
    image = expl.images[i]
    show_regions(axes[0], image, None, size=size)
    axes[0].set_title(f"input\n{image.shape[1]} × {image.shape[0]} px", fontsize=8, linespacing=1.25)
    top = [f"{float(expl.top_probs[i, j]):6.1%}  {shorten(expl.class_name(int(expl.top_classes[i, j])))}"
           for j in range(min(5, expl.top_classes.shape[1]))]
    axes[0].text(0, -0.04, "top classes\n" + "\n".join(top), transform=axes[0].transAxes, va="top", fontsize=7)
    for s, ax in enumerate(axes[1:]):
        maps = expl.maps[s][i]
        n = maps.shape[0]
        labels = show_regions(ax, image, maps, size=size, alpha=alpha)
        shares = np.bincount(labels.ravel().astype(np.int64), minlength=n) / labels.size
        present = [k for k in np.argsort(-shares[:-1], kind="stable") if shares[k] > 0]
        coarse = " · coarse" if s == expl.num_stages - 1 else ""
        ax.set_title(f"stage {s}{coarse}\n{expl.stage_title(s)}\n{prototype_count(n)}\n{len(present)} present · "
                     f"background {shares[-1]:.0%}", fontsize=8, linespacing=1.25)
        handles = [Patch(color=concept_color(int(k)), label=f"{k}: {shares[k]:.0%}" if shares[k] >= 0.005
                         else f"{k}: <1%") for k in present]
        if handles:
            ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=7,
                      frameon=False, handlelength=0.9, columnspacing=0.8, handletextpad=0.4)
    return fig


def _signed(v: float) -> str:
    """'+1.23' / '-0.45', and '0.00' rather than a signed zero for values that round to it."""
    text = f"{v:+.2f}"
    return "0.00" if text in ("+0.00", "-0.00") else text


def render_evidence(expl: Explanation, i: int, *, classes: int = 3, size: int = 224,
                    title: str | None = None) -> Figure:
    """Why image ``i`` got its top classes: each coarse concept's contribution to each class logit.

    Left: the final stage's regions (coloured as the bars). Right: one bar chart per top class, one bar per coarse
    concept (and one for the global part, ``model.global_part``), on one shared scale; the bars of a class add up
    to its logit. A concept absent from the image (no region) is hatched: its pooled feature is zero, and what it
    still adds comes from the joint normalisation (``modulation``) of all parts, not from a region of the image."""
    N, k, present = expl.num_coarse, min(classes, expl.top_classes.shape[1]), expl.present[-1][i]
    chosen = [int(c) for c in expl.top_classes[i, :k]]
    rows = [(f"concept {n}", concept_color(n), bool(present[n]), expl.evidence[i, n]) for n in range(N)]
    if np.any(expl.global_evidence[i]):  # exactly zero without model.global_part
        rows.append(("global", GLOBAL_COLOR, True, expl.global_evidence[i]))
    ev = np.stack([r[3] for r in rows])[:, chosen]  # (rows, k)
    lo, hi = min(0.0, float(ev.min())), max(0.0, float(ev.max()))
    pad = 0.28 * max(hi - lo, 1e-6)  # room for the value labels
    fig = Figure(figsize=(7.6, max(3.2, 0.9 + k * (0.55 + 0.24 * len(rows)))), layout="constrained")
    grid = fig.add_gridspec(k, 2, width_ratios=[1, 1.45])
    _title(fig, expl, i, title)
    left = fig.add_subplot(grid[:, 0])
    show_regions(left, expl.images[i], expl.maps[-1][i], size=size)
    left.set_title(f"final stage: {prototype_count(N + 1)}", fontsize=8)
    for j, c in enumerate(chosen):
        ax = fig.add_subplot(grid[j, 1])
        for r, (_, colour, here, _) in enumerate(rows):
            ax.barh(r, ev[r, j], color=colour, alpha=1.0 if here else 0.35, hatch=None if here else "///",
                    edgecolor=colour, height=0.7)
            v = float(ev[r, j])
            ax.text(v + (0.02 if v >= 0 else -0.02) * (hi - lo + 1e-6), r, _signed(v) + ("" if here else " absent"),
                    va="center", ha="left" if v >= 0 else "right", fontsize=7, color="#222" if here else MUTED)
        ax.axvline(0, color="#999", lw=0.8)
        ax.set_xlim(lo - (pad if lo < 0 else 0), hi + pad)
        ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=7)
        for tick, (_, colour, here, _) in zip(ax.get_yticklabels(), rows):
            tick.set_color(colour if here else MUTED)
        ax.invert_yaxis()
        ax.tick_params(axis="x", labelsize=7)
        ax.spines[["top", "right"]].set_visible(False)
        ax.set_title(f"#{j + 1} {shorten(expl.class_name(c), 46)} · p {float(expl.probs[i, c]):.1%} · logit "
                     f"{_signed(float(expl.logits[i, c]))}", fontsize=8, loc="left")
    ax.set_xlabel("contribution to the class logit (a class's bars add up to its logit)", fontsize=7)
    if not present[:N].all():
        fig.text(0.01, 0, "hatched, absent: the concept claims no pixel of this image, so its pooled feature is zero; "
                 "the value left comes from the joint normalisation of all parts", fontsize=6.5, color=MUTED, va="top")
    return fig


def render_gallery(gallery: dict[int, Sequence[tuple[int, np.ndarray, float]]], *, stage: int | None = None,
                   captions: dict[int, list[str]] | None = None, summary: dict[int, str] | None = None,
                   cell: int = 96, dpi: int = 100) -> Figure:
    """One row per concept: its top patches framed in its colour (one mosaic image, ``cell`` pixels per patch at
    ``dpi``), each captioned with image index · score and the lines of ``captions[k][j]`` (class, part shown);
    ``summary[k]`` goes under the row's name."""
    cols = max([len(items) for items in gallery.values()] + [1])
    lines = 1 + max([c.count("\n") + 1 for cs in (captions or {}).values() for c in cs] + [0])
    label_w, gap, row_h = 112, 8, cell + 12 * lines + 12
    canvas = np.full((max(1, len(gallery)) * row_h, label_w + cols * (cell + gap), 3), 255, dtype=np.uint8)
    fig = Figure(figsize=(canvas.shape[1] / dpi, canvas.shape[0] / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    for r, (k, items) in enumerate(gallery.items()):
        y = r * row_h + 4
        ax.text(4, y + 12, f"concept {k}", fontsize=9, fontweight="bold", color="white", va="center",
                bbox=dict(boxstyle="round,pad=0.3", fc=concept_color(k), ec="none"))
        below = [f"stage {stage}" if stage is not None else "", (summary or {}).get(k, ""),
                 "" if items else "never the strongest anywhere"]
        ax.text(4, y + 30, "\n".join(t for t in below if t), fontsize=7, color=MUTED, va="top")
        for j, (index, crop, score) in enumerate(items):
            x = label_w + j * (cell + gap)
            canvas[y : y + cell, x : x + cell] = concept_rgb(k)
            canvas[y + 3 : y + cell - 3, x + 3 : x + cell - 3] = Image.fromarray(crop).resize((cell - 6, cell - 6),
                                                                                               Image.BICUBIC)
            extra = (captions or {}).get(k, [])
            ax.text(x + cell / 2, y + cell + 2, f"#{index} · {score:.2f}" + (f"\n{extra[j]}" if j < len(extra)
                    else ""), ha="center", va="top", fontsize=6.5, color=MUTED, linespacing=1.15)
    ax.imshow(canvas, interpolation="none", extent=(0, canvas.shape[1], canvas.shape[0], 0))
    return fig


def render_part_map(image: np.ndarray, maps: np.ndarray | None, *, size: int = 224) -> Figure:
    """The input, and beside it the part map's argmax regions when the model has one (any model kind)."""
    fig = Figure(figsize=(2.4 * (1 + (maps is not None)), 2.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, 1 + (maps is not None)))
    show_regions(axes[0], image, None, size=size)
    axes[0].set_title("input", fontsize=8)
    if maps is not None:
        show_regions(axes[1], image, maps, size=size)
        axes[1].set_title(f"part map: {prototype_count(maps.shape[0])}", fontsize=8)
    return fig


def render_traits(expl: TraitExplanation, i: int, *, size: int = 224, alpha: float = 0.55,
                  title: str | None = None) -> Figure:
    """Image ``i``'s trait maps: one row per explained class (the predicted class first, then the chosen ones).

    Each row starts with the regions of that class's trait maps (argmax over the heads and the background, the map
    the interpretability metrics score for the predicted class), then one panel per head: its attention over the
    patches as a heatmap on the image, stretched from its minimum to its maximum (as the authors draw them), titled
    with the peak's share of the head's attention. The row's label gives the class, its probability and its logit."""
    Q, K = expl.classes.shape[1], expl.num_heads
    fig = Figure(figsize=(1.9 * (K + 1), 2.15 * Q + 0.45), layout="constrained")
    axes = fig.subplots(Q, K + 1, squeeze=False)
    c0, p0 = int(expl.top_classes[i, 0]), float(expl.top_probs[i, 0])
    fig.suptitle(f"{shorten(title or f'Image {i}', 40)} · predicted: {shorten(expl.class_name(c0), 40)} ({p0:.1%})",
                 x=0.01, ha="left", fontsize=10)
    image = expl.images[i]
    for q in range(Q):
        c = int(expl.classes[i, q])
        show_regions(axes[q, 0], image, expl.part_maps[i, q], size=size)
        axes[q, 0].set_title(f"{'predicted' if q == 0 else 'chosen'}: {shorten(expl.class_name(c), 24)}\n"
                             f"p {float(expl.probs[i, c]):.1%} · logit {_signed(float(expl.logits[i, c]))}",
                             fontsize=7.5, loc="left")
        for k in range(K):
            ax, heat = axes[q, k + 1], expl.attention[i, q, k]
            show_regions(ax, image, None, size=size)
            h, w = ax.images[0].get_array().shape[:2]
            span = max(float(heat.max() - heat.min()), 1e-12)
            ax.imshow((heat - heat.min()) / span, cmap="inferno", alpha=alpha, vmin=0, vmax=1, extent=(0, w, h, 0),
                      interpolation="bilinear")
            ax.set_title(f"head {k} · peak {float(heat.max()):.1%}", fontsize=7.5, color=concept_color(k))
    return fig
