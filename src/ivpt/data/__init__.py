"""Datasets, joint transforms, splits and the synthetic part-world.

:func:`build_datasets` turns a :class:`~ivpt.config.Config` into train / validation / test datasets; items are dicts
(``image`` (3, H, W), ``label``, ``index``, plus ``keypoints``/``visible``/``bbox``/``mask`` with parts) and batch
with :func:`collate_skip_corrupt`. Coordinate conventions are documented in :mod:`ivpt.data.transforms`.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..formats import DATASET_FORMATS

from .common import (
    CORRUPT_IMAGES,
    CorruptImageCounter,
    DatasetError,
    MissingFileError,
    collate_skip_corrupt,
    loader_generator,
    corrupt_count,
    corrupt_count_all,
    reset_corrupt_count,
)
from .base import AnnotatedDataset, Records
from .cub import CubDataset, CubMeta, read_cub
from .device_augment import DeviceAugment
from .imagefolder import ImageFolderDataset
from .split import stratified_split
from .transforms import Sample, build_device_train_transform, build_eval_transform, build_train_transform

if TYPE_CHECKING:
    from ..config import Config, DataConfig

__all__ = [
    "AnnotatedDataset",
    "CORRUPT_IMAGES",
    "CorruptImageCounter",
    "CubDataset",
    "CubMeta",
    "DatasetBundle",
    "DatasetError",
    "DeviceAugment",
    "ImageFolderDataset",
    "MissingFileError",
    "Records",
    "Sample",
    "build_datasets",
    "check_num_classes",
    "dataset_class",
    "open_dataset",
    "build_device_train_transform",
    "build_eval_transform",
    "build_train_transform",
    "collate_skip_corrupt",
    "loader_generator",
    "corrupt_count",
    "corrupt_count_all",
    "read_cub",
    "reset_corrupt_count",
    "stratified_split",
]

Dataset = AnnotatedDataset | ImageFolderDataset


def dataset_class(fmt: str) -> type[Dataset]:
    """The reader class of ``data.format`` name ``fmt`` (from the one table, :data:`ivpt.formats.DATASET_FORMATS`)."""
    if fmt not in DATASET_FORMATS:
        raise DatasetError(f"data.format={fmt!r} is unknown; choose one of {', '.join(DATASET_FORMATS)}")
    module, name = DATASET_FORMATS[fmt]
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


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


@dataclass
class DatasetBundle:
    """The datasets of a run. ``val`` is None when ``data.val_fraction`` is 0."""

    train: Dataset
    val: Dataset | None
    test: Dataset
    num_classes: int
    class_names: list[str] = field(default_factory=list)


def build_datasets(cfg: Config, *, with_parts: bool = False) -> DatasetBundle:
    """Datasets for ``cfg``: format ``cfg.data.format`` at ``cfg.data.root``, images of ``cfg.model.img_size``.

    The training transform (or the eval one when ``data.augment`` is false) goes on train; the deterministic eval
    transform on val and test. With ``data.gpu_augment`` the training items hold uint8 pixels and the drawn
    parameters, which :class:`DeviceAugment` turns into the finished batch on the training device. Validation is carved from the official training split by
    :func:`stratified_split` with ``data.val_fraction`` and ``train.seed``. ``data.bbox_crop`` crops every split to
    its boxes (formats with boxes). ``with_parts`` adds the dataset's annotations to the items (keypoints, boxes,
    masks: see the reader's ``has_*`` flags).
    """
    data = cfg.data
    if not data.root:
        raise DatasetError("no dataset given: set data.root=/path/to/CUB_200_2011 (and data.format for another "
                           f"dataset: {', '.join(DATASET_FORMATS)})")
    size = cfg.model.img_size
    if data.gpu_augment:
        train_tf = build_device_train_transform(data, size)
    else:
        train_tf = build_train_transform(data, size) if data.augment else build_eval_transform(data, size)
    eval_tf = build_eval_transform(data, size)

    def make(split, transform, indices=None):
        return open_dataset(data, split, transform, indices, with_parts=with_parts, bbox_crop=data.bbox_crop)

    test = make("test", eval_tf)
    full_train = make("train", None)
    if data.val_fraction > 0:
        train_idx, val_idx = stratified_split(full_train.labels, data.val_fraction, cfg.train.seed)
        train, val = make("train", train_tf, train_idx), make("train", eval_tf, val_idx)
    else:
        train, val = make("train", train_tf), None
    return DatasetBundle(train=train, val=val, test=test, num_classes=full_train.num_classes,
                         class_names=list(full_train.class_names))
