"""What each view of the app shows, as plain values (markdown text, RGB arrays, table rows) that any page layout
can display; no web framework here (the gradio layout is :mod:`.ui`).

- :func:`image_page`: prediction, concept regions per stage, this image's hierarchy, evidence per concept for the
  predicted class against another (why A and not B).
- :func:`concept_page`: one concept's top patches over the dataset, presence, coarse parents or fine children,
  its stage's scores.
- :func:`model_page`: the run's metrics, training curves and concept health.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import numpy as np
from PIL import Image

from ..eval import registry
from ..explain.charts import training_figure
from ..explain.core import prototype_count
from ..explain.hierarchy import render_hierarchy
from .figures import canvas_array, contrast_figure, figure_array, region_overlay
from .index import Progress
from .results import ConceptInfo, Contrast, ImageResult
from .session import AppSession

__all__ = ["ImagePage", "ConceptPage", "ModelPage", "image_page", "error_page", "region_images", "contrast_view",
           "concept_page", "model_page", "warm_up"]

Table = tuple[list[str], list[list[str]]]  # (headers, rows)
T = TypeVar("T")


@dataclass
class ImagePage:
    """The image view: ``key`` of the cached result (None on an error), status markdown, the input as the model
    sees it, top-k {class: probability}, region overlays with captions, hierarchy and evidence drawings and the
    evidence's explanation."""

    key: str | None
    status: str
    image: np.ndarray | None = None
    top: dict[str, float] = field(default_factory=dict)
    regions: list[tuple[np.ndarray, str]] = field(default_factory=list)
    hierarchy: np.ndarray | None = None
    evidence: np.ndarray | None = None
    evidence_text: str = ""


@dataclass
class ConceptPage:
    """The concept view: markdown, top patches with captions, the dataset hierarchy drawing (IVPT)."""

    text: str
    patches: list[tuple[np.ndarray, str]] = field(default_factory=list)
    hierarchy: np.ndarray | None = None


@dataclass
class ModelPage:
    """The model view: summary markdown, the metric and per-stage tables, training curves, concept health."""

    summary: str
    metrics: Table
    per_stage: Table
    curves: np.ndarray | None
    health: Table


def error_page(message: str) -> ImagePage:
    """The image view after an input it cannot use: the message, nothing else."""
    return ImagePage(None, f"**Cannot explain this input.** {message}")


def image_page(session: AppSession, result: ImageResult, *, alpha: float = 0.5, versus: int | None = None,
               details: bool = True) -> ImagePage:
    """The image view of ``result``: regions at opacity ``alpha``, evidence of the prediction against class
    ``versus`` (default: the runner-up) and the hierarchy; without ``details`` the prediction and regions only
    (what a page shows first, while the rest is drawn)."""
    top = {session.class_name(c): p for c, p in result.top(session.topk)}
    page = ImagePage(result.key, _status(session, result), result.image, top, region_images(result, alpha))
    if details:
        page.evidence, page.evidence_text = contrast_view(session, result, versus)
        page.hierarchy = _hierarchy_image(result)
    elif result.evidence is not None or result.hierarchy is not None:
        page.evidence_text = "Drawing the evidence and the hierarchy…"
    return page


def warm_up(session: AppSession) -> None:
    """Draw the image view of a grey image once, so that the first click does not pay the first calls of torch
    and matplotlib (kernels, fonts, caches)."""
    size = session.cfg.model.img_size
    image_page(session, session.explain_tensor(session.prepare(Image.new("RGB", (size, size), (128, 128, 128)))))


def _status(session: AppSession, result: ImageResult) -> str:
    c, p = result.predicted, float(result.probs[result.predicted])
    line = f"**Predicted: {session.class_name(c)}** ({p:.1%})"
    if result.label is not None:
        verdict = "right" if result.label == c else "wrong"
        line += f" · true class: {session.class_name(result.label)} ({verdict})"
    notes = []
    if not session.stages:
        notes.append(f"This {session.kind} model has no part maps: the page shows its prediction only.")
    elif not session.has_evidence:
        notes.append(f"The {session.kind} head does not score the regions one by one: no evidence per concept.")
    if session.stages and result.hierarchy is None:
        notes.append(f"No fine→coarse hierarchy: only IVPT assigns concepts across stages ({session.kind}).")
    return "\n\n".join([line, *notes])


def region_images(result: ImageResult, alpha: float) -> list[tuple[np.ndarray, str]]:
    """One overlay per map stage (fine to coarse) with its caption: where it sits, the concepts present (kept
    per opacity with the result)."""
    return _kept(result.renders, "regions", round(alpha, 3), lambda: _draw_regions(result, alpha))


def _draw_regions(result: ImageResult, alpha: float) -> list[tuple[np.ndarray, str]]:
    out = []
    for st in result.stages:
        present = [str(k) for k in np.flatnonzero(st.present[:-1])]
        out.append((region_overlay(result.image, st.maps, alpha=alpha),
                    f"{st.title} · present: {', '.join(present) or 'none'}"))
    return out


def _kept(renders: dict[str, Any], name: str, setting: Any, draw: Callable[[], T]) -> T:
    """``renders[name]`` when it was drawn with ``setting``, else ``draw()``, kept in its place (one setting per
    name: the last one asked for)."""
    if name not in renders or renders[name][0] != setting:
        renders[name] = (setting, draw())
    return renders[name][1]


def _hierarchy_image(result: ImageResult) -> np.ndarray | None:
    if result.hierarchy is None:
        return None
    return _kept(result.renders, "hierarchy", None, lambda: figure_array(render_hierarchy(result.hierarchy)))


def contrast_view(session: AppSession, result: ImageResult, versus: int | None) -> tuple[np.ndarray | None, str]:
    """(the evidence drawing, its explanation) of the prediction A against class ``versus`` B: each concept's
    evidence for A, for B and the difference, which adds up to logit A − logit B with the global token's part
    (kept per class B with the result)."""
    a = result.predicted
    b = versus if versus is not None else (result.top(2)[-1][0])
    return _kept(result.renders, "contrast", b, lambda: _contrast(session, result, a, b))


def _contrast(session: AppSession, result: ImageResult, a: int, b: int) -> tuple[np.ndarray | None, str]:
    contrast = result.contrast(a, b)
    if contrast is None or result.evidence is None or result.global_evidence is None:
        return None, ""
    names = session.class_name(a), session.class_name(b)
    with_global = bool(getattr(session.cfg.model, "global_part", False))
    rows = [[result.evidence[n, a], result.evidence[n, b], contrast.per_concept[n]]
            for n in range(result.evidence.shape[0])]
    if with_global:
        rows.append([result.global_evidence[a], result.global_evidence[b], contrast.global_part])
    present = result.stages[-1].present if result.stages else np.ones(len(rows), dtype=bool)
    fig = contrast_figure(rows, [f"for {names[0]}", f"for {names[1]}", "difference"], present,
                          with_global=with_global)
    return canvas_array(fig), _contrast_text(contrast, names, with_global, float(result.logits[a] - result.logits[b]))


def _contrast_text(contrast: Contrast, names: tuple[str, str], with_global: bool, margin: float) -> str:
    if contrast.a == contrast.b:
        return f"Evidence for **{names[0]}**, the prediction; pick another class to see why not that one."
    order = np.argsort(-np.abs(contrast.per_concept), kind="stable")[:3]
    largest = ", ".join(f"concept {n} ({contrast.per_concept[n]:+.2f})" for n in order)
    parts = f"concepts {float(contrast.per_concept.sum()):+.2f}"
    if with_global:
        parts += f" + global token {contrast.global_part:+.2f}"
    return (f"Why **{names[0]}** and not **{names[1]}**: logit difference {margin:+.2f} = {parts}. "
            f"Largest differences: {largest}.")


def concept_page(session: AppSession, position: int, concept: int,
                 progress: Progress | None = None) -> ConceptPage:
    """The concept view of ``concept`` of the map stage at ``position`` (indexes the dataset on first use)."""
    info = session.concept(position, concept, progress)
    h = session.index().hierarchy
    drawing = None if h is None else _kept(session.renders, "hierarchy", None,
                                           lambda: figure_array(render_hierarchy(h)))
    return ConceptPage(_concept_text(session, info), info.patches, drawing)


def _concept_text(session: AppSession, info: ConceptInfo) -> str:
    lines = [f"### Concept {info.concept} of {info.title}",
             f"Present (claims at least one patch) in **{info.presence:.1%}** of {info.num_images} dataset images; "
             f"its top {len(info.patches)} patches below (image · strongest map value · class)."]
    if info.parents:
        lines.append("Coarse parents (mean assignment where present): " +
                     ", ".join(f"concept {n} ({w:.2f})" for n, w in info.parents if w >= 0.05))
    if info.children:
        lines.append("Fine concepts it gathers (strongest parent): " +
                     ", ".join(f"stage {i} concept {k} ({w:.2f})" for i, k, w in info.children))
    elif info.stage == session.stages[-1][0] and session.index().hierarchy is not None:
        lines.append("No fine concept has it as its strongest coarse concept.")
    if info.scores:
        shown = ", ".join(f"{_label(k)} {_number(k, v)}" for k, v in info.scores.items())
        lines.append(f"Scores of stage {info.stage} in eval.json (per stage, not per concept): {shown}.")
    else:
        lines.append(f"No scores for stage {info.stage}: run `ivpt eval {session.checkpoint}` to write eval.json.")
    return "\n\n".join(lines)


def _label(key: str) -> str:
    score = registry.score_of(key)
    return score.report_label if score is not None else key


def _number(key: str, value: float) -> str:
    score = registry.score_of(key)
    if not math.isfinite(value):
        return "–"
    digits, unit = (score.digits, score.unit) if score is not None else (2, "")
    return f"{value:.{digits}f}" + (f" {unit}" if unit in ("%", "% of box") else "")


def model_page(session: AppSession) -> ModelPage:
    """The model view of ``session``'s run (static: computed once when the page is built)."""
    m = session.metrics
    metrics = [[s.report_label, _number(s.key, float(m[s.key])), "higher is better" if s.better == "↑" else
                "lower is better", s.description] for _, s in registry.scores()
               if isinstance(m.get(s.key), (int, float)) and not isinstance(m.get(s.key), bool)]
    figure = training_figure(session.log) if session.log else None
    return ModelPage(_summary(session), (["metric", "value", "direction", "what it measures"], metrics),
                     _per_stage(session), figure_array(figure) if figure is not None else None, _health(session))


def _summary(session: AppSession) -> str:
    mc = session.cfg.model
    maps = (", ".join(prototype_count(n) for _, n in session.stages) if session.stages else "none")
    source = (f"metrics from `{session.metrics_file}`" if session.metrics_file else
              "not evaluated yet: `ivpt eval` writes eval.json beside the checkpoint")
    data = (f"{len(session.dataset)} images of `{getattr(session.dataset, 'root', '?')}`" if session.dataset is not None
            else session.dataset_note)
    return (f"**{mc.kind}** on `{mc.backbone}` at {mc.img_size} px · {mc.num_classes} classes · part maps: {maps}\n\n"
            f"checkpoint `{session.checkpoint}` · {source}\n\ndataset: {data}")


def _per_stage(session: AppSession) -> Table:
    rows = session.metrics.get("per_stage")
    rows = [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []
    keys = list(dict.fromkeys(k for r in rows for k in r if k not in ("stage", "n_pro")))
    table = [[str(r.get("stage", "?")), prototype_count(int(r["n_pro"])) if isinstance(r.get("n_pro"), int) else "–"]
             + [_number(k, float(r[k])) if isinstance(r.get(k), (int, float)) else "–" for k in keys] for r in rows]
    return ["stage", "prototypes", *[_label(k) for k in keys]], table


def _health(session: AppSession) -> Table:
    """Per map stage: the share of concepts alive and the map entropy in the last epoch log.csv recorded."""
    log, rows = session.log, []
    for j, (stage, n) in enumerate(session.stages):
        alive, entropy = _last(log.get(f"alive_s{j}")), _last(log.get(f"entropy_s{j}"))
        if math.isfinite(alive):
            rows.append([f"stage {stage}", prototype_count(n), f"{alive:.0%}", f"{entropy:.3f}"])
    return ["stage", "prototypes", "concepts alive (last epoch)", "map entropy (last epoch)"], rows


def _last(column: np.ndarray | None) -> float:
    """The last finite value of a log column (NaN when there is none)."""
    if column is None or not np.isfinite(column).any():
        return math.nan
    return float(column[np.isfinite(column)][-1])
