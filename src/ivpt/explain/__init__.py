"""Explanations people can look at: compute once (:func:`explain`), then draw without the model.

- :mod:`.core` — :class:`Explanation` (maps, regions, assignments, per-part class evidence, prediction) and
  :func:`dataset_hierarchy`.
- :mod:`.render` — stage regions, class evidence, gallery rows (PIL images).
- :mod:`.hierarchy` — the fine→coarse concept graph as SVG text and as a PNG.
- :mod:`.gallery` — :func:`concept_gallery`, each concept's strongest patches over a dataset.
- :mod:`.report` — the ``ivpt explain`` index page and the self-contained ``ivpt report`` page.

Concept ``k`` of a stage has the same colour in every view (:func:`ivpt.explain.draw.concept_color`).
"""
from .core import IMAGENET_MEAN, IMAGENET_STD, Explanation, Hierarchy, dataset_hierarchy, explain
from .gallery import concept_gallery
from .hierarchy import hierarchy_svg, render_hierarchy
from .render import render_evidence, render_gallery, render_stage_regions, stack_images
from .report import build_report, write_explained_images

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Explanation",
    "Hierarchy",
    "explain",
    "dataset_hierarchy",
    "concept_gallery",
    "render_stage_regions",
    "render_evidence",
    "render_hierarchy",
    "hierarchy_svg",
    "render_gallery",
    "stack_images",
    "write_explained_images",
    "build_report",
]
