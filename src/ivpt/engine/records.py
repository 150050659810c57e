"""What a run records as it trains, and how it reads it back: the finite flags of each optimiser step and the loss
sums of each log row stay on the device until :func:`read_back` (the body of :meth:`Trainer.sync`) fetches them in
one transfer and writes the rows to ``log.csv``, TensorBoard and the progress bar."""
from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import runtime as R
from ..checkpoint import atomic_write_text
from ..config import LOSS_TERMS
from ..models.base import CONCEPT_RATE
from .checks import kept_note
from .errors import TrainingError

__all__ = ["LOG_FIELDS", "read_back"]


# The columns of every run's log.csv; runs with concept maps add alive_s<i>, entropy_s<i> per map stage
# (ivpt.engine.health). The last row of each epoch also holds the health and the validation scores: top-1 and, for
# models with a part-pooled head, parts-only top-1 and part share (ivpt.metrics.decision).
LOG_FIELDS = ["epoch", "step", "lr_head", "lr_concepts", "total", *LOSS_TERMS, "img_per_s", "elapsed_s", "val_top1",
              "val_parts_only_top1", "val_part_share"]


@dataclass
class _StepCheck:
    """One optimiser step's finite flags, still on the device: ``local`` (K,) bool, non-finite in some micro-batch
    of this process, per loss term ``names``; ``reduced`` (2,) float, [non-finite loss, non-finite gradient norm],
    summed over processes at the read."""

    epoch: int
    step: int  # 1-based number of the step
    names: list[str]
    local: torch.Tensor
    reduced: torch.Tensor


@dataclass
class _Row:
    """A log row whose loss-term means (``values``, on the device, for ``names``) are not read back yet."""

    row: dict
    names: list[str] = field(default_factory=list)
    values: torch.Tensor | None = None

    def fill(self, flat: list[float], at: int) -> int:
        """Take this row's values from ``flat`` at ``at``; returns the position after them."""
        if self.values is None:
            return at
        self.row.update(zip(self.names, flat[at : at + len(self.names)]))
        return at + len(self.names)


class _Window:
    """Loss terms summed on the device since the last log row; a row's values are read back later, with the
    finite flags (:meth:`Trainer.sync`)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset(time.perf_counter())

    def reset(self, now: float) -> None:
        self.n, self.images, self.t, self.sums = 0, 0, now, {}

    def add(self, terms: dict, total: torch.Tensor, images: int) -> None:
        self.n += 1
        self.images += images
        for k, v in {**terms, "total": total.detach()}.items():
            v = v.detach().float().to(self.device)
            self.sums[k] = self.sums[k] + v if k in self.sums else v

    def state_dict(self) -> dict:
        """The steps counted and the loss sums since the last log row, on the host (for ``last.pt``: a run resumed
        mid-window logs the row the uninterrupted run does). The throughput restarts at the resume."""
        values = torch.stack(list(self.sums.values())).tolist() if self.sums else []  # one device->host copy
        return {"n": self.n, "sums": dict(zip(self.sums, values))}

    def load_state_dict(self, state: dict) -> None:
        self.n = int(state["n"])
        self.sums = {k: torch.tensor(v, dtype=torch.float32, device=self.device) for k, v in state["sums"].items()}

    def snapshot(self, epoch: int, step: int, lrs: dict[str, float], t_start: float,
                 health: dict[str, float] | None = None) -> _Row:
        """The row of the steps since the last one (loss means still on the device), with ``lrs``
        (:func:`_rate_lrs`) and ``health``; resets."""
        now = time.perf_counter()
        row = {"epoch": epoch + 1, "step": step, **lrs,
               "img_per_s": self.images / max(now - self.t, 1e-9), "elapsed_s": now - t_start, **(health or {})}
        names = list(self.sums)
        values = torch.stack([self.sums[k] for k in names]) / max(self.n, 1) if names else None
        self.reset(now)
        return _Row(row, names, values)


def read_back(trainer) -> None:
    """Read back, in ONE device→host transfer, the finite flags of the steps since the last sync (summed over
    processes) and the pending log rows; write the rows. At the first non-finite step, write only the rows
    before it and raise :class:`TrainingError` naming the step and its loss terms: nothing after it is saved.
    Every rank calls it at the same steps (a collective)."""
    checks, rows = trainer.checks, trainer.rows
    trainer.checks, trainer.rows = [], []
    parts = []
    distributed = trainer.info.distributed
    if checks or distributed:  # under torchrun the stop flag is agreed at every read
        reduced = [torch.stack([c.reduced for c in checks]).flatten()] if checks else []
        if distributed:
            reduced.append(torch.tensor([float(trainer.stop_signal is not None)], device=trainer.device))
        parts.append(R.all_reduce_sum(torch.cat(reduced)))
        parts += [c.local.float() for c in checks]
    parts += [r.values for r in rows if r.values is not None]
    values = torch.cat(parts).tolist() if parts else []  # the one host sync
    if distributed:
        trainer.stop_agreed = trainer.stop_agreed or values[2 * len(checks)] > 0
    at, bad = 2 * len(checks) + int(distributed), None
    for i, c in enumerate(checks):
        local, at = values[at : at + len(c.names)], at + len(c.names)
        if bad is None and (values[2 * i] or values[2 * i + 1]):
            terms = [n for n, v in zip(c.names, local) if v]
            bad = c, terms or (["gradients"] if values[2 * i + 1] else ["another process's loss"])
    for r in rows:
        at = r.fill(values, at)
    for r in rows:
        if bad is None or r.row["step"] < bad[0].step:
            write_row(trainer, r.row)
    if bad is not None:
        trainer.optimizer.zero_grad(set_to_none=True)
        check, terms = bad
        span = (f" (found by the check of steps {checks[0].step}-{checks[-1].step}, train.sync_every="
                f"{trainer.cfg.train.sync_every})" if len(checks) > 1 else "")
        raise TrainingError(
            f"non-finite loss at epoch {check.epoch + 1}, step {check.step}: term(s) {', '.join(terms)}{span}. "
            f"Nothing from step {check.step} on was saved{kept_note(trainer.out)}. Lower the learning rates or try "
            "optim.amp=none"
        )


def write_row(trainer, row: dict) -> None:
    """One log.csv (and TensorBoard) row; the progress bar shows its loss and speed."""
    trainer.log.write(row, LOG_FIELDS + trainer.health.columns)
    trainer.tb.log(row, row["step"])
    if trainer.bar is not None:
        trainer.bar.set_postfix(loss=f"{row.get('total', math.nan):.3f}", img_s=f"{row['img_per_s']:.1f}")


def _rate_lrs(optimizer: torch.optim.Optimizer, rates: list[float] | None = None) -> dict[str, float]:
    """The log's ``lr_head`` and ``lr_concepts``: the rate of the first group of each role
    (:data:`~ivpt.models.base.HEAD_RATE`, :data:`~ivpt.models.base.CONCEPT_RATE`; every group of a role runs at
    the same rate), NaN for a role with no group (a linear probe has no concept group). ``rates``: one per group
    instead of the groups' current ones."""
    lrs = {"lr_head": math.nan, "lr_concepts": math.nan}
    rates = [g["lr"] for g in optimizer.param_groups] if rates is None else rates
    for group, rate in reversed(list(zip(optimizer.param_groups, rates, strict=True))):
        lrs["lr_concepts" if group.get("rate") == CONCEPT_RATE else "lr_head"] = rate
    return lrs


class _CsvLog:
    """Append-only CSV log (rank 0). The header is written with the first row (when the run's columns are
    known); a resumed run keeps writing under the header already in the file, first dropping the rows after
    ``last_step`` (the checkpoint's step: a killed run logged steps that the resumed run computes again)."""

    def __init__(self, path: Path, enabled: bool, *, last_step: int | None = None) -> None:
        self.path, self.enabled = path, enabled
        self.file = self.writer = None
        if enabled and last_step is not None and path.is_file():
            with path.open(newline="") as handle:
                reader = csv.DictReader(handle)
                rows, fields = list(reader), reader.fieldnames or []
            kept = [r for r in rows if r.get("step", "").isdigit() and int(r["step"]) <= last_step]
            if len(kept) != len(rows):
                text = io.StringIO(newline="")
                writer = csv.DictWriter(text, fieldnames=fields)
                writer.writeheader()
                writer.writerows(kept)
                atomic_write_text(path, text.getvalue())

    def write(self, row: dict, fields: list[str]) -> None:
        if not self.enabled:
            return
        if self.writer is None:
            existing = self.path.is_file() and self.path.stat().st_size > 0
            if existing:
                with self.path.open(newline="") as f:
                    fields = next(csv.reader(f), fields)
            self.file = self.path.open("a", newline="")
            self.writer = csv.DictWriter(self.file, fieldnames=fields, extrasaction="ignore")
            if not existing:
                self.writer.writeheader()
        self.writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = self.writer = None


class _Tensorboard:
    def __init__(self, out: Path, enabled: bool) -> None:
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter  # lazy: optional dependency
            except ImportError as exc:
                raise TrainingError("train.tensorboard=true needs `pip install tensorboard`") from exc
            self.writer = SummaryWriter(str(out / "tensorboard"))

    def log(self, row: dict, step: int) -> None:
        if self.writer is not None:
            for k, v in row.items():
                if isinstance(v, float) and k not in ("epoch", "step"):
                    self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _progress(enabled: bool, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False)
