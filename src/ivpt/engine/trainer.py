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

Around the loop: :mod:`~ivpt.engine.runfolder` (the folder, its config), :mod:`~ivpt.engine.resume` (``last.pt``),
:mod:`~ivpt.engine.records` (log rows, the read-back), :mod:`~ivpt.engine.checks`, :mod:`~ivpt.engine.state`
(generators, signals) and :mod:`~ivpt.engine.step` (:func:`compute_loss`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from .. import runtime as R
from ..checkpoint import (RunLock, atomic_write_text, check_output_folder_all_ranks, load_pretrained,
                          read_pretrained_config, remove_stale_temporaries)
from ..config import Config
from ..eval import evaluate_accuracy
from ..eval.builtin import DecisionConsumer
from ..eval.runner import AccuracyConsumer, run_pass
from ..models import create_model
from .checks import _unseen_classes_warning, check_batch_shape, check_classes, check_finite
from .ema import ParameterEma
from .errors import TrainingError, TrainingStopped
from .health import ConceptHealth, MapHealth, collapse_warning, weak_stages
from .ordering import EpochBatches, SeededDataset, train_loader
from .records import _CsvLog, _rate_lrs, _progress, _Row, _StepCheck, _Tensorboard, _Window, read_back
from .resume import check_same_data, read_resume_state, restore_state, save_last_state
from .revive import revive_dead_concepts
from .runfolder import RESUMABLE_CHANGES, RUN_FILES, _save_config, agree_on_rank0, check_new_run_folder, check_resumable
from .schedule import build_scheduler, run_epochs, schedule_warning, total_steps
from .selection import Selection
from .state import _StopOnSignal, stopped
# compute_loss is called by this module's name for it (tests patch ivpt.engine.trainer.compute_loss)
from .step import _split_output, compute_loss, training_net  # noqa: F401  (_split_output: re-exported)

__all__ = ["TrainingError", "TrainingStopped", "Trainer", "check_resumable", "check_new_run_folder",
           "RESUMABLE_CHANGES", "RUN_FILES"]


class Trainer:
    """One training run in ``out``; see the module docstring for the order of its parts."""

    def __init__(self, cfg: Config, out: str | Path, *, resume: bool = False, progress: bool = True,
                 new_run: bool = False, start: int = 0, lock: RunLock | None = None) -> None:
        self.cfg, self.out, self.progress = cfg, Path(out), progress
        self.start = start  # which of train.starts this run trains (ivpt.engine.starts); a resume reads last.pt's
        self.info = R.setup(cfg.train.device)
        self.device = self.info.device
        # held by rank 0 from here to close(); ``lock``: the caller's, already held on ``out``, handed over
        self.lock = lock if lock is not None else RunLock(self.out)
        self.stop_signal: int | None = None  # SIGTERM / SIGINT received during the training loop
        self.stop_agreed = False  # under torchrun: whether some rank had a stop_signal at the last flag read
        self._determinism_before = (torch.are_deterministic_algorithms_enabled(),
                                    torch.is_deterministic_algorithms_warn_only_enabled())
        if resume:
            check_resumable(self.out)
        check_output_folder_all_ranks(self.out, self.info)
        try:
            agree_on_rank0(self.info, self.out, self.lock.acquire)
            if new_run:
                agree_on_rank0(self.info, self.out, lambda: check_new_run_folder(self.out))
            self._set_up(resume)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the run folder and restore the process's deterministic-algorithms mode (idempotent; :func:`train`
        calls it at the end of the run, however it ends)."""
        self.lock.release()
        enabled, warn_only = self._determinism_before
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)

    def _set_up(self, resume: bool) -> None:
        """Everything else: data, model, optimiser and, with ``resume``, last.pt (read and checked before anything
        is written into the folder)."""
        from ..data import DeviceAugment, build_datasets, reset_corrupt_count

        cfg = self.cfg
        state = read_resume_state(self) if resume else None
        if state is not None:
            self.start = state.get("start", 0)
            if not isinstance(self.start, int) or not 0 <= self.start < cfg.train.starts:
                raise TrainingError(f"cannot resume: {self.out / 'last.pt'} names start {self.start!r}, not one of the "
                                    f"run's train.starts={cfg.train.starts}")
        # the seed of everything this run draws, its training/validation split too: train.seed, or a start's own
        self.seed = cfg.train.start_seed(self.start)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)  # an op without a deterministic implementation raises

        self.data = build_datasets(cfg if self.seed == cfg.train.seed else
                                   cfg.with_overrides([f"train.seed={self.seed}"]))
        check_classes(cfg, self.data)
        self.train_set = SeededDataset(self.data.train, self.seed)
        if state is not None:
            check_same_data(self, state)
        warning = _unseen_classes_warning(self.data, cfg.data.root)
        if warning and self.info.is_main:
            logging.getLogger("ivpt").warning(warning)
        # data.gpu_augment: items hold uint8 pixels and drawn parameters; the batch is finished on the device.
        self.augment = DeviceAugment(cfg.data, cfg.model.img_size) if cfg.data.gpu_augment else None
        o = cfg.optim
        check_batch_shape(cfg, len(self.train_set), self.info.world_size)
        self.micro_global = o.batch_size // o.grad_accum
        self.steps_per_epoch = len(self.train_set) // o.batch_size

        self.model = create_model(cfg.model, seed=self.seed).to(self.device)
        if state is None and self.model.has_concept_maps and cfg.model.prototype_init != "normal":
            self._init_prototypes(cfg.model.prototype_init)
        groups = self.model.param_groups(o.base_lr, o.head_lr_mult, o.concept_lr_mult)
        self.trainable = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.Adam(groups, betas=tuple(o.betas), weight_decay=o.weight_decay)
        # optim.ema_decay: validation, best/ and the test pass read the parameters' moving average (ivpt.engine.ema)
        trained = {name: p for name, p in self.model.named_parameters() if p.requires_grad}
        self.ema = ParameterEma(trained, o.ema_decay) if o.ema_decay > 0 else None
        self.epochs = run_epochs(o, self.steps_per_epoch)  # optim.epochs, or more to reach optim.min_steps
        self.total_steps = total_steps(o, self.steps_per_epoch, cfg.train.max_steps)
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, self.steps_per_epoch, o)
        self.step_lrs = _rate_lrs(self.optimizer)  # the rates of the last optimiser step, for the log
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=o.amp == "fp16")
        # Every training random number comes from the seed (and the rank): the global generator drives the
        # Gumbel noise, eq_gen (identical on every rank) the one equivariance transform per step.
        torch.manual_seed(self.seed + self.info.rank)
        random.seed(self.seed + self.info.rank)
        np.random.seed(self.seed + self.info.rank)
        self.eq_gen = torch.Generator().manual_seed(self.seed)

        self.epoch, self.batch_in_epoch, self.step = 0, 0, 0
        self.selection = Selection(cfg.train.selection)  # which epoch best/ holds (ivpt.engine.selection)
        self.health = ConceptHealth()  # this epoch's concept health so far (restored with the rest on resume)
        self.val_scores: dict[str, float] = {}  # the last epoch's validation scores (validate())
        self.val_step = -1  # the optimiser step val_scores were measured after
        self.window = _Window(self.device)  # loss sums since the last log row (restored on resume)
        if state is not None:
            restore_state(self, state)
        if self.info.is_main:
            if state is None:  # a fresh run in a folder a killed one started (compare, demo): its log goes
                (self.out / "log.csv").unlink(missing_ok=True)
            _save_config(cfg, self.out)

        # what the forward passes run through (DDP, train.compile), the same uncompiled, whether compilation is to come
        self.net, self.eager_net, self.compile_pending = training_net(self.model, cfg, self.info)
        if state is not None and self.info.is_main:
            remove_stale_temporaries(self.out)  # left by a kill inside an atomic write
            remove_stale_temporaries(self.out / "best")
        self.log = _CsvLog(self.out / "log.csv", self.info.is_main, last_step=None if state is None else self.step)
        self.tb = _Tensorboard(self.out, self.info.is_main and cfg.train.tensorboard)
        self.checks: list[_StepCheck] = []  # steps whose finite flags are still on the device
        self.rows: list[_Row] = []  # log rows whose values are still on the device
        self.closing_row: _Row | None = None  # the epoch's last row, until validation has scored the epoch
        self.bar = None  # the epoch's progress bar
        self.batches = EpochBatches(len(self.train_set), self.micro_global, rank=self.info.rank,
                                    world_size=self.info.world_size, seed=self.seed,
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
        # only concepts need the steps at a high rate; a kind without concept maps gets no such warning
        warning = schedule_warning(self.total_steps, self.steps_per_epoch, o) if self.model.has_concept_maps else None
        if warning and self.info.is_main:
            log.warning(warning)

    # ------------------------------------------------------------------------------------------------- set-up
    def _init_prototypes(self, how: str, images: int = 64) -> None:
        """``model.prototype_init`` ``feature_mean`` or ``kmeans``: start the prototypes from the features of ``images``
        training images spread evenly over the split, as epoch 0 augments them: the same images, hence the same
        start, on every rank."""
        from ..data import collate_skip_corrupt

        n = len(self.train_set)
        picks = torch.linspace(0, n - 1, min(n, images)).round().long().unique().tolist()
        batch = collate_skip_corrupt([self.train_set[(0, i)] for i in picks])
        if batch is None:  # every picked image unreadable: keep the normal initialisation
            return
        x, size = self._images(batch), self.cfg.eval.batch_size
        if how == "feature_mean":
            self.model.centre_prototypes(x, batch_size=size)
        else:
            spread = self.cfg.model.prototype_init_spread
            self.model.cluster_prototypes(x, seed=self.seed, batch_size=size, spread=spread)

    def _images(self, batch: dict) -> torch.Tensor:
        """A collated batch's images on the device, finished by :attr:`augment` when ``data.gpu_augment``."""
        x = batch["image"].to(self.device, non_blocking=True)
        return x if self.augment is None else self.augment(x, batch["augment"])

    # ----------------------------------------------------------------------------------------------- the run
    def fit(self) -> dict:
        """Every remaining epoch, then the test pass; returns ``metrics.json``'s content. A run resumed after it
        reached ``train.max_steps`` (e.g. killed during its test pass) goes straight to the test pass."""
        self.train_until(self.epochs)
        return self.finish()

    def train_until(self, epochs: int) -> None:
        """The remaining epochs of the first ``epochs`` (fewer when ``train.max_steps`` ends the run first); each
        ends with validation, ``best/`` and ``last.pt`` (:meth:`end_epoch`). A run resumed after its last step but
        before that epoch's end (killed after ``train.ckpt_every_steps`` saved it) ends that epoch first, so
        ``best/`` considers it as in the uninterrupted run."""
        max_steps = self.cfg.train.max_steps
        reached = bool(max_steps and self.step >= max_steps)
        try:
            with _StopOnSignal(self):
                if reached and self.val_step != self.step:
                    self.close_epoch(self.epoch)
                    self.end_epoch(self.epoch, finished=self.batch_in_epoch >= self.steps_per_epoch)
                for epoch in range(self.epochs if reached else self.epoch, min(epochs, self.epochs)):
                    done = self.train_epoch(epoch)
                    self.end_epoch(epoch, finished=not done or self.batch_in_epoch >= self.steps_per_epoch)
                    if self._stop_due():
                        raise stopped(self)  # end_epoch saved last.pt
                    if done:
                        break
        finally:
            self.loader = None  # its persistent workers exit (before the test pass starts its own)
            self.log.close()
            self.tb.close()

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
                raise stopped(self) from None
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
                raise stopped(self)
            if done:
                break
        bar.close()
        self.bar = None
        self.close_epoch(epoch)
        return done

    def close_epoch(self, epoch: int) -> None:
        """The epoch's concept health (summed over processes) and its last log row, which :meth:`end_epoch`
        completes with the validation scores and writes; pending finite flags are read."""
        self.epoch_health = self.health.flush(R.all_reduce_sum)  # every rank: the counts are summed
        self.closing_row = (self.window.snapshot(epoch, self.step, self.step_lrs, self.t_start, self.epoch_health)
                            if self.window.n or self.epoch_health else None)
        self.sync()

    def optimizer_step(self, epoch: int, micro_batches: list[dict | None]) -> None:
        """Forward/backward every micro-batch, clip and step, without reading anything back from the device.

        The step's finite flags (each loss term of every micro-batch and, outside fp16 where the scaler skips
        such steps, the gradient norm) join :attr:`checks`; :meth:`sync` reads them before this step is applied
        when the step is due (every ``train.sync_every`` steps, the last step of an epoch or of the run, and a
        ``train.ckpt_every_steps`` step), so that a non-finite step is never saved."""
        o = self.cfg.optim
        self.model.follow_progress(self._step_progress())
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
        self.step_lrs = _rate_lrs(self.optimizer)
        with warnings.catch_warnings():
            # fp16: the GradScaler skips the optimiser step whose gradients overflowed (the first ones, while it
            # finds its scale); the schedule still counts that step, and torch's order check would warn about it
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            self.scheduler.step()  # the rates of the next step: lr_factor(self.step + 1)
        if self.ema is not None:
            self.ema.update()
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
                                        health=self.health if weight else None,
                                        progress=self._step_progress())
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

    def _step_progress(self) -> float:
        """The share of the run done after the step being taken, (step + 1) / total steps: what the loss weights'
        warm-up and the model's :meth:`~ivpt.models.base.FrozenViT.follow_progress` read, the same for both."""
        return (self.step + 1) / self.total_steps

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
        read_back(self)

    def check_finite_state(self, epoch: int) -> None:
        """Raise :class:`TrainingError` when a trained parameter, buffer or optimiser state holds a NaN or an
        infinity (a step can produce one from finite losses and gradients, e.g. with a non-finite learning rate):
        such a state is never validated or saved. Every rank reaches the same answer (the state is replicated)."""
        check_finite(self.model, self.optimizer, self.out, self.step, epoch)

    def _stop_due(self) -> bool:
        """Whether a SIGTERM / SIGINT asks this run to stop now (the same answer on every rank)."""
        return self.stop_agreed if self.info.distributed else self.stop_signal is not None

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
        with self._evaluated_weights():
            val, val_health, self.val_scores = None, {}, {}
            if self.data.val is not None:
                self.val_scores, val_health = self.validate()
                val = self.val_scores["val_top1"]
            self.val_step = self.step
            # best/: chosen by train.selection among the epochs whose concepts are alive on the validation split (no
            # stage with fewer than half of its foreground prototypes winning 1 % of the pixels); until one is, among
            # all. Without a validation split: the last epoch.
            dead = weak_stages(val_health, self.health.num_prototypes)
            alive = not dead
            improved = self.selection.consider(val, alive, 0 if self.data.val is None else len(self.data.val))
            if improved and self.info.is_main:
                self.model.save_pretrained(self.out / "best", data=self.cfg.data, extra={
                    "epoch": epoch + 1, "step": self.step, "val_top1": val, "concepts_alive": alive,
                    "val_health": val_health, "class_names": list(self.data.class_names)})
        if self.closing_row is not None:
            self.closing_row.row.update(self.val_scores)
            self.rows.append(self.closing_row)
            self.closing_row = None
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

    def _evaluated_weights(self) -> contextlib.AbstractContextManager:
        """What validation and ``best/`` read: the parameters' moving average with ``optim.ema_decay``, else the
        parameters themselves."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    def revive(self, epoch: int) -> None:
        """``optim.revive_until``: revive the concepts that were dead over this epoch's training images
        (:mod:`ivpt.engine.revive`), on every rank alike (the pixel counts are summed over processes)."""
        o = self.cfg.optim
        wins = self.health.last_wins
        if not (o.revive_until and wins and self.step <= o.revive_until * self.total_steps):
            return
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        revived = revive_dead_concepts(self.model.stages, wins, self.optimizer,
                                       noise_std=self.cfg.model.prototype_init_std, generator=gen)
        self.health.last_wins = []
        if revived and self.info.is_main:
            logging.getLogger("ivpt").info(
                f"epoch {epoch + 1}: revived dead concepts (stage:prototype<-donor) "
                + ", ".join(f"{i}:{k}<-{d}" for i, k, d in revived))

    def validate(self) -> tuple[dict[str, float], dict[str, float]]:
        """The validation split's scores for the log — ``val_top1`` and, for models with a part-pooled head,
        ``val_parts_only_top1`` and ``val_part_share`` (:mod:`ivpt.metrics.decision`) — and, for models with concept
        maps, the health of its eval-mode maps (``alive_s*``/``entropy_s*``, :mod:`ivpt.engine.health`)."""
        acc = AccuracyConsumer(self.cfg.model.num_classes)
        decision = DecisionConsumer(*self.model.logit_weights()) if self.model.has_part_head else None
        maps = MapHealth() if self.model.has_concept_maps else None
        run_pass(self.model, self.data.val, self.cfg, self.info, [c for c in (acc, decision, maps) if c])
        health = maps.health.flush(R.all_reduce_sum) if maps else {}
        scores = {"val_top1": self._top1("validation", acc.meter.compute())}
        if decision is not None:
            parts = decision.meter.compute()
            scores.update({f"val_{k}": parts[k] for k in ("parts_only_top1", "part_share") if k in parts})
        return scores, health

    def finish(self) -> dict:
        """Test accuracy of ``best/``, written to ``metrics.json`` by rank 0."""
        from ..data import corrupt_count_all

        R.barrier()  # rank 0 has written best/
        _, meta = read_pretrained_config(self.out / "best")
        load_pretrained(self.model, self.out / "best", meta=meta)
        test = evaluate_accuracy(self.model, self.data.test, self.cfg, self.info,
                                 progress=self.progress and self.info.is_main)
        self._top1("test", test)
        metrics = {
            "test_top1": test["top1"] / 100,
            "test_top5": test["top5"] / 100,
            "test_balanced_top1": test["balanced_top1"] / 100,
            "num_classes": self.data.num_classes,
            "chance": 1.0 / self.data.num_classes,
            "best_val_top1": None if meta.get("val_top1") is None else meta["val_top1"] / 100,
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

    def _top1(self, name: str, scores: dict) -> float:
        """Top-1 of a split's accuracy ``scores``; a split of which no image could be read is an error, never a NaN
        in metrics.json."""
        if "top1" not in scores:
            raise TrainingError(f"no image of the {name} split of {self.cfg.data.root} could be read (all "
                                "corrupt, see the warnings above); replace the unreadable files")
        return scores["top1"]

    # ---------------------------------------------------------------------------------------------- last.pt
    def save_last(self, epoch: int, batch_in_epoch: int) -> None:
        """Atomically write ``last.pt``: trained parameters, optimiser, scheduler, scaler, position and every
        process's RNG state (all ranks take part in gathering the RNG states). Pending finite flags are read
        first (:meth:`sync`): a state after a non-finite step is never saved."""
        self.sync()
        self.check_finite_state(self._step_epoch() - 1)
        save_last_state(self, epoch, batch_in_epoch)
