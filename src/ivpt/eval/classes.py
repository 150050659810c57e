"""Scoring a dataset against the classes a checkpoint was trained on.

A checkpoint's ``config.json`` lists its class names in label order (``class_names``). A dataset with the same
classes numbered otherwise (another ``classes.txt`` order, other ids) would be scored against the wrong labels;
:func:`align_classes` compares the names and, when they are the same set in another order, relabels the dataset's
items by name — exact, since every name is unique on both sides — and refuses names that differ.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

from ..data import DatasetError

__all__ = ["ClassAligned", "align_classes", "note_remapped"]

log = logging.getLogger("ivpt")


class ClassAligned:
    """``dataset`` with every item's ``label`` (and the ``labels`` list) renumbered by ``mapping``: dataset label
    ``d`` becomes ``mapping[d]``, the checkpoint's label of the same class name. Every other attribute is the
    dataset's own."""

    def __init__(self, dataset: Any, mapping: Sequence[int], class_names: Sequence[str]) -> None:
        self.dataset, self.mapping = dataset, list(mapping)
        self.class_names = list(class_names)
        self.labels = [self.mapping[int(label)] for label in getattr(dataset, "labels", [])]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        if item is not None and "label" in item:
            item = {**item, "label": self.mapping[int(item["label"])]}
        return item

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "mapping"):  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


def _few(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(repr(n) for n in list(names)[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def align_classes(dataset: Any, class_names: Sequence[str] | None) -> Any:
    """``dataset`` labelled as the checkpoint whose class names (label order) are ``class_names``.

    Returns ``dataset`` itself when the names agree in order (or either side has none to compare), a
    :class:`ClassAligned` view when they are the same unique names in another order, and raises
    :class:`~ivpt.data.DatasetError` naming a few of the differing names otherwise. The class count is checked
    before (:func:`ivpt.data.check_num_classes`)."""
    theirs = [str(n) for n in (getattr(dataset, "class_names", None) or [])]
    ours = [str(n) for n in (class_names or [])]
    if not theirs or not ours or theirs == ours:
        return dataset
    root = getattr(dataset, "root", "?")
    if set(theirs) != set(ours) or len(set(ours)) != len(ours) or len(set(theirs)) != len(theirs):
        only_data = [n for n in theirs if n not in set(ours)]
        only_ckpt = [n for n in ours if n not in set(theirs)]
        detail = "; ".join(part for part in (
            f"only in the dataset: {_few(only_data)}" if only_data else "",
            f"only in the checkpoint: {_few(only_ckpt)}" if only_ckpt else "") if part) or \
            "a class name occurs twice, so the classes cannot be matched by name"
        raise DatasetError(f"the dataset at {root} names its classes differently from the checkpoint ({detail}); "
                           "evaluate it on the dataset it was trained on (--data ROOT), or fix the class names of "
                           "this one")
    position = {name: i for i, name in enumerate(ours)}
    return ClassAligned(dataset, [position[n] for n in theirs], ours)


def note_remapped(dataset: Any) -> bool:
    """Log (once per call) that ``dataset`` is a relabelled view; whether it is."""
    if not isinstance(dataset, ClassAligned):
        return False
    log.info("the dataset at %s numbers its %d classes in another order than the checkpoint; labels remapped by "
             "class name", getattr(dataset, "root", "?"), len(dataset.class_names))
    return True
