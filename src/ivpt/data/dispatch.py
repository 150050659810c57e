"""Dataset-format dispatch: ``data.format`` → its reader class (:data:`ivpt.formats.DATASET_FORMATS`) → an open
split, checked against the model's classes."""
from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Union

from ..formats import DATASET_FORMATS
from .base import AnnotatedDataset
from .common import DatasetError
from .imagefolder import ImageFolderDataset

if TYPE_CHECKING:
    from ..config import DataConfig

__all__ = ["Dataset", "dataset_class", "open_dataset", "check_num_classes"]

Dataset = Union[AnnotatedDataset, ImageFolderDataset]


def dataset_class(fmt: str) -> type[Dataset]:
    """The reader class of ``data.format`` name ``fmt`` (from the one table, :data:`ivpt.formats.DATASET_FORMATS`)."""
    if fmt not in DATASET_FORMATS:
        raise DatasetError(f"data.format={fmt!r} is unknown; choose one of {', '.join(DATASET_FORMATS)}")
    entry = DATASET_FORMATS[fmt]
    if not isinstance(entry, str):
        return entry
    module, _, name = entry.partition(":")
    return getattr(importlib.import_module(module), name)


def open_dataset(data: DataConfig, split: str, transform: Callable | None = None,
                 indices: Sequence[int] | None = None, *, with_parts: bool = False, bbox_crop: bool = False,
                 root: str | None = None) -> Dataset:
    """Split ``split`` of the dataset at ``root`` (default ``data.root``) read as ``data.format``.

    A split without images is a :class:`DatasetError` naming the split and folder (nothing can be trained or
    measured on it); a subset by ``indices`` may be empty."""
    dataset = dataset_class(data.format)(root or data.root, split, transform, indices, with_parts=with_parts,
                                         bbox_crop=bbox_crop)
    if indices is None and len(dataset) == 0:
        raise DatasetError(f"the {split} split of {getattr(dataset, 'root', root or data.root)} has no images; "
                           f"fix the split annotation of data.format={data.format} (e.g. train_test_split.txt for "
                           "cub) so that it lists some, or choose another split")
    return dataset


def check_num_classes(dataset: Dataset, num_classes: int, what: str) -> None:
    """Refuse to score ``dataset`` with a head of ``num_classes`` outputs (``what`` names the model) when the
    dataset's classes differ: labels beyond the head would fail, fewer classes would score a wrong problem."""
    if dataset.num_classes != num_classes:
        raise DatasetError(f"the dataset at {getattr(dataset, 'root', '?')} has {dataset.num_classes} classes but "
                           f"{what} has {num_classes} (model.num_classes); evaluate it on the dataset it was "
                           "trained on (--data ROOT), or check the class files of this one")
