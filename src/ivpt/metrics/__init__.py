"""Evaluation metrics of docs/method.md §4 as pure functions on tensors plus streaming, DDP-summable meters.

Every meter has ``update(..., valid=None)`` per batch, ``compute()`` (or ``fit()``) at the end, and a state made
of fixed-shape tensors that add up: ``merge`` combines two meters, ``all_reduce`` sums them over processes
(see :mod:`ivpt.metrics.state`). Meters report percent; pure functions report what their docstring says
(NMI/ARI as fractions, consistency/stability/accuracy/keypoint error in percent or ×100 units). Which eval.json
keys each meter's scores become, and which ``--metrics`` name they belong to, is :mod:`ivpt.eval.registry`.
"""
from __future__ import annotations

from .accuracy import AccuracyMeter, topk_correct
from .decision import DecisionMeter, margin_share, part_evidence
from .discovery import (
    ContingencyMeter,
    FgIoUMeter,
    concepts_at_keypoints,
    contingency_table,
    fg_iou,
    nmi_ari,
    nmi_ari_from_contingency,
)
from .keypoints import (
    KeypointErrorMeter,
    KeypointFitMeter,
    KeypointRegressor,
    bbox_centroid_features,
    centroid_features,
    discovery_input,
    fit_keypoint_regressor,
    keypoint_regression_error,
    soft_centroids,
    to_bbox_frame,
)
from .masks import PartMaskMeter, concepts_at_pixels, mask_contingency, purity_coverage_from_contingency
from .parts import (
    PROTOCOLS,
    PartMeter,
    add_protocol_noise,
    consistency_from_counts,
    consistency_score,
    check_protocol,
    keypoint_hits,
    keypoint_patches,
    keypoint_prototypes,
    part_counts,
    part_frame_keypoints,
    stability_from_counts,
    stability_score,
)
from .state import ReduceFn, SumState

from . import accuracy, decision, discovery, keypoints, masks, parts, state  # noqa: E402  (their __all__)

__all__ = [*state.__all__, *accuracy.__all__, *decision.__all__, *parts.__all__, *discovery.__all__,
           *keypoints.__all__, *masks.__all__]
