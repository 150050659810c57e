"""Seeded, class-stratified train/validation split (model selection must never look at the test set)."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["stratified_split"]


def stratified_split(labels: Sequence[int], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split positions ``0 .. len(labels)-1`` into (train, val), class by class.

    A class with ``n`` images sends ``floor(fraction * n + 0.5)`` of them (round half up) to validation, at least
    one when ``n >= 2`` and ``fraction > 0``, and never all of them: a class keeps at least one training image (a
    single-image class stays entirely in train). Which images go is drawn with ``numpy.random.default_rng(seed)``,
    class by class in sorted label order, so the result depends only on (labels, fraction, seed).

    Returns:
        Two sorted int64 arrays, disjoint, together covering every position.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction={fraction} must lie in [0, 1)")
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    val_parts = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        n = members.size
        k = math.floor(fraction * n + 0.5)
        if fraction > 0 and n >= 2:
            k = max(k, 1)
        k = min(k, n - 1)
        if k > 0:
            val_parts.append(rng.permutation(members)[:k])
    val = np.sort(np.concatenate(val_parts)) if val_parts else np.zeros(0, dtype=np.int64)
    train = np.setdiff1d(np.arange(labels.size, dtype=np.int64), val, assume_unique=True)
    return train, val.astype(np.int64)
