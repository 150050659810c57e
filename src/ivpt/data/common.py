"""Pieces shared by the dataset readers: the error type, image loading that survives corrupt files, and the
collate function that drops them while keeping a count for the run summary.

Corrupt images never turn into a wrong label: ``__getitem__`` logs a warning naming the file, counts it and
returns ``None``; :func:`collate_skip_corrupt` removes the ``None`` items from the batch (and returns ``None``
when nothing is left, which the training loop skips).
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import default_collate

__all__ = [
    "CORRUPT_IMAGES",
    "CorruptImageCounter",
    "DatasetError",
    "MissingFileError",
    "collate_skip_corrupt",
    "corrupt_count",
    "corrupt_count_all",
    "load_image",
    "read_utf8",
    "report_missing",
    "reset_corrupt_count",
]

logger = logging.getLogger("ivpt.data")

# How many missing files an error message lists before it only gives the count.
_LIST_AT_MOST = 5


class DatasetError(ValueError):
    """A dataset on disk that cannot be read as asked; the message names the file (and line) to fix."""


class MissingFileError(DatasetError, FileNotFoundError):
    """A file the dataset layout requires does not exist (also a ``FileNotFoundError``)."""


class CorruptImageCounter:
    """Number of distinct image files that failed to decode, shared by the training process and its DataLoader
    workers: a file read in every epoch (or by two passes of an evaluation) counts once.

    The files seen are marks in a small shared-memory bitmap indexed by a hash of the path (setting a mark is
    idempotent, so concurrent workers cannot double-count or lose one; two corrupt files would count once only if
    their hashes collided, about one chance in a million per pair). Datasets keep a reference to the counter, so it
    reaches workers started with ``fork`` (inherited mapping) as well as with ``spawn`` or ``forkserver`` (torch
    passes shared storage between processes). A plain ``pickle``/``deepcopy`` copies it.
    """

    SLOTS = 1 << 20

    def __init__(self) -> None:
        self._seen: torch.Tensor | None = None

    def _tensor(self) -> torch.Tensor:
        if self._seen is None:
            self._seen = torch.zeros(self.SLOTS, dtype=torch.uint8).share_memory_()
        return self._seen

    def ensure_shared(self) -> None:
        """Allocate the shared bitmap now, before DataLoader workers are forked from this process."""
        self._tensor()

    def add(self, path: str | Path) -> None:
        """Mark ``path`` as corrupt (again: no change)."""
        digest = hashlib.blake2b(str(path).encode("utf-8", "surrogateescape"), digest_size=8).digest()
        self._tensor()[int.from_bytes(digest, "little") % self.SLOTS] = 1

    def count(self) -> int:
        return int(self._tensor().sum())

    def reset(self) -> None:
        self._tensor().zero_()


CORRUPT_IMAGES = CorruptImageCounter()


def corrupt_count() -> int:
    """Distinct image files this process (and its loader workers) skipped as corrupt since the last reset."""
    return CORRUPT_IMAGES.count()


def corrupt_count_all() -> int:
    """:func:`corrupt_count` summed over the processes of the group (every rank must call it)."""
    from .. import runtime as R

    return int(R.all_reduce_sum(torch.tensor([corrupt_count()], device=R.group_device() or "cpu")).item())


def reset_corrupt_count() -> None:
    CORRUPT_IMAGES.reset()


def load_image(path: Path, mode: str, counter: CorruptImageCounter = CORRUPT_IMAGES) -> Image.Image | None:
    """Decode ``path`` fully into ``mode`` ("RGB" or "L"); on failure log a warning, count it, return None."""
    try:
        with Image.open(path) as im:
            return im.convert(mode)  # convert() forces the full decode, so truncated files fail here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        logger.warning("skipping corrupt image %s (%s: %s)", path, type(exc).__name__, exc)
        counter.add(path)
        return None


def loader_generator() -> torch.Generator:
    """A fixed generator for a DataLoader. Without one, a DataLoader draws its workers' base seed from the global RNG,
    which would shift the Gumbel-noise stream depending on when loaders are created (and break exact resume);
    training items are seeded by ``SeededDataset`` and evaluation draws nothing, so its value does not matter."""
    return torch.Generator().manual_seed(0)


def collate_skip_corrupt(batch: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """``default_collate`` after dropping ``None`` items (corrupt images, counted when they were read).

    Returns ``None`` when every item of the batch was corrupt. Keys that only some items carry are dropped so a
    batch mixing datasets still collates. uint8 images of different sizes (``data.gpu_augment``: decoded, not yet
    cropped) are zero-padded at the bottom and right to the largest; their sizes travel in ``augment["frame"]``.
    """
    kept = [item for item in batch if item is not None]
    if not kept:
        return None
    keys = [k for k in kept[0] if all(k in item for item in kept[1:])]
    out = default_collate([{k: item[k] for k in keys if k != "image"} for item in kept])
    if "image" in keys:
        out["image"] = _stack_images([item["image"] for item in kept])
    return {k: out[k] for k in keys}


def _stack_images(images: list[torch.Tensor]) -> torch.Tensor:
    """(B, C, H, W) from (C, H, W) images; uint8 ones of different sizes are zero-padded to the largest."""
    if images[0].dtype != torch.uint8 or len({tuple(im.shape) for im in images}) == 1:
        return default_collate(images)
    height, width = max(im.shape[-2] for im in images), max(im.shape[-1] for im in images)
    canvas = torch.zeros(len(images), images[0].shape[0], height, width, dtype=torch.uint8)
    for slot, im in zip(canvas, images):
        slot[:, : im.shape[-2], : im.shape[-1]] = im
    return canvas


def read_utf8(path: Path) -> str:
    """The text of annotation file ``path``; a byte that is not UTF-8 is a :class:`DatasetError` naming the file,
    line and column."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        lineno = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DatasetError(f"{path}, line {lineno}, column {column}: byte {data[exc.start]:#04x} is not UTF-8; "
                           "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def report_missing(paths: Sequence[Path], what: str) -> None:
    """Raise one :class:`DatasetError` listing how many of ``what`` are missing and the first few paths."""
    if not paths:
        return
    shown = "\n  ".join(str(p) for p in paths[:_LIST_AT_MOST])
    more = f"\n  ... and {len(paths) - _LIST_AT_MOST} more" if len(paths) > _LIST_AT_MOST else ""
    raise DatasetError(f"{len(paths)} {what} listed by the dataset are missing on disk:\n  {shown}{more}")
