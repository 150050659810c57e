"""Stanford Cars (Krause et al., 2013) as the devkit and image archives unpack.

Layout under ``root`` (``stanford_cars/``)::

    cars_train/00001.jpg ..                 cars_train.tgz
    cars_test/00001.jpg ..                  cars_test.tgz
    devkit/cars_meta.mat                    class_names: 196 names
    devkit/cars_train_annos.mat             annotations: struct array (bbox_x1, bbox_y1, bbox_x2, bbox_y2, class, fname)
    cars_test_annos_withlabels.mat          the same for the test images, with their classes

Labels are ``class`` minus one (1-based in the files); names from ``cars_meta.mat``. Boxes are 1-based inclusive
pixel corners. There are no part annotations: accuracy only (``data.bbox_crop`` works).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import AnnotatedDataset, Records, boxes_from_corners
from .common import DatasetError, index_path
from .matfiles import mat_field, mat_strings, read_mat

__all__ = ["StanfordCarsDataset"]

LAYOUT = """\
stanford_cars/
├── cars_train/00001.jpg ...
├── cars_test/00001.jpg ...
├── cars_test_annos_withlabels.mat
└── devkit/cars_meta.mat, devkit/cars_train_annos.mat
"""

_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")


class StanfordCarsDataset(AnnotatedDataset):
    """One split of Stanford Cars (arguments and items as :class:`~ivpt.data.base.AnnotatedDataset`)."""

    FORMAT = "stanford_cars"
    LAYOUT = LAYOUT
    ANNOTATION_FILES = ("devkit/cars_meta.mat", "devkit/cars_train_annos.mat", "cars_test_annos_withlabels.mat")
    has_bbox = True

    @classmethod
    def read(cls, root: Path) -> Records:
        meta = root / "devkit" / "cars_meta.mat"
        names = mat_strings(read_mat(meta, ("class_names",), cls.FORMAT, cls.LAYOUT)["class_names"], meta,
                            "class_names")
        paths, columns, splits = [], {k: [] for k in _FIELDS}, []
        for split, path, folder in (("train", root / "devkit" / "cars_train_annos.mat", "cars_train"),
                                    ("test", root / "cars_test_annos_withlabels.mat", "cars_test")):
            annotations = read_mat(path, ("annotations",), cls.FORMAT, cls.LAYOUT)["annotations"]
            values = {k: mat_field(annotations, k, path, "annotations") for k in _FIELDS}
            bad = [c for c in values["class"] if not 1 <= int(c) <= len(names)]
            if bad:
                raise DatasetError(f"{path}: class {bad[0]} is outside 1..{len(names)} (the names of {meta})")
            for k in _FIELDS:
                columns[k] += values[k]
            paths += [index_path(root, root / folder, str(f), f"{path}, annotations({k}).fname")
                      for k, f in enumerate(values["fname"], 1)]
            splits += [split] * len(values["fname"])
        x1, y1, x2, y2 = (np.array(columns[k], dtype=np.float64) for k in _FIELDS[:4])
        return Records(
            paths=paths, labels=np.array(columns["class"], dtype=np.int64) - 1, splits=np.array(splits),
            class_names=names, boxes=boxes_from_corners(x1, y1, x2, y2),
        )
