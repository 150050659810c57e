"""``train``: the entry point of a training run — one :class:`~.trainer.Trainer`, or with ``train.starts > 1``
several starts of which one is kept (:mod:`.starts`)."""
from __future__ import annotations

from pathlib import Path

from .. import runtime as R
from ..config import Config
from .starts import train_starts
from .trainer import Trainer

__all__ = ["train"]


def train(cfg: Config, out: str | Path, *, resume: bool = False, progress: bool = True,
          new_run: bool = False) -> dict:
    """Train ``cfg`` into folder ``out``; with ``resume`` continue from ``out/last.pt`` (or, with ``train.starts``,
    from the starts it left).

    Writes ``config.yaml``, ``log.csv``, ``last.pt`` (full training state), ``best/`` (pretrained folder chosen
    on the validation split, or the last epoch without one) and ``metrics.json`` (test accuracy of ``best``).
    Returns the content of ``metrics.json``. ``new_run`` (``ivpt train --out``) refuses a folder that already holds
    a run (:func:`~.runfolder.check_new_run_folder`); without it a folder that holds no ``last.pt`` is trained
    afresh.
    """
    trainer = None
    try:
        if cfg.train.starts > 1:
            return train_starts(cfg, out, resume=resume, progress=progress, new_run=new_run)
        trainer = Trainer(cfg, out, resume=resume, progress=progress, new_run=new_run)
        return trainer.fit()
    finally:
        if trainer is not None:
            trainer.close()
        R.teardown()  # leaves the torchrun process group, also when set-up failed
