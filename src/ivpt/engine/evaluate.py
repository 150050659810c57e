"""Accuracy of a model on a dataset, exact under DDP: each rank takes a disjoint shard (no padding, no
duplicates) and per-class counts are summed over ranks."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..config import Config
from .. import runtime as R
from .ordering import ShardSampler

__all__ = ["evaluate_accuracy", "eval_loader"]


def eval_loader(dataset: Dataset, cfg: Config, info: R.DistInfo, *, batch_size: int | None = None) -> DataLoader:
    from ..data import collate_skip_corrupt

    sampler = ShardSampler(len(dataset), rank=info.rank, world_size=info.world_size)  # type: ignore[arg-type]
    return DataLoader(dataset, batch_size=batch_size or cfg.eval.batch_size, sampler=sampler,
                      num_workers=cfg.data.num_workers, collate_fn=collate_skip_corrupt,
                      pin_memory=info.device.type == "cuda", generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, dataset: Dataset, cfg: Config, info: R.DistInfo, *,
                      progress: bool = False) -> dict[str, float]:
    """top1, top5 and balanced_top1 in percent over ``dataset``."""
    from tqdm.auto import tqdm

    from ..metrics import AccuracyMeter
    was_training = model.training
    model.eval()
    meter = AccuracyMeter(cfg.model.num_classes)
    loader = eval_loader(dataset, cfg, info)
    for batch in tqdm(loader, desc="evaluate", disable=not progress, leave=False, dynamic_ncols=True):
        if batch is None:
            continue
        with R.autocast(info.device, cfg.eval.amp):
            logits = model(batch["image"].to(info.device, non_blocking=True)).logits
        meter.update(logits.float().cpu(), batch["label"])
    meter.all_reduce(R.all_reduce_sum)
    model.train(was_training)
    return meter.compute()
