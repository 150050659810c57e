"""The one table of dataset formats: ``data.format`` name → the reader class that reads it.

This module imports nothing heavy, so :mod:`ivpt.config` validates ``data.format`` against it without pulling in
torch; :func:`ivpt.data.dataset_class` resolves a name to its class (importing the reader on first use), and
:func:`ivpt.data.build_datasets`, the evaluator and the report all dispatch through it.

Adding a format is one file, its reader (a subclass of :class:`ivpt.data.base.AnnotatedDataset` that implements
``read``, see :mod:`ivpt.data.base`), plus one registration:

* a format shipped with ivpt: one line in :data:`DATASET_FORMATS` below, ``"name": "ivpt.data.<file>:<Class>"``
  (the reader is imported only when the format is used);
* a reader defined elsewhere (a plugin, a test): ``@register_format("name")`` on its class; the module that defines
  it must be imported before a config names the format.
"""
from __future__ import annotations

from typing import TypeVar

__all__ = ["DATASET_FORMATS", "register_format", "unregister_format"]

T = TypeVar("T", bound=type)

# name -> "module:Class" (imported on first use) or the reader class itself (register_format). The order is the
# order of the README table.
DATASET_FORMATS: dict[str, str | type] = {
    "cub": "ivpt.data.cub:CubDataset",
    "nabirds": "ivpt.data.nabirds:NABirdsDataset",
    "partimagenet": "ivpt.data.partimagenet:PartImageNetDataset",
    "flowers102": "ivpt.data.flowers102:Flowers102Dataset",
    "stanford_dogs": "ivpt.data.stanford_dogs:StanfordDogsDataset",
    "stanford_cars": "ivpt.data.stanford_cars:StanfordCarsDataset",
    "imagefolder": "ivpt.data.imagefolder:ImageFolderDataset",
}


def register_format(name: str):
    """Class decorator: make the reader class readable as ``data.format=name`` (and set its ``FORMAT`` to
    ``name``). A name already taken, or a class whose ``FORMAT`` says another name, is a ValueError."""
    if not name or not name.isidentifier():
        raise ValueError(f"dataset format name {name!r} must be a non-empty identifier (it is a config value)")

    def decorate(cls: T) -> T:
        if name in DATASET_FORMATS and DATASET_FORMATS[name] is not cls:
            raise ValueError(f"data.format={name!r} is already registered ({DATASET_FORMATS[name]})")
        declared = getattr(cls, "FORMAT", "")
        if declared and declared != name:
            raise ValueError(f"{cls.__name__}.FORMAT = {declared!r} but it is registered as {name!r}")
        cls.FORMAT = name
        DATASET_FORMATS[name] = cls
        return cls

    return decorate


def unregister_format(name: str) -> str | type:
    """Remove a registered format (e.g. one a test added); returns its entry."""
    return DATASET_FORMATS.pop(name)
