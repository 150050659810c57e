"""The joint-transform protocol: :class:`Sample` (an image with its keypoints, box and masks), the base
:class:`JointOp`, :class:`JointCompose`, and the part-mask :data:`IGNORE` value. Coordinate conventions:
:mod:`ivpt.data.transforms`."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from torch import Tensor


@dataclass
class Sample:
    """One image and its geometry while it moves through a pipeline.

    Attributes:
        image: PIL RGB image; after :class:`ToTensorNormalize` a float tensor (3, H, W).
        keypoints: (P, 2) float64 (x, y), or None. After ToTensorNormalize a float32 tensor.
        visible: (P,) bool, or None.
        bbox: (4,) float64 x0, y0, x1, y1 box edges, or None.
        mask: PIL "L" image (0..255), or None. After ToTensorNormalize a float tensor (1, H, W) in [0, 1].
        part_mask: PIL "L" label image (part j = j, background = the number of parts, :data:`IGNORE` = no
            label), or None; resampled with nearest neighbour, areas a crop or warp exposes become IGNORE.
            After ToTensorNormalize an int64 tensor (H, W) with IGNORE turned into -1.
        augment: the per-image parameters of the augmentation left to the training device
            (:class:`DeviceAugmentPlan`), or None.
    """

    image: Image.Image | Tensor
    keypoints: np.ndarray | None = None
    visible: np.ndarray | None = None
    bbox: np.ndarray | None = None
    mask: Image.Image | Tensor | None = None
    part_mask: Image.Image | Tensor | None = None
    augment: dict[str, Tensor] | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(W, H) of the current image."""
        if isinstance(self.image, Tensor):
            return int(self.image.shape[-1]), int(self.image.shape[-2])
        return self.image.size


JointTransform = Callable[[Sample], Sample]

IGNORE = 255  # part-mask value of pixels without a label (outside the image after a crop or warp)


class JointOp:
    """Base of the joint ops: datasets recognise them (``joint = True``) and pass a whole :class:`Sample`, where a
    plain torchvision transform would get the image alone."""

    joint = True

    def __call__(self, sample: Sample) -> Sample:
        raise NotImplementedError


class JointCompose(JointOp):
    """Apply joint ops in order."""

    def __init__(self, ops: Sequence[JointTransform]) -> None:
        self.ops = list(ops)

    def __call__(self, sample: Sample) -> Sample:
        for op in self.ops:
            sample = op(sample)
        return sample

    def __repr__(self) -> str:
        inner = "".join(f"\n    {op!r}," for op in self.ops)
        return f"{type(self).__name__}({inner}\n)"


def mean_fill(mean: Sequence[float]) -> tuple[int, int, int]:
    """The RGB colour that normalises to ~0: areas a crop or warp exposes then carry no signal."""
    return tuple(round(255 * m) for m in mean)  # type: ignore[return-value]


def is_joint(transform: Callable) -> bool:
    """Whether ``transform`` takes a whole :class:`Sample` (a joint op) rather than an image alone."""
    return bool(getattr(transform, "joint", False))
