"""Explanations people can look at: compute once (:func:`explain`), then draw without the model.

- :mod:`.core` — :class:`Explanation` (maps, regions, assignments, per-part class evidence, prediction) and
  :func:`dataset_hierarchy`.
- :mod:`.traits` — :class:`TraitExplanation`, :func:`explain_traits`: a Prompt-CAM model's trait maps (per-head
  attention of the predicted class's prompt, and of any chosen class's).
- :mod:`.render`, :mod:`.hierarchy`, :mod:`.charts` — matplotlib figures: stage regions, class evidence, trait
  maps, gallery rows, the fine→coarse concept graph, training curves; :func:`save_figure` writes them as PNG, SVG
  or PDF.
- :mod:`.gallery` — :func:`concept_gallery`, each concept's strongest patches over a dataset.
- :mod:`.report` — the ``ivpt explain`` index pages and the self-contained ``ivpt report`` page (jinja2 templates
  in ``templates/``).

Concept ``k`` of a stage has the same colour in every view (:func:`ivpt.explain.draw.concept_color`).
"""
from .charts import read_log, training_figure
from .core import IMAGENET_MEAN, IMAGENET_STD, Explanation, Hierarchy, dataset_hierarchy, explain
from .draw import FORMATS, figure_bytes, save_figure
from .gallery import concept_gallery
from .hierarchy import render_hierarchy
from .render import render_evidence, render_gallery, render_part_map, render_stage_regions, render_traits
from .report import build_report, write_explained_images, write_trait_images
from .traits import TraitExplanation, class_ids, explain_traits

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Explanation", "Hierarchy", "explain", "dataset_hierarchy",
           "concept_gallery", "render_stage_regions", "render_evidence", "render_hierarchy", "render_gallery",
           "render_part_map", "render_traits", "training_figure", "read_log", "FORMATS", "save_figure",
           "figure_bytes", "write_explained_images", "write_trait_images", "build_report", "TraitExplanation",
           "explain_traits", "class_ids"]
