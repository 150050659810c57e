"""Reading image files for explanation exactly as evaluation sees them (``ivpt.data``'s eval transform:
shorter side to the model size, centre crop, normalise)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torch import Tensor

from ..config import DataConfig
from ..data.transforms import Sample, apply_transform, build_eval_transform

__all__ = ["load_readable_images"]


def load_readable_images(paths: Sequence[str | Path], size: int, *, data: DataConfig | None = None
                         ) -> tuple[Tensor | None, list[int], dict[int, str]]:
    """Read ``paths`` with PIL as normalised (B, 3, size, size) images (``data``: resize / mean / std settings, by
    default ImageNet statistics and shorter side = ``size``), skipping what PIL cannot decode (not an image,
    truncated, a decompression bomb).

    Returns (images of the readable files or None when there is none, their positions in ``paths``,
    {position: reason} of the others)."""
    transform = build_eval_transform(data or DataConfig(), size)
    tensors, kept, bad = [], [], {}
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")  # the full decode: truncated files fail here
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            bad[i] = f"{type(exc).__name__}: {exc}"
            continue
        tensors.append(apply_transform(Sample(image=image), transform).image)
        kept.append(i)
    return (torch.stack(tensors) if tensors else None), kept, bad
