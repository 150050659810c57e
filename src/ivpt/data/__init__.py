"""Datasets, joint transforms, splits and the synthetic part-world.

:func:`build_datasets` turns a :class:`~ivpt.config.Config` into train / validation / test datasets; items are dicts
(``image`` (3, H, W), ``label``, ``index``, plus ``keypoints``/``visible``/``bbox``/``mask`` with parts) and batch
with :func:`collate_skip_corrupt`. Coordinate conventions are documented in :mod:`ivpt.data.transforms`. A reader per
dataset format (:mod:`ivpt.formats` lists them; :mod:`.dispatch` opens them); :mod:`.build` assembles a run's splits.
"""
from __future__ import annotations

from ..formats import DATASET_FORMATS, register_format, unregister_format
from .base import AnnotatedDataset, Records
from .build import DatasetBundle, build_datasets
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
from .cub import CubDataset, CubMeta, read_cub
from .device_augment import DeviceAugment
from .dispatch import Dataset, check_num_classes, dataset_class, open_dataset
from .imagefolder import ImageFolderDataset
from .split import stratified_split
from .transforms import Sample, build_device_train_transform, build_eval_transform, build_train_transform

__all__ = [
    "AnnotatedDataset",
    "CORRUPT_IMAGES",
    "CorruptImageCounter",
    "CubDataset",
    "CubMeta",
    "DATASET_FORMATS",
    "Dataset",
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
    "register_format",
    "reset_corrupt_count",
    "stratified_split",
    "unregister_format",
]
