"""The datasets of a run: :func:`build_datasets` (train / validation / test of a config)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..formats import DATASET_FORMATS
from .common import DatasetError
from .dispatch import Dataset, open_dataset
from .split import stratified_split
from .transforms import build_device_train_transform, build_eval_transform, build_train_transform

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["DatasetBundle", "build_datasets"]


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
    parameters, which :class:`~ivpt.data.DeviceAugment` turns into the finished batch on the training device.
    Validation is carved from the official training split by :func:`stratified_split` with ``data.val_fraction``
    and ``data.val_seed`` (``train.seed`` when -1). ``data.bbox_crop`` crops every split to its boxes (formats
    with boxes). ``with_parts`` adds the dataset's annotations to the items (keypoints, boxes, masks: see the
    reader's ``has_*`` flags).
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
        split_seed = cfg.train.seed if data.val_seed < 0 else data.val_seed
        train_idx, val_idx = stratified_split(full_train.labels, data.val_fraction, split_seed)
        train, val = make("train", train_tf, train_idx), make("train", eval_tf, val_idx)
    else:
        train, val = make("train", train_tf), None
    return DatasetBundle(train=train, val=val, test=test, num_classes=full_train.num_classes,
                         class_names=list(full_train.class_names))
