"""What the app computed, as plain values: one image's result (:class:`ImageResult`, with its map stages and the
"why A and not B" :class:`Contrast`) and one concept's view over the dataset (:class:`ConceptInfo`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..explain.core import Hierarchy

__all__ = ["StageMaps", "Contrast", "ImageResult", "ConceptInfo"]


@dataclass(frozen=True)
class StageMaps:
    """One map stage of one image: ``index`` as the model numbers it (``model.n_pro``), a caption, the soft maps
    (n, h, w) float32 with background last, and which concepts claim >= 1 patch (n,) bool."""

    index: int
    title: str
    maps: np.ndarray
    present: np.ndarray


@dataclass(frozen=True)
class Contrast:
    """Why class ``a`` and not class ``b``: each coarse concept's evidence for ``a`` minus its evidence for ``b``
    (``per_concept``, (N,)) and the same for the global token (``global_part``, zero without ``model.global_part``).
    Together they make ``logit_a - logit_b``."""

    a: int
    b: int
    per_concept: np.ndarray
    global_part: float

    @property
    def total(self) -> float:
        return float(self.per_concept.sum()) + self.global_part


@dataclass
class ImageResult:
    """Everything the image view shows of one image, from one forward pass.

    image: (H, W, 3) uint8, the input as the model sees it. logits, probs: (C,).
    stages: the map stages (empty without part maps). hierarchy: this image's fine→coarse assignments (IVPT).
    evidence: (N, C) each coarse concept's contribution to each logit; global_evidence: (C,) the global token's
    (zeros without ``model.global_part``); both None without a part-pooled head.
    label: the true class when the image came from the dataset. renders: drawings kept for the next request.
    """

    key: str
    image: np.ndarray
    logits: np.ndarray
    probs: np.ndarray
    stages: list[StageMaps]
    hierarchy: Hierarchy | None
    evidence: np.ndarray | None
    global_evidence: np.ndarray | None
    label: int | None = None
    renders: dict[str, Any] = field(default_factory=dict)

    @property
    def predicted(self) -> int:
        return int(np.argmax(self.logits))

    def top(self, k: int) -> list[tuple[int, float]]:
        """The ``k`` most probable classes with their probabilities, most probable first."""
        order = np.argsort(-self.probs, kind="stable")[:k]
        return [(int(c), float(self.probs[c])) for c in order]

    def contrast(self, a: int, b: int) -> Contrast | None:
        """:class:`Contrast` of classes ``a`` and ``b``; None without evidence per concept."""
        if self.evidence is None or self.global_evidence is None:
            return None
        return Contrast(a, b, self.evidence[:, a] - self.evidence[:, b],
                        float(self.global_evidence[a] - self.global_evidence[b]))


@dataclass
class ConceptInfo:
    """The concept view of concept ``concept`` of map stage ``stage`` over the indexed dataset.

    presence: share of the ``num_images`` images in which it claims >= 1 patch. patches: its top crops with
    captions. parents: (coarse concept, mean assignment weight) strongest first (IVPT's prompted stages).
    children: (stage, concept, weight) of the fine concepts whose strongest coarse concept it is (IVPT's final
    stage). scores: the stage's scores in ``eval.json`` (``per_stage``), key → value.
    """

    stage: int
    concept: int
    title: str
    presence: float
    num_images: int
    patches: list[tuple[np.ndarray, str]]
    parents: list[tuple[int, float]]
    children: list[tuple[int, int, float]]
    scores: dict[str, float]
