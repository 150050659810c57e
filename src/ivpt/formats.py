"""The one table of dataset formats: ``data.format`` name → the reader class that reads it.

This module imports nothing heavy, so :mod:`ivpt.config` validates ``data.format`` against it without pulling in
torch; :func:`ivpt.data.dataset_class` resolves a name to its class (importing the reader on first use), and
:func:`ivpt.data.build_datasets`, the evaluator and the report all dispatch through it.
"""
from __future__ import annotations

__all__ = ["DATASET_FORMATS"]

# name -> (module under ivpt.data, class name). The order is the order of the README table.
DATASET_FORMATS: dict[str, tuple[str, str]] = {
    "cub": ("cub", "CubDataset"),
    "nabirds": ("nabirds", "NABirdsDataset"),
    "partimagenet": ("partimagenet", "PartImageNetDataset"),
    "flowers102": ("flowers102", "Flowers102Dataset"),
    "stanford_dogs": ("stanford_dogs", "StanfordDogsDataset"),
    "stanford_cars": ("stanford_cars", "StanfordCarsDataset"),
    "imagefolder": ("imagefolder", "ImageFolderDataset"),
}
