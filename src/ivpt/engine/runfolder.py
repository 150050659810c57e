"""A run folder on disk: what a run writes into it, whether it can be resumed or hold a new run (checked on rank 0,
agreed by every rank: :func:`agree_on_rank0`), and the config it was trained with (``config.yaml``, read back by
:func:`ivpt.runs.run_config`)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .. import runtime as R
from ..checkpoint import OutputError, atomic_write_text
from ..config import Config, EvalConfig
from .errors import TrainingError

__all__ = ["RUN_FILES", "RESUMABLE_CHANGES", "STARTS_DIR", "STARTS_FILE", "check_resumable", "check_new_run_folder",
           "has_started_starts", "agree_on_rank0"]


# Config keys that may differ between a run and its resume without changing what the resumed run computes
# (optim.epochs, optim.min_steps and train.max_steps only while the schedule ignores the total steps:
# engine.resume.restore_state checks), besides those the run's model kind does not read (ivpt.config.config_changes
# leaves them out).
RESUMABLE_CHANGES = frozenset({
    "optim.epochs", "optim.min_steps", "train.max_steps", "train.log_every", "train.ckpt_every_steps",
    "train.tensorboard", "train.device", "train.sync_every", "train.compile", "data.num_workers", "data.root",
    *(f"eval.{f.name}" for f in dataclasses.fields(EvalConfig)),
})


# A run with train.starts (ivpt.engine.starts) keeps each start in STARTS_DIR/<k>/ and their scores in STARTS_FILE.
STARTS_DIR, STARTS_FILE = "starts", "starts.json"

# What a run writes into its folder: a folder holding any of them holds a run (started or finished).
RUN_FILES = ("last.pt", "metrics.json", "best", "config.yaml", "log.csv", "eval.json", "tensorboard", STARTS_DIR,
             STARTS_FILE)


def has_started_starts(out: str | Path) -> bool:
    """Whether ``out`` holds a run with ``train.starts`` whose starts began: it resumes before it has a last.pt."""
    return (Path(out) / STARTS_DIR).is_dir()


def check_resumable(out: str | Path) -> Path:
    """``out/last.pt``, or :class:`TrainingError` saying why ``out`` cannot be resumed."""
    out = Path(out)
    path = out / "last.pt"
    if path.is_file():
        return path
    finished = [n for n in ("metrics.json", "best") if (out / n).exists()]
    if finished:
        raise TrainingError(
            f"cannot resume: {path} not found; {out} holds a finished run ({', '.join(finished)}) whose training "
            f"state was deleted, so it cannot continue: evaluate {out / 'best'}, or train again with another --out")
    raise TrainingError(f"cannot resume: {path} not found; nothing to resume")


def check_new_run_folder(out: str | Path) -> None:
    """Refuse (:class:`TrainingError`) a folder holding any of :data:`RUN_FILES`: a new run never writes over a
    started or finished one."""
    out = Path(out)
    found = [n for n in RUN_FILES if (out / n).exists()]
    if not found:
        return
    if "last.pt" in found:
        fix = f"continue it with --resume {out}, or choose another --out"
    else:
        fix = f"it has no last.pt to resume from: choose another --out, or delete {out} to train it again"
    raise TrainingError(f"{out} already holds a run ({', '.join(found)}); {fix}")


def agree_on_rank0(info: R.DistInfo, out: Path, check) -> None:
    """Run ``check`` (a check of the run folder ``out``) on rank 0 only; every rank raises its error if it failed,
    so no rank goes on into collectives that the others will never join."""
    problem = None
    if info.is_main:
        try:
            check()
        except (TrainingError, OutputError) as exc:
            problem = exc
    if R.any_true(torch.tensor(problem is not None, device=info.device)):
        raise problem or TrainingError(f"rank 0 refused the run folder {out} (see its message)")


def _save_config(cfg: Config, out: Path) -> None:
    import yaml

    atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
