"""Accumulator state that combines by addition — across batches, evaluated stages and processes.

Every meter in :mod:`ivpt.metrics` keeps its whole state as a fixed set of tensors of fixed shape (counts in
int64, moments in float64) such that the state of a union of data is the elementwise SUM of the states of its
parts. That one property gives all the combination rules at once:

* batches: ``update`` adds a batch's contribution;
* shards held in one process (or saved to disk): ``a.merge(b)`` adds ``b``'s state into ``a``;
* DDP: ``meter.all_reduce()`` sums every state tensor over the process group (one collective per dtype).
  Every rank must call it, in the same order for all meters, and it is exact for the integer counts.

No meter keeps per-sample rows, so there is nothing to all-gather and no padding to strip: when a sampler pads
the last batch with duplicates, pass ``valid=False`` for those rows and they contribute nothing.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .. import runtime as R

__all__ = ["SumState", "ReduceFn"]

ReduceFn = Callable[[Tensor], "Tensor | None"]


class SumState:
    """Base class: subclasses register their state with :meth:`_add_state` in ``__init__``."""

    def __init__(self, *, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._names: list[str] = []
        self._specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}

    def _add_state(self, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.int64) -> None:
        self._names.append(name)
        self._specs[name] = (tuple(shape), dtype)
        setattr(self, name, torch.zeros(shape, dtype=dtype, device=self.device))

    def reset(self) -> None:
        """Zero the state (as after construction)."""
        for name in self._names:
            getattr(self, name).zero_()

    def state_tensors(self) -> list[Tensor]:
        """The state tensors themselves (not copies), in a fixed order; summing them elementwise over processes
        or shards and writing the sums back gives the state of the union of the data."""
        return [getattr(self, name) for name in self._names]

    def merge(self, other: SumState) -> SumState:
        """Add ``other``'s state (same class and construction arguments) into this one; returns ``self``."""
        if type(other) is not type(self):
            raise TypeError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        for name in self._names:
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine.shape != theirs.shape:
                raise ValueError(f"state {name!r}: shape {tuple(theirs.shape)} != {tuple(mine.shape)}")
            mine += theirs.to(mine.device)
        return self

    def all_reduce(self, reduce_fn: ReduceFn | None = None) -> SumState:
        """Sum the state over all processes, in place; a no-op without a process group. Returns ``self``.

        ``reduce_fn`` sums a tensor over processes in place; by default :func:`ivpt.runtime.all_reduce_sum`. State
        tensors of one dtype are packed into one buffer, moved to the device the process group reduces on (CUDA for
        NCCL) and copied back to ``self.device``.
        """
        reduce_fn = reduce_fn or R.all_reduce_sum
        device = R.group_device() or self.device
        by_dtype: dict[torch.dtype, list[str]] = {}
        for name in self._names:
            by_dtype.setdefault(self._specs[name][1], []).append(name)
        for names in by_dtype.values():
            flat = torch.cat([getattr(self, n).reshape(-1) for n in names]).to(device)
            out = reduce_fn(flat)
            flat = flat if out is None else out
            offset = 0
            for n in names:
                t = getattr(self, n)
                t.copy_(flat[offset:offset + t.numel()].view(t.shape).to(t.device))
                offset += t.numel()
        return self

    def no_data(self) -> dict[str, str]:
        """{metric: reason} for each metric that :meth:`compute` leaves out because nothing measured it (a score
        with no data is absent, never 0 or 100); empty when every metric has data."""
        return {}

    def state_dict(self) -> dict[str, Tensor]:
        """Copies of the state tensors by name (for saving a partial evaluation)."""
        return {name: getattr(self, name).detach().clone() for name in self._names}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for name in self._names:
            getattr(self, name).copy_(state[name])

    def _rows(self, n: int, valid: Tensor | None, device: torch.device) -> Tensor:
        """(n,) bool mask of the rows to count."""
        if valid is None:
            return torch.ones(n, dtype=torch.bool, device=device)
        valid = valid.to(device=device, dtype=torch.bool).reshape(-1)
        if valid.numel() != n:
            raise ValueError(f"valid has {valid.numel()} entries for a batch of {n}")
        return valid
