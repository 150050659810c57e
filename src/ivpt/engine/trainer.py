"""The training loop: one code path for CPU, one GPU and ``torchrun`` (plain DDP).

Read :class:`Trainer` top to bottom: ``__init__`` sets the run up (process group, data, model, optimiser, resume),
:meth:`Trainer.fit` runs the epochs, :meth:`Trainer.train_epoch` the optimiser steps of one epoch,
:meth:`Trainer.optimizer_step` one step over ``optim.grad_accum`` micro-batches and the learning-rate schedule
(a function of the step: :mod:`ivpt.engine.schedule`), :meth:`Trainer.end_epoch` concept health, validation and
checkpoints, :meth:`Trainer.finish` the test pass and ``metrics.json``.

Each optimiser step sees a global batch of ``optim.batch_size`` images (split over processes and
``optim.grad_accum`` micro-batches). An epoch has ``len(train) // batch_size`` steps: the partial global batch at
its end is dropped, so no micro-batch is ever back-propagated without a step. The clean batch and its randomly
warped copy go through the model as ONE forward pass of twice the batch, so DDP sees a single forward per
backward. Checkpoints (``last.pt``) hold everything needed to continue bit-for-bit on CPU.

The hot loop never waits for the device: each step's finite flags (per loss term, and the gradient norm) and the
log sums stay on the device and are read back together once every ``train.sync_every`` steps — and always before
anything is saved (:meth:`Trainer.sync`), so no checkpoint ever holds a state after a non-finite step, and every
save first checks that the parameters and optimiser state are finite.

A run folder belongs to one process at a time (:class:`ivpt.checkpoint.RunLock` on ``out/.lock``, taken by rank 0
for the run's life). SIGTERM and SIGINT during the training loop stop the run at the next optimiser step boundary
(under torchrun: at the next flag read, ``train.sync_every``) with ``last.pt`` saved there, so ``--resume`` ends
exactly where an uninterrupted run would; a second signal stops at once.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import logging
import math
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import runtime as R
from ..checkpoint import (
    CheckpointError,
    OutputError,
    RunLock,
    adapter_state,
    atomic_torch_save,
    atomic_write_text,
    backbone_identity,
    check_backbone,
    check_output_folder_all_ranks,
    remove_stale_temporaries,
    load_adapter_state,
    load_pretrained,
    load_training_state,
    non_finite_entries,
    read_pretrained_config,
)
from ..config import LOSS_TERMS, Config, EvalConfig, load_config, saved_config
from ..losses import ivpt_losses, random_affine, warp
from ..eval import evaluate_accuracy
from ..eval.runner import AccuracyConsumer, run_pass
from ..models import create_model
from .health import ConceptHealth, MapHealth, collapse_warning, weak_stages
from .revive import revive_dead_concepts
from .ordering import EpochBatches, SeededDataset, train_loader
from .schedule import build_scheduler, depends_on_total, run_epochs, schedule_warning, total_steps

__all__ = ["TrainingError", "TrainingStopped", "Trainer", "train", "load_run_config", "config_changes",
           "changes_from_run", "check_resumable", "check_new_run_folder", "RESUMABLE_CHANGES", "RUN_FILES"]

# The columns of every run's log.csv; runs with concept maps add alive_s<i>, entropy_s<i> per map stage
# (ivpt.engine.health), filled in the last row of each epoch.
LOG_FIELDS = ["epoch", "step", "lr_head", "lr_concepts", "total", *LOSS_TERMS, "img_per_s", "elapsed_s"]

# Config keys that may differ between a run and its resume without changing what the resumed run computes
# (optim.epochs, optim.min_steps and train.max_steps only while the schedule ignores the total steps:
# Trainer._restore checks).
RESUMABLE_CHANGES = frozenset({
    "optim.epochs", "optim.min_steps", "train.max_steps", "train.log_every", "train.ckpt_every_steps",
    "train.tensorboard", "train.device", "train.sync_every", "train.compile", "data.num_workers", "data.root",
    *(f"eval.{f.name}" for f in dataclasses.fields(EvalConfig)),
})


# What a run writes into its folder: a folder holding any of them holds a run (started or finished).
RUN_FILES = ("last.pt", "metrics.json", "best", "config.yaml", "log.csv", "eval.json", "tensorboard")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


class TrainingStopped(KeyboardInterrupt):
    """SIGTERM or SIGINT stopped the run at an optimiser step boundary, with ``last.pt`` saved there; ``signum`` is
    the signal. A KeyboardInterrupt, so that callers treat it as the interruption it is."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum

    def __str__(self) -> str:
        return str(self.args[0])


def train(cfg: Config, out: str | Path, *, resume: bool = False, progress: bool = True,
          new_run: bool = False) -> dict:
    """Train ``cfg`` into folder ``out``; with ``resume`` continue from ``out/last.pt``.

    Writes ``config.yaml``, ``log.csv``, ``last.pt`` (full training state), ``best/`` (pretrained folder chosen
    on the validation split, or the last epoch without one) and ``metrics.json`` (test accuracy of ``best``).
    Returns the content of ``metrics.json``. ``new_run`` (``ivpt train --out``) refuses a folder that already holds
    a run (:func:`check_new_run_folder`); without it a folder that holds no ``last.pt`` is trained afresh.
    """
    trainer = None
    try:
        trainer = Trainer(cfg, out, resume=resume, progress=progress, new_run=new_run)
        return trainer.fit()
    finally:
        if trainer is not None:
            trainer.close()
        R.teardown()  # leaves the torchrun process group, also when set-up failed


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


def load_run_config(out: str | Path) -> Config:
    """The config a run folder was trained with (its ``config.yaml``)."""
    path = Path(out) / "config.yaml"
    if not path.is_file():
        raise TrainingError(f"cannot resume: {path} not found (is {out} a run folder written by `ivpt train`?)")
    return load_config(path, saved=True)


def config_changes(old: Config, new: Config) -> list[str]:
    """Dotted keys whose values differ between two configs."""
    a, b = old.to_dict(), new.to_dict()
    return [f"{s}.{k}" for s in a for k in a[s] if a[s][k] != b[s][k]]


def changes_from_run(run_dir: str | Path, cfg: Config) -> list[str]:
    """Dotted keys in which ``cfg`` differs from the config the run folder ``run_dir`` was trained with; none when
    the folder holds no run yet."""
    if not (Path(run_dir) / "config.yaml").is_file():
        return []
    return config_changes(load_run_config(run_dir), cfg)


class Trainer:
    """One training run in ``out``; see the module docstring for the order of its parts."""

    def __init__(self, cfg: Config, out: str | Path, *, resume: bool = False, progress: bool = True,
                 new_run: bool = False) -> None:
        self.cfg, self.out, self.progress = cfg, Path(out), progress
        self.info = R.setup(cfg.train.device)
        self.device = self.info.device
        self.lock = RunLock(self.out)  # held by rank 0 from here to close()
        self.stop_signal: int | None = None  # SIGTERM / SIGINT received during the training loop
        self.stop_agreed = False  # under torchrun: whether some rank had a stop_signal at the last flag read
        if resume:
            check_resumable(self.out)
        check_output_folder_all_ranks(self.out, self.info)
        try:
            self._agree(self.lock.acquire)
            if new_run:
                self._agree(lambda: check_new_run_folder(self.out))
            self._set_up(resume)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the run folder (idempotent; :func:`train` calls it at the end of the run, however it ends)."""
        self.lock.release()

    def _agree(self, check) -> None:
        """Run ``check`` on rank 0 only; every rank raises its error if it failed, so no rank goes on into
        collectives that the others will never join."""
        problem = None
        if self.info.is_main:
            try:
                check()
            except (TrainingError, OutputError) as exc:
                problem = exc
        if R.any_true(torch.tensor(problem is not None, device=self.device)):
            raise problem or TrainingError(f"rank 0 refused the run folder {self.out} (see its message)")

    def _set_up(self, resume: bool) -> None:
        """Everything else: data, model, optimiser and, with ``resume``, last.pt (read and checked before anything
        is written into the folder)."""
        from ..data import DeviceAugment, build_datasets, reset_corrupt_count

        cfg = self.cfg
        state = self._read_resume_state() if resume else None
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)

        self.data = build_datasets(cfg)
        if self.data.num_classes != cfg.model.num_classes:
            raise TrainingError(
                f"the dataset at {cfg.data.root} has {self.data.num_classes} classes but model.num_classes="
                f"{cfg.model.num_classes}; set model.num_classes={self.data.num_classes}"
            )
        self.train_set = SeededDataset(self.data.train, cfg.train.seed)
        if state is not None:
            self._check_same_data(state)
        warning = _unseen_classes_warning(self.data, cfg.data.root)
        if warning and self.info.is_main:
            logging.getLogger("ivpt").warning(warning)
        # data.gpu_augment: items hold uint8 pixels and drawn parameters; the batch is finished on the device.
        self.augment = DeviceAugment(cfg.data, cfg.model.img_size) if cfg.data.gpu_augment else None
        o = cfg.optim
        if not all(math.isfinite(v) for v in (o.base_lr, o.head_lr_mult, o.concept_lr_mult)):
            raise TrainingError(f"the learning rates must be finite numbers: optim.base_lr={o.base_lr}, "
                                f"optim.head_lr_mult={o.head_lr_mult}, optim.concept_lr_mult={o.concept_lr_mult}")
        if o.batch_size % (o.grad_accum * self.info.world_size):
            raise TrainingError(
                f"optim.batch_size={o.batch_size} must divide by optim.grad_accum x processes "
                f"= {o.grad_accum} x {self.info.world_size}"
            )
        self.micro_global = o.batch_size // o.grad_accum
        self.steps_per_epoch = len(self.train_set) // o.batch_size
        if self.steps_per_epoch == 0:
            raise TrainingError(
                f"the training split of {cfg.data.root} has {len(self.train_set)} images, fewer than one optimiser "
                f"step of optim.batch_size={o.batch_size}; lower optim.batch_size (or data.val_fraction)")

        self.model = create_model(cfg.model, seed=cfg.train.seed).to(self.device)
        if state is None and self.model.has_concept_maps and cfg.model.prototype_init == "feature_mean":
            self._centre_prototypes()
        groups = self.model.param_groups(o.base_lr, o.head_lr_mult, o.concept_lr_mult)
        self.trainable = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.Adam(groups, betas=tuple(o.betas), weight_decay=o.weight_decay)
        self.epochs = run_epochs(o, self.steps_per_epoch)  # optim.epochs, or more to reach optim.min_steps
        self.total_steps = total_steps(o, self.steps_per_epoch, cfg.train.max_steps)
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, self.steps_per_epoch, o)
        self.step_lrs = _group_lrs(self.optimizer)  # the rates of the last optimiser step, for the log
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=o.amp == "fp16")
        # Every training random number comes from train.seed (and the rank): the global generator drives the
        # Gumbel noise, eq_gen (identical on every rank) the one equivariance transform per step.
        torch.manual_seed(cfg.train.seed + self.info.rank)
        random.seed(cfg.train.seed + self.info.rank)
        np.random.seed(cfg.train.seed + self.info.rank)
        self.eq_gen = torch.Generator().manual_seed(cfg.train.seed)

        self.epoch, self.batch_in_epoch, self.step, self.best_val = 0, 0, 0, -math.inf
        self.best_alive = False  # whether best/ keeps every stage's concepts alive on the validation split
        self.health = ConceptHealth()  # this epoch's concept health so far (restored with the rest on resume)
        if state is not None:
            self._restore(state)
        if self.info.is_main:
            if state is None:  # a fresh run in a folder a killed one started (compare, demo): its log goes
                (self.out / "log.csv").unlink(missing_ok=True)
            _save_config(cfg, self.out)

        # Every IVPT parameter receives a gradient when all loss terms are on; baselines leave some unused.
        unused = not self.model.maps_only_view or any(w == 0 for w in cfg.loss.weights().values())
        self.net: nn.Module = self.model
        if self.info.distributed:
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=unused,
            )
        self.eager_net, self.compile_pending = self.net, False  # pending: not yet through one forward/backward
        if cfg.train.compile:
            self.net, warning = R.compile_module(self.net)
            self.compile_pending = warning is None
            if warning and self.info.is_main:
                logging.getLogger("ivpt").warning(warning)
        if state is not None and self.info.is_main:
            remove_stale_temporaries(self.out)  # left by a kill inside an atomic write
            remove_stale_temporaries(self.out / "best")
        self.log = _CsvLog(self.out / "log.csv", self.info.is_main, last_step=None if state is None else self.step)
        self.tb = _Tensorboard(self.out, self.info.is_main and cfg.train.tensorboard)
        self.window = _Window(self.device)
        self.checks: list[_StepCheck] = []  # steps whose finite flags are still on the device
        self.rows: list[_Row] = []  # log rows whose values are still on the device
        self.bar = None  # the epoch's progress bar
        self.batches = EpochBatches(len(self.train_set), self.micro_global, rank=self.info.rank,
                                    world_size=self.info.world_size, seed=cfg.train.seed,
                                    num_batches=self.steps_per_epoch * o.grad_accum)
        self.loader = train_loader(self.train_set, self.batches, cfg.data.num_workers,
                                   pin_memory=self.device.type == "cuda")
        self.epoch_health: dict[str, float] = {}  # alive_s*/entropy_s* of the last epoch (ivpt.engine.health)
        self.t_start = time.perf_counter()
        reset_corrupt_count()
        log = logging.getLogger("ivpt")
        if self.epochs > o.epochs and self.info.is_main:
            log.info(f"{self.epochs} epochs instead of optim.epochs={o.epochs}: {self.steps_per_epoch} steps per "
                     f"epoch reach optim.min_steps={o.min_steps} only then")
        warning = schedule_warning(self.total_steps, self.steps_per_epoch, o)
        if warning and self.info.is_main:
            log.warning(warning)

    # ------------------------------------------------------------------------------------------------- set-up
    def _centre_prototypes(self, images: int = 64) -> None:
        """``model.prototype_init=feature_mean``: centre the prototypes on ``images`` training images spread evenly
        over the split, as epoch 0 augments them: the same images, hence the same start, on every rank."""
        from ..data import collate_skip_corrupt

        n = len(self.train_set)
        picks = torch.linspace(0, n - 1, min(n, images)).round().long().unique().tolist()
        batch = collate_skip_corrupt([self.train_set[(0, i)] for i in picks])
        if batch is None:  # every picked image unreadable: keep the normal initialisation
            return
        self.model.centre_prototypes(self._images(batch), batch_size=self.cfg.eval.batch_size)

    def _images(self, batch: dict) -> torch.Tensor:
        """A collated batch's images on the device, finished by :attr:`augment` when ``data.gpu_augment``."""
        x = batch["image"].to(self.device, non_blocking=True)
        return x if self.augment is None else self.augment(x, batch["augment"])

    def _read_resume_state(self) -> dict:
        """last.pt, checked against the config before the run folder is touched."""
        path = check_resumable(self.out)
        try:
            state = load_training_state(path)  # weights_only: loading never runs code from the file
        except CheckpointError as exc:
            message = str(exc)
            if " is unreadable " in message:
                message += "; it was not written by a finished checkpoint save"
            raise TrainingError(f"cannot resume: {message}") from None
        if not isinstance(state, dict) or "model" not in state or "config" not in state:
            raise TrainingError(f"cannot resume: {path} is not a training checkpoint written by `ivpt train`")
        trained = Config.from_dict(saved_config(state["config"]))
        changed = [k for k in config_changes(trained, self.cfg) if k not in RESUMABLE_CHANGES]
        if changed:
            raise TrainingError(
                f"cannot resume {self.out}: the config differs from the checkpoint's in {', '.join(changed)}, "
                "which would not continue the same run exactly; start a new run with --out (only "
                "optim.epochs, optim.min_steps, train.max_steps, logging, checkpoint, device, worker and eval "
                "settings may change)"
            )
        state["trained_root"] = trained.data.root
        return state

    def _check_same_data(self, state: dict) -> None:
        """A resume with another ``data.root`` (a moved dataset) is named, and refused when the dataset there is not
        the one the run trained on (its training split's size, classes and class counts, stored in last.pt)."""
        old, new = state.get("trained_root"), self.cfg.data.root
        if old == new:
            return
        saved, mine = state.get("data"), _data_identity(self.data)
        if saved is not None and saved != mine:
            raise TrainingError(
                f"cannot resume {self.out}: the dataset at {new} is not the one the run was trained on: "
                f"{_describe_data(mine)} there, but the run was trained on {old} with {_describe_data(saved)}; "
                f"resume with data.root={old} (or the same dataset moved), or start a new run with --out")
        if self.info.is_main:
            check = "" if saved is not None else " (this last.pt predates the check that it is the same dataset)"
            logging.getLogger("ivpt").warning(f"resuming with data.root={new} (the run was trained on {old}){check}")

    def _restore(self, state: dict) -> None:
        path = self.out / "last.pt"
        try:
            check_backbone(self.model, state.get("backbone"), path)
            bad = non_finite_entries({f"optimizer.{k}": v for k, v in _optimizer_tensors(state["optimizer"])})
            if bad:
                raise CheckpointError(f"{path} holds non-finite values in {', '.join(bad[:5])}; it was saved after "
                                      "training diverged")
            load_adapter_state(self.model, state["model"], path)
        except CheckpointError as exc:
            raise TrainingError(f"cannot resume: {exc}") from exc
        if "lr_lambdas" not in state["scheduler"]:
            raise TrainingError(f"cannot resume: {path} holds the per-epoch scheduler of an earlier ivpt; finish it "
                                "with that version or start a new run with --out")
        if depends_on_total(self.cfg.optim) and state.get("total_steps") != self.total_steps:
            raise TrainingError(
                f"cannot resume {self.out}: optim.schedule={self.cfg.optim.schedule} with optim.warmup="
                f"{self.cfg.optim.warmup} follows the run's total steps, which would change from "
                f"{state.get('total_steps')} to {self.total_steps}; keep optim.epochs, optim.min_steps and "
                f"train.max_steps, or start "
                "a new run with --out")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.batch_in_epoch, self.step = state["epoch"], state["batch_in_epoch"], state["step"]
        self.best_val = state["best_val"]
        # A last.pt from before the selection rule chose best/ by top-1 alone: its best/ counts as alive.
        self.best_alive = state.get("best_alive", True)
        rng = state["rng"]
        _set_rng_state(rng[self.info.rank] if self.info.rank < len(rng) else rng[0], self.eq_gen)
        health = state.get("health")  # absent in a last.pt from before the counts were saved
        if health and self.info.rank < len(health):
            self.health.load_state_dict(health[self.info.rank], self.device)
        if self.info.is_main:
            print(f"resumed from {path} at epoch {self.epoch}, step {self.step}")

    # ----------------------------------------------------------------------------------------------- the run
    def fit(self) -> dict:
        """Every remaining epoch, then the test pass; returns ``metrics.json``'s content. A run resumed after it
        reached ``train.max_steps`` (e.g. killed during its test pass) goes straight to the test pass."""
        max_steps = self.cfg.train.max_steps
        first = self.epochs if max_steps and self.step >= max_steps else self.epoch
        try:
            with _StopOnSignal(self):
                for epoch in range(first, self.epochs):
                    done = self.train_epoch(epoch)
                    self.end_epoch(epoch, finished=not done or self.batch_in_epoch >= self.steps_per_epoch)
                    if self._stop_due():
                        raise self._stopped()  # end_epoch saved last.pt
                    if done:
                        break
        finally:
            self.loader = None  # its persistent workers exit (before the test pass starts its own)
        self.log.close()
        self.tb.close()
        return self.finish()

    def train_epoch(self, epoch: int) -> bool:
        """Optimiser steps of ``epoch`` from ``self.batch_in_epoch`` on; True when ``train.max_steps`` is reached."""
        o = self.cfg.optim
        first = self.batch_in_epoch
        self.batches.start(epoch, first * o.grad_accum)
        self.model.train()
        self.bar = bar = _progress(self.progress and self.info.is_main, self.steps_per_epoch - first,
                                   f"epoch {epoch + 1}/{self.epochs}")
        done = False
        micro: list[dict | None] = []
        batches = iter(self.loader)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except Exception:
                # Ctrl-C reaches the loader's workers too, which then exit: with a stop requested this is a step
                # boundary (the micro-batches fetched so far have not gone through the model), so stop here.
                if self.stop_signal is None or self.info.distributed:
                    raise
                self.save_last(epoch, self.batch_in_epoch)
                raise self._stopped() from None
            micro.append(batch)
            if len(micro) < o.grad_accum:
                continue
            self.optimizer_step(epoch, micro)
            micro = []
            bar.update(1)
            done = bool(self.cfg.train.max_steps and self.step >= self.cfg.train.max_steps)
            closing = done or self.batch_in_epoch >= self.steps_per_epoch  # written below, with the health
            if self.step % self.cfg.train.log_every == 0 and not closing:
                self.rows.append(self.window.snapshot(epoch, self.step, self.step_lrs, self.t_start))
            if self.cfg.train.ckpt_every_steps and self.step % self.cfg.train.ckpt_every_steps == 0:
                self.save_last(epoch, self.batch_in_epoch)
            if not closing and self._stop_due():
                self.save_last(epoch, self.batch_in_epoch)
                raise self._stopped()
            if done:
                break
        self.epoch_health = self.health.flush(R.all_reduce_sum)  # every rank: the counts are summed
        if self.window.n or self.epoch_health:
            self.rows.append(self.window.snapshot(epoch, self.step, self.step_lrs, self.t_start, self.epoch_health))
        self.sync()
        bar.close()
        self.bar = None
        return done

    def optimizer_step(self, epoch: int, micro_batches: list[dict | None]) -> None:
        """Forward/backward every micro-batch, clip and step, without reading anything back from the device.

        The step's finite flags (each loss term of every micro-batch and, outside fp16 where the scaler skips
        such steps, the gradient norm) join :attr:`checks`; :meth:`sync` reads them before this step is applied
        when the step is due (every ``train.sync_every`` steps, the last step of an epoch or of the run, and a
        ``train.ckpt_every_steps`` step), so that a non-finite step is never saved."""
        o = self.cfg.optim
        names: list[str] = []
        bad_terms = torch.zeros(0, dtype=torch.bool, device=self.device)  # per logged term, any micro-batch
        bad_loss = torch.zeros((), dtype=torch.bool, device=self.device)
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = self.net.no_sync() if self.info.distributed and not last else contextlib.nullcontext()
            if batch is None:  # every image of the micro-batch was unreadable
                if self.info.distributed:
                    # The other ranks' backward waits for this rank's gradients (DDP's all-reduce): take part with
                    # a zero-weighted pass over a blank batch, which also draws what a real one draws from eq_gen.
                    with sync:
                        self._forward_backward(*self._blank_batch(), weight=0.0)
                continue
            x = self._images(batch)
            y = batch["label"].to(self.device, non_blocking=True)
            with sync:
                total, terms = self._forward_backward(x, y)
            flags = ~torch.isfinite(torch.stack([*terms.values(), total.detach()]))
            bad_terms = flags[:-1] if not names else bad_terms | flags[:-1]
            bad_loss = bad_loss | flags.any()
            names = list(terms)
            self.window.add(terms, total, x.shape[0] * self.info.world_size)
        self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the fp16-scaled ones
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, o.grad_clip if o.grad_clip > 0 else math.inf)
        bad_grad = ~torch.isfinite(norm.to(self.device)) if o.amp != "fp16" else torch.zeros_like(bad_loss)
        self.checks.append(_StepCheck(epoch, self.step + 1, names, bad_terms,
                                      torch.stack([bad_loss, bad_grad]).float()))
        if self._sync_due():
            self.sync()  # raises before a non-finite step is applied
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_lrs = _group_lrs(self.optimizer)
        self.scheduler.step()  # the rates of the next step: lr_factor(self.step + 1)
        self.step += 1
        self.batch_in_epoch += 1

    def _blank_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A micro-batch of this process's size of zero (normalised) images, label 0, on the device."""
        b, size = self.micro_global // self.info.world_size, self.cfg.model.img_size
        return (torch.zeros(b, 3, size, size, device=self.device),
                torch.zeros(b, dtype=torch.long, device=self.device))

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor, weight: float = 1.0) -> tuple[torch.Tensor, dict]:
        """compute_loss and backward of one micro-batch (its loss times ``weight``; a blank batch's 0 neither counts
        its concept maps nor adds to any gradient). The first one under ``train.compile`` is where compilation
        happens (forward, then backward); if it fails, one warning and the eager model from then on."""
        try:
            total, terms = compute_loss(self.net, x, y, self.cfg, self.eq_gen,
                                        health=self.health if weight else None)
            self.scaler.scale(total * weight / self.cfg.optim.grad_accum).backward()
        except Exception as exc:
            if not self.compile_pending:
                raise
            self.compile_pending = False
            if self.info.is_main:
                logging.getLogger("ivpt").warning(R.compile_warning(exc))
            self.net = self.eager_net
            self.optimizer.zero_grad(set_to_none=True)
            self.health.reset()  # the failed call may have counted this batch's maps
            return self._forward_backward(x, y, weight)
        self.compile_pending = False
        return total, terms

    def _sync_due(self) -> bool:
        """Whether the step being taken must be checked before it is applied (the same answer on every rank)."""
        t, number = self.cfg.train, self.step + 1
        return (number % t.sync_every == 0 or self.batch_in_epoch + 1 >= self.steps_per_epoch
                or bool(t.max_steps and number >= t.max_steps)
                or bool(t.ckpt_every_steps and number % t.ckpt_every_steps == 0))

    def sync(self) -> None:
        """Read back, in ONE device→host transfer, the finite flags of the steps since the last sync (summed over
        processes) and the pending log rows; write the rows. At the first non-finite step, write only the rows
        before it and raise :class:`TrainingError` naming the step and its loss terms: nothing after it is saved.
        Every rank calls it at the same steps (a collective)."""
        checks, rows = self.checks, self.rows
        self.checks, self.rows = [], []
        parts = []
        distributed = self.info.distributed
        if checks or distributed:  # under torchrun the stop flag is agreed at every read
            reduced = [torch.stack([c.reduced for c in checks]).flatten()] if checks else []
            if distributed:
                reduced.append(torch.tensor([float(self.stop_signal is not None)], device=self.device))
            parts.append(R.all_reduce_sum(torch.cat(reduced)))
            parts += [c.local.float() for c in checks]
        parts += [r.values for r in rows if r.values is not None]
        values = torch.cat(parts).tolist() if parts else []  # the one host sync
        if distributed:
            self.stop_agreed = self.stop_agreed or values[2 * len(checks)] > 0
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
                self._write_row(r.row)
        if bad is not None:
            self.optimizer.zero_grad(set_to_none=True)
            check, terms = bad
            span = (f" (found by the check of steps {checks[0].step}-{checks[-1].step}, train.sync_every="
                    f"{self.cfg.train.sync_every})" if len(checks) > 1 else "")
            raise TrainingError(
                f"non-finite loss at epoch {check.epoch + 1}, step {check.step}: term(s) {', '.join(terms)}{span}. "
                f"Nothing from step {check.step} on was saved{self._kept()}. Lower the learning rates or try "
                "optim.amp=none"
            )

    def _kept(self) -> str:
        """What a run stopped by a non-finite value keeps, for its message."""
        if (self.out / "last.pt").is_file():
            return f"; the last good checkpoint {self.out / 'last.pt'} is kept"
        return "; no checkpoint had been written yet"

    def check_finite_state(self, epoch: int) -> None:
        """Raise :class:`TrainingError` when a trained parameter, buffer or optimiser state holds a NaN or an
        infinity (a step can produce one from finite losses and gradients, e.g. with a non-finite learning rate):
        such a state is never validated or saved. Every rank reaches the same answer (the state is replicated)."""
        tensors = {**adapter_state(self.model),
                   **{f"optimizer.{k}": v for k, v in _optimizer_tensors(self.optimizer.state_dict())}}
        bad = non_finite_entries(tensors)
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise TrainingError(
                f"non-finite parameters after step {self.step} (epoch {epoch + 1}): {', '.join(bad[:5])}{more}. "
                f"Nothing from that step on was saved{self._kept()}. Lower the learning rates or try optim.amp=none")

    def _stop_due(self) -> bool:
        """Whether a SIGTERM / SIGINT asks this run to stop now (the same answer on every rank)."""
        return self.stop_agreed if self.info.distributed else self.stop_signal is not None

    def _stopped(self) -> "TrainingStopped":
        signum = self.stop_signal or signal.SIGTERM  # under torchrun another rank may have received it
        name = signal.Signals(signum).name
        return TrainingStopped(f"stopped by {name} after step {self.step} (epoch {self._step_epoch()}); "
                               f"{self.out / 'last.pt'} holds it: continue with `ivpt train --resume {self.out}`",
                               signum)

    def _step_epoch(self) -> int:
        """The 1-based epoch of the last optimiser step."""
        return max(1, math.ceil(self.step / self.steps_per_epoch)) if self.step else 1

    def end_epoch(self, epoch: int, *, finished: bool) -> None:
        """Concept-health warning, validation, ``best/`` and ``last.pt``."""
        self.check_finite_state(epoch)  # a diverged state is neither validated nor saved
        warning = collapse_warning(self.epoch_health, self.health.num_prototypes, epoch + 1)
        if warning and self.info.is_main:
            logging.getLogger("ivpt").warning(warning)
        self.revive(epoch)
        val, val_health = None, {}
        if self.data.val is not None:
            val, val_health = self.validate()
        # best/: the best validation top-1 among the epochs whose concepts are alive on the validation split (no
        # stage with fewer than half of its foreground prototypes winning 1 % of the pixels); until one is, the
        # best top-1 of all. Without a validation split: the last epoch.
        dead = weak_stages(val_health, self.health.num_prototypes)
        alive = not dead
        improved = val is None or (alive, val) > (self.best_alive, self.best_val)
        if improved:
            self.best_val = val if val is not None else self.best_val
            self.best_alive = alive
            if self.info.is_main:
                self.model.save_pretrained(self.out / "best", extra={
                    "epoch": epoch + 1, "step": self.step, "val_top1": val, "concepts_alive": alive,
                    "val_health": val_health, "class_names": list(self.data.class_names)})
        self.save_last(epoch + 1 if finished else epoch, 0 if finished else self.batch_in_epoch)
        self.batch_in_epoch = 0 if finished else self.batch_in_epoch
        if self.info.is_main:
            msg = f"epoch {epoch + 1}: step {self.step}"
            if val is not None:
                msg += f", val top-1 {val:.2f}%" + (" (best)" if improved else "")
                msg += f" (concepts dead on validation: {', '.join(dead)})" if dead else ""
            if self.epoch_health:
                stages = range(len(self.health.num_prototypes))
                msg += (", concepts alive " + "/".join(f"{self.epoch_health[f'alive_s{i}']:.2f}" for i in stages)
                        + ", map entropy " + "/".join(f"{self.epoch_health[f'entropy_s{i}']:.2f}" for i in stages))
            print(msg)

    def revive(self, epoch: int) -> None:
        """``optim.revive_until``: revive the concepts that were dead over this epoch's training images
        (:mod:`ivpt.engine.revive`), on every rank alike (the pixel counts are summed over processes)."""
        o = self.cfg.optim
        wins = self.health.last_wins
        if not (o.revive_until and wins and self.step <= o.revive_until * self.total_steps):
            return
        gen = torch.Generator().manual_seed(self.cfg.train.seed * 100_003 + epoch)
        revived = revive_dead_concepts(self.model.stages, wins, self.optimizer,
                                       noise_std=self.cfg.model.prototype_init_std, generator=gen)
        self.health.last_wins = []
        if revived and self.info.is_main:
            logging.getLogger("ivpt").info(
                f"epoch {epoch + 1}: revived dead concepts (stage:prototype<-donor) "
                + ", ".join(f"{i}:{k}<-{d}" for i, k, d in revived))

    def validate(self) -> tuple[float, dict[str, float]]:
        """Top-1 on the validation split and, for models with concept maps, the health of its eval-mode maps
        (``alive_s*``/``entropy_s*``, :mod:`ivpt.engine.health`)."""
        acc = AccuracyConsumer(self.cfg.model.num_classes)
        maps = MapHealth() if self.model.has_concept_maps else None
        run_pass(self.model, self.data.val, self.cfg, self.info, [acc] + ([maps] if maps else []))
        health = maps.health.flush(R.all_reduce_sum) if maps else {}
        return self._top1(None, "validation", acc.meter.compute()), health

    def finish(self) -> dict:
        """Test accuracy of ``best/``, written to ``metrics.json`` by rank 0."""
        from ..data import corrupt_count_all

        R.barrier()  # rank 0 has written best/
        _, meta = read_pretrained_config(self.out / "best")
        load_pretrained(self.model, self.out / "best", meta=meta)
        test = evaluate_accuracy(self.model, self.data.test, self.cfg, self.info,
                                 progress=self.progress and self.info.is_main)
        self._top1(None, "test", test)
        metrics = {
            "test_top1": test["top1"] / 100,
            "test_top5": test["top5"] / 100,
            "test_balanced_top1": test["balanced_top1"] / 100,
            "num_classes": self.data.num_classes,
            "chance": 1.0 / self.data.num_classes,
            "best_val_top1": None if self.best_val == -math.inf else self.best_val / 100,
            "best_epoch": meta.get("epoch"),
            "best_concepts_alive": meta.get("concepts_alive"),
            "steps": self.step,
            "train_images": len(self.train_set),
            "test_images": len(self.data.test),
            "corrupt_images_skipped": corrupt_count_all(),
            "seconds": time.perf_counter() - self.t_start,
        }
        if self.info.is_main:
            atomic_write_text(self.out / "metrics.json", json.dumps(metrics, indent=2))
        return metrics

    def _top1(self, dataset: Any, name: str, scores: dict | None = None) -> float:
        """Top-1 of ``dataset`` (or the given ``scores``); a split of which no image could be read is an error,
        never a NaN in metrics.json."""
        if scores is None:
            scores = evaluate_accuracy(self.model, dataset, self.cfg, self.info, progress=False)
        if "top1" not in scores:
            raise TrainingError(f"no image of the {name} split of {self.cfg.data.root} could be read (all "
                                "corrupt, see the warnings above); replace the unreadable files")
        return scores["top1"]

    # ------------------------------------------------------------------------------------------ logs, state
    def _write_row(self, row: dict) -> None:
        """One log.csv (and TensorBoard) row; the progress bar shows its loss and speed."""
        self.log.write(row, LOG_FIELDS + self.health.columns)
        self.tb.log(row, row["step"])
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row.get('total', math.nan):.3f}", img_s=f"{row['img_per_s']:.1f}")

    def save_last(self, epoch: int, batch_in_epoch: int) -> None:
        """Atomically write ``last.pt``: trained parameters, optimiser, scheduler, scaler, position and every
        process's RNG state (all ranks take part in gathering the RNG states). Pending finite flags are read
        first (:meth:`sync`): a state after a non-finite step is never saved."""
        self.sync()
        self.check_finite_state(self._step_epoch() - 1)
        rng = R.all_gather_object(_rng_state(self.eq_gen), self.info.world_size)
        health = R.all_gather_object(self.health.state_dict(), self.info.world_size)
        if self.info.is_main:
            atomic_torch_save({
                "model": adapter_state(self.model), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": epoch, "batch_in_epoch": batch_in_epoch, "step": self.step, "best_val": self.best_val,
                "best_alive": self.best_alive,
                "total_steps": self.total_steps,
                "rng": rng, "health": health, "config": self.cfg.to_dict(), "backbone": backbone_identity(self.model),
                "data": _data_identity(self.data),
            }, self.out / "last.pt")


def compute_loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: Config, eq_gen: torch.Generator,
                 health: ConceptHealth | None = None) -> tuple[torch.Tensor, dict]:
    """Forward the clean batch (plus its warped copy when equivariance is on) and return the weighted loss;
    ``health`` accumulates the clean batch's concept maps."""
    model = getattr(net, "module", net)  # under DDP, the wrapped model
    b = x.shape[0]
    theta = None
    if model.has_concept_maps and cfg.loss.equivariance > 0:
        theta = random_affine(b, rotation_deg=cfg.loss.eq_rotation_deg, translate=cfg.loss.eq_translate,
                              scale=tuple(cfg.loss.eq_scale), device=x.device, generator=eq_gen)
        x = torch.cat([x, warp(x, theta)])
    # IVPT needs only the concept maps of the warped view, so its backbone pass there skips autograd.
    kwargs = {"maps_only_from": b} if theta is not None and model.maps_only_view else {}
    with R.autocast(x.device, cfg.optim.amp):
        out = net(x, **kwargs)
    warped = None
    if theta is not None:
        out, warped = _split_output(out, b)
    if health is not None:
        health.add(out.maps)
    return ivpt_losses(out, y, cfg.loss, warped_out=warped, theta=theta)


def _split_output(out: Any, n: int) -> tuple[Any, Any]:
    """Split every batch-major tensor of a model output dataclass at ``n``: (first n, rest)."""
    first, rest = {}, {}
    for f in dataclasses.fields(out):
        value = getattr(out, f.name)
        if isinstance(value, list):
            first[f.name], rest[f.name] = [v[:n] for v in value], [v[n:] for v in value]
        elif isinstance(value, torch.Tensor):
            first[f.name], rest[f.name] = value[:n], value[n:]
        else:
            first[f.name] = rest[f.name] = value
    return type(out)(**first), type(out)(**rest)


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

    def snapshot(self, epoch: int, step: int, lrs: dict[str, float], t_start: float,
                 health: dict[str, float] | None = None) -> _Row:
        """The row of the steps since the last one (loss means still on the device), with ``health``; resets."""
        now = time.perf_counter()
        row = {"epoch": epoch + 1, "step": step, "lr_head": lrs.get("classifier", float("nan")),
               "lr_concepts": next((lrs[k] for k in ("prototypes", "prompts", "tokens") if k in lrs), float("nan")),
               "img_per_s": self.images / max(now - self.t, 1e-9), "elapsed_s": now - t_start, **(health or {})}
        names = list(self.sums)
        values = torch.stack([self.sums[k] for k in names]) / max(self.n, 1) if names else None
        self.reset(now)
        return _Row(row, names, values)


def _optimizer_tensors(state_dict: dict):
    """(name, tensor) of every floating-point tensor in an optimiser ``state_dict``'s per-parameter state."""
    for index, entry in state_dict.get("state", {}).items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                yield f"{index}.{key}", value


def _data_identity(data: Any) -> dict:
    """What tells a run's training data from other data, whatever its folder: the training split's size and
    classes, and the images per class (stored in last.pt; a resume elsewhere must find the same)."""
    labels = getattr(data.train, "labels", None)
    counts = (np.bincount(np.asarray(labels, dtype=np.int64), minlength=data.num_classes).tolist()
              if labels is not None else None)
    return {"train_images": len(data.train), "class_names": [str(n) for n in data.class_names],
            "class_counts": counts}


def _describe_data(identity: dict) -> str:
    names, counts = identity.get("class_names") or [], identity.get("class_counts")
    text = f"{identity.get('train_images')} training images in {len(names)} classes"
    if counts is not None:
        shown = ", ".join(f"{n}: {c}" for n, c in list(zip(names, counts))[:4])
        text += f" ({shown}{', ...' if len(names) > 4 else ''})"
    return text


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


class _StopOnSignal:
    """While the training loop runs, SIGTERM and SIGINT set ``trainer.stop_signal`` instead of ending the process:
    the loop stops at the next step boundary with last.pt saved (:meth:`Trainer._stop_due`). A second signal stops at
    once (KeyboardInterrupt). Only in the main thread (elsewhere signals cannot be caught); the previous handlers
    come back on exit, so a signal during the test pass ends the process as usual."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, trainer: "Trainer") -> None:
        self.trainer, self.previous = trainer, {}

    def __enter__(self) -> "_StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def _handle(self, signum: int, frame) -> None:
        t = self.trainer
        if t.stop_signal is not None:
            raise KeyboardInterrupt
        t.stop_signal = signum
        if t.info.is_main:
            try:
                print(f"{signal.Signals(signum).name}: stopping after this optimiser step with last.pt saved; send it "
                      "again to stop at once", file=sys.stderr, flush=True)
            except RuntimeError:  # re-entrant write on stderr: the stop goes on without the note
                pass


def _group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    return {g["name"]: g["lr"] for g in optimizer.param_groups}


def _rng_state(eq_gen: torch.Generator) -> dict:
    """Every generator's state as tensors and plain values, so that last.pt loads with ``weights_only=True``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "python": (int(version), tuple(int(v) for v in internal), gauss_next),
             "equivariance": eq_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, eq_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    if isinstance(n, dict):
        n = (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    np.random.set_state(n)  # a tuple with an ndarray: a last.pt written before states were stored as tensors
    random.setstate(state["python"])
    eq_gen.set_state(state["equivariance"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def _save_config(cfg: Config, out: Path) -> None:
    import yaml

    atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _progress(enabled: bool, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False)
