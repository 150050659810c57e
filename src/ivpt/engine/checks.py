"""What the trainer refuses or warns about in its own state: the batch shape and the classes of the training data
at set-up, and non-finite parameters or optimiser state before anything is validated or saved."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ..checkpoint import adapter_state, non_finite_entries
from ..config import Config
from .errors import TrainingError
from .state import _optimizer_tensors

__all__ = ["check_classes", "check_batch_shape", "check_finite", "kept_note"]


def check_classes(cfg: Config, data: Any) -> None:
    """Refuse a dataset whose number of classes is not ``model.num_classes``."""
    if data.num_classes != cfg.model.num_classes:
        raise TrainingError(
            f"the dataset at {cfg.data.root} has {data.num_classes} classes but model.num_classes="
            f"{cfg.model.num_classes}; set model.num_classes={data.num_classes}"
        )


def check_batch_shape(cfg: Config, train_images: int, world_size: int) -> None:
    """Refuse learning rates that are not finite, an ``optim.batch_size`` that does not split over
    ``optim.grad_accum`` micro-batches and the processes, and a training split smaller than one optimiser step."""
    o = cfg.optim
    if not all(math.isfinite(v) for v in (o.base_lr, o.head_lr_mult, o.concept_lr_mult)):
        raise TrainingError(f"the learning rates must be finite numbers: optim.base_lr={o.base_lr}, "
                            f"optim.head_lr_mult={o.head_lr_mult}, optim.concept_lr_mult={o.concept_lr_mult}")
    if o.batch_size % (o.grad_accum * world_size):
        raise TrainingError(
            f"optim.batch_size={o.batch_size} must divide by optim.grad_accum x processes "
            f"= {o.grad_accum} x {world_size}"
        )
    if train_images // o.batch_size == 0:
        raise TrainingError(
            f"the training split of {cfg.data.root} has {train_images} images, fewer than one optimiser "
            f"step of optim.batch_size={o.batch_size}; lower optim.batch_size (or data.val_fraction)")


def _unseen_classes_warning(data: Any, root: str) -> str | None:
    """One line naming the classes without a training image (the model cannot learn them), else None."""
    labels = getattr(data.train, "labels", None)
    if labels is None:
        return None
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=data.num_classes)
    missing = [i for i in range(data.num_classes) if counts[i] == 0]
    if not missing:
        return None
    names = list(data.class_names)
    listed = ", ".join(f"class {i} ({names[i]})" if i < len(names) else f"class {i}" for i in missing[:10])
    more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
    return (f"no training image for {len(missing)} of {data.num_classes} classes: {listed}{more}; the model cannot "
            f"learn them and their test images count as errors (check the train/test split of {root})")


def check_finite(model: nn.Module, optimizer, out: Path, step: int, epoch: int) -> None:
    """The body of :meth:`Trainer.check_finite_state` (``step``: the optimiser steps taken; ``epoch``: 0-based)."""
    tensors = {**adapter_state(model),
               **{f"optimizer.{k}": v for k, v in _optimizer_tensors(optimizer.state_dict())}}
    bad = non_finite_entries(tensors)
    if bad:
        optimizer.zero_grad(set_to_none=True)
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise TrainingError(
            f"non-finite parameters after step {step} (epoch {epoch + 1}): {', '.join(bad[:5])}{more}. "
            f"Nothing from that step on was saved{kept_note(out)}. Lower the learning rates or try optim.amp=none")


def kept_note(out: Path) -> str:
    """What a run stopped by a non-finite value keeps, for its message."""
    if (out / "last.pt").is_file():
        return f"; the last good checkpoint {out / 'last.pt'} is kept"
    return "; no checkpoint had been written yet"
