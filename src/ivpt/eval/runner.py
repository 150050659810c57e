"""One dataset pass, exact under DDP, with pluggable meters.

Each rank takes a disjoint shard (rank r: items r, r+W, r+2W, ...; no padding, no duplicates). For every readable
batch the runner hands the batch and a :class:`Forward` to each consumer; a consumer updates its summable meters
(:mod:`ivpt.metrics`), and at the end the runner sums every meter over the processes. Validation accuracy during
training is this runner with :class:`AccuracyConsumer`; the interpretability protocols (:mod:`.protocols`) are
other consumers.
"""
from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .. import runtime as R
from ..config import Config
from ..metrics import AccuracyMeter, SumState

__all__ = ["ShardSampler", "eval_loader", "Forward", "Consumer", "AccuracyConsumer", "run_pass", "evaluate_accuracy"]


class ShardSampler(Sampler[int]):
    """Evaluation order: rank r takes indices r, r+W, r+2W, ... — every item exactly once over all ranks."""

    def __init__(self, n: int, *, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, n, world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)


def eval_loader(dataset: Dataset, cfg: Config, info: R.DistInfo) -> DataLoader:
    """This rank's shard of ``dataset`` in batches of ``eval.batch_size`` images over all processes."""
    from ..data import collate_skip_corrupt, loader_generator

    sampler = ShardSampler(len(dataset), rank=info.rank, world_size=info.world_size)  # type: ignore[arg-type]
    per_rank = max(1, math.ceil(cfg.eval.batch_size / info.world_size))
    return DataLoader(dataset, batch_size=per_rank, sampler=sampler, num_workers=cfg.data.num_workers,
                      collate_fn=collate_skip_corrupt, pin_memory=info.device.type == "cuda",
                      generator=loader_generator())


class Forward:
    """``model(images)`` on the process's device at ``eval.amp``. It remembers its last input, so consumers that
    look at the same images share one forward pass."""

    def __init__(self, model: nn.Module, device: torch.device, amp: str) -> None:
        self.model, self.device, self.amp = model, device, amp
        self._last: tuple[torch.Tensor, object] | None = None

    def __call__(self, images: torch.Tensor):
        if self._last is not None and self._last[0] is images:
            return self._last[1]
        with R.autocast(self.device, self.amp):
            out = self.model(images.to(self.device, non_blocking=True))
        self._last = (images, out)
        return out


class Consumer(Protocol):
    """What a pass feeds: ``update`` per batch, and the meters to sum over processes at the end."""

    def update(self, batch: dict, forward: Forward) -> None: ...

    def meters(self) -> list[SumState]: ...


@torch.no_grad()
def run_pass(model: nn.Module, dataset: Dataset, cfg: Config, info: R.DistInfo, consumers: list[Consumer], *,
             desc: str = "evaluate", progress: bool = False) -> None:
    """Feed every readable batch of this rank's shard to ``consumers``, then sum their meters over processes.
    A batch whose every image is unreadable is skipped (the reader counts the files)."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    forward = Forward(model, info.device, cfg.eval.amp)
    bar = dict(desc=desc, disable=not (progress and info.is_main), leave=False, dynamic_ncols=True)
    for batch in tqdm(eval_loader(dataset, cfg, info), **bar):
        if batch is None:
            continue
        for consumer in consumers:
            consumer.update(batch, forward)
    model.train(was_training)
    for consumer in consumers:
        for meter in consumer.meters():
            meter.all_reduce()


class AccuracyConsumer:
    """Top-1, top-5 and class-balanced top-1 of the model's logits (an :class:`~ivpt.metrics.AccuracyMeter`)."""

    def __init__(self, num_classes: int) -> None:
        self.meter = AccuracyMeter(num_classes)

    def update(self, batch: dict, forward: Forward) -> None:
        self.meter.update(forward(batch["image"]).logits.float().cpu(), batch["label"])

    def meters(self) -> list[SumState]:
        return [self.meter]

    def scores(self, stage: int | None = None) -> dict[str, float]:
        return self.meter.compute()

    def scored_meters(self, stage: int | None = None) -> list[SumState]:
        return [self.meter]


def evaluate_accuracy(model: nn.Module, dataset: Dataset, cfg: Config, info: R.DistInfo, *,
                      progress: bool = False) -> dict[str, float]:
    """top1, top5 and balanced_top1 in percent over ``dataset`` (every rank must call it)."""
    acc = AccuracyConsumer(cfg.model.num_classes)
    run_pass(model, dataset, cfg, info, [acc], desc="evaluate", progress=progress)
    return acc.meter.compute()
