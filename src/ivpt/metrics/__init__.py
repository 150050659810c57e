"""Evaluation metrics of SPEC section 4 as pure functions on tensors plus streaming, DDP-summable meters.

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
    part_counts,
    part_frame_keypoints,
    stability_from_counts,
    stability_score,
)
from .state import SumState

__all__ = [
    "SumState",
    "PROTOCOLS",
    "check_protocol",
    "part_frame_keypoints",
    "discovery_input",
    "to_bbox_frame",
    "bbox_centroid_features",
    "topk_correct",
    "AccuracyMeter",
    "keypoint_hits",
    "add_protocol_noise",
    "part_counts",
    "consistency_from_counts",
    "stability_from_counts",
    "consistency_score",
    "stability_score",
    "PartMeter",
    "nmi_ari_from_contingency",
    "nmi_ari",
    "contingency_table",
    "concepts_at_keypoints",
    "ContingencyMeter",
    "soft_centroids",
    "centroid_features",
    "KeypointRegressor",
    "fit_keypoint_regressor",
    "keypoint_regression_error",
    "KeypointFitMeter",
    "KeypointErrorMeter",
    "fg_iou",
    "FgIoUMeter",
    "concepts_at_pixels",
    "mask_contingency",
    "purity_coverage_from_contingency",
    "PartMaskMeter",
    "DecisionMeter",
    "part_evidence",
    "margin_share",
]
