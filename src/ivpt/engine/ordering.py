"""Data order and augmentation randomness as pure functions of (seed, epoch, index).

That makes three things exact rather than approximate: resuming mid-epoch (skip the batches already seen, no
data touched), the same global batch under any number of processes (rank r takes the r-th slice of every global
batch), and augmentation that does not depend on how many workers load the data. (Evaluation order:
:class:`ivpt.eval.runner.ShardSampler`.) :func:`train_loader` is the one training DataLoader, kept for the whole
run: its workers persist across epochs, so every index travels with its epoch (:class:`EpochBatches`).
"""
from __future__ import annotations

import random
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["EpochBatches", "GlobalBatchSampler", "SeededDataset", "train_loader"]


class GlobalBatchSampler(Sampler[list[int]]):
    """Batches of one rank: the epoch's permutation is cut into global batches of ``global_batch``; rank r takes
    items [r·b, (r+1)·b) of each, b = global_batch / world_size. The last partial global batch is dropped.

    Args:
        n: dataset length.
        global_batch: images per global (micro-)batch over all processes.
        seed, epoch: the permutation is ``randperm(n)`` under ``seed * 1000003 + epoch``.
        start: global batches of this epoch already consumed (resume).
        num_batches: global batches per epoch (default: all full ones, ``n // global_batch``); the trainer asks
            for a multiple of ``optim.grad_accum`` so that no micro-batch is left without an optimiser step.
    """

    def __init__(self, n: int, global_batch: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 epoch: int = 0, start: int = 0, num_batches: int | None = None) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} does not divide over {world_size} processes")
        if n < global_batch:
            raise ValueError(f"the training set has {n} images, fewer than one batch of {global_batch}; "
                             "lower optim.batch_size")
        self.n, self.global_batch, self.rank, self.world = n, global_batch, rank, world_size
        self.seed, self.epoch, self.start = seed, epoch, start
        self.num_batches = n // global_batch if num_batches is None else min(num_batches, n // global_batch)

    def __len__(self) -> int:
        return max(self.num_batches - self.start, 0)

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        per_rank = self.global_batch // self.world
        for i in range(self.start, self.num_batches):
            lo = i * self.global_batch + self.rank * per_rank
            yield perm[lo : lo + per_rank]


class EpochBatches(Sampler[list[tuple[int, int]]]):
    """The :class:`GlobalBatchSampler` of the epoch chosen by :meth:`start`, each index given as ``(epoch, index)``.

    A DataLoader with persistent workers keeps this one sampler (its iterator is recreated every epoch) while its
    workers keep their own copy of the dataset, so the epoch that seeds an item must travel with the index
    (:class:`SeededDataset` accepts both forms). Arguments as :class:`GlobalBatchSampler`'s.
    """

    def __init__(self, n: int, global_batch: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 num_batches: int | None = None) -> None:
        self._args = dict(rank=rank, world_size=world_size, seed=seed, num_batches=num_batches)
        self.n, self.global_batch = n, global_batch
        self.start(0)

    def start(self, epoch: int, first: int = 0) -> None:
        """Serve ``epoch`` from its global batch ``first`` on (resume) at the next iteration."""
        self.batches = GlobalBatchSampler(self.n, self.global_batch, epoch=epoch, start=first, **self._args)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.batches.epoch
        for batch in self.batches:
            yield [(epoch, i) for i in batch]


def train_loader(dataset: SeededDataset, batches: EpochBatches, num_workers: int, *,
                 pin_memory: bool) -> DataLoader:
    """The training DataLoader: ``batches`` over ``dataset``, corrupt items dropped; with workers, they persist
    across epochs and each keeps 4 batches in flight; ``pin_memory`` (a CUDA device) lets host→device copies
    overlap."""
    from ..data import collate_skip_corrupt, loader_generator

    workers = dict(persistent_workers=True, prefetch_factor=4) if num_workers > 0 else {}
    return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=collate_skip_corrupt,
                      pin_memory=pin_memory, generator=loader_generator(), **workers)


class SeededDataset(Dataset):
    """Seeds python / numpy / torch RNGs from (seed, epoch, index) before each item, so random augmentations are a
    function of the item, not of which worker loads it or how many items that worker loaded before. Items are
    addressed by ``index`` (epoch from :meth:`set_epoch`) or by ``(epoch, index)`` (:class:`EpochBatches`)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str):
        if name == "dataset":  # avoid recursion while unpickling in a worker
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key: int | tuple[int, int]):
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        item_seed = (self.seed * 1_000_003 + epoch) * 10_000_019 + index
        # Restore the caller's RNG afterwards: with num_workers=0 this runs in the training process, whose
        # stream (Gumbel noise, equivariance transforms) must not depend on data loading. Only the CPU generator
        # is seeded: torch.manual_seed would also reseed every CUDA generator and reset the GPU's Gumbel stream.
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            random.seed(item_seed)
            np.random.seed(item_seed % 2**32)
            torch.default_generator.manual_seed(item_seed)
            return self.dataset[index]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])
