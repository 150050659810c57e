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
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .. import runtime as R
from ..checkpoint import (
    CheckpointError,
    adapter_state,
    atomic_torch_save,
    atomic_write_text,
    backbone_identity,
    check_backbone,
    check_output_folder_all_ranks,
    remove_stale_temporaries,
    load_adapter_state,
    load_pretrained,
    read_pretrained_config,
)
from ..config import LOSS_TERMS, Config, EvalConfig, load_config
from ..losses import ivpt_losses, random_affine, warp
from ..eval import evaluate_accuracy
from ..models import create_model
from .health import ConceptHealth, collapse_warning
from .ordering import GlobalBatchSampler, SeededDataset
from .schedule import build_scheduler, depends_on_total, run_epochs, schedule_warning, total_steps

__all__ = ["TrainingError", "Trainer", "train", "load_run_config", "config_changes", "changes_from_run",
           "RESUMABLE_CHANGES"]

# The columns of every run's log.csv; runs with concept maps add alive_s<i>, entropy_s<i> per map stage
# (ivpt.engine.health), filled in the last row of each epoch.
LOG_FIELDS = ["epoch", "step", "lr_head", "lr_concepts", "total", *LOSS_TERMS, "img_per_s", "elapsed_s"]

# Config keys that may differ between a run and its resume without changing what the resumed run computes
# (optim.epochs, optim.min_steps and train.max_steps only while the schedule ignores the total steps: Trainer._restore checks).
RESUMABLE_CHANGES = frozenset({
    "optim.epochs", "optim.min_steps", "train.max_steps", "train.log_every", "train.ckpt_every_steps", "train.tensorboard",
    "train.device", "data.num_workers", "data.root",
    *(f"eval.{f.name}" for f in dataclasses.fields(EvalConfig)),
})


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


def train(cfg: Config, out: str | Path, *, resume: bool = False, progress: bool = True) -> dict:
    """Train ``cfg`` into folder ``out``; with ``resume`` continue from ``out/last.pt``.

    Writes ``config.yaml``, ``log.csv``, ``last.pt`` (full training state), ``best/`` (pretrained folder chosen
    on the validation split, or the last epoch without one) and ``metrics.json`` (test accuracy of ``best``).
    Returns the content of ``metrics.json``.
    """
    try:
        return Trainer(cfg, out, resume=resume, progress=progress).fit()
    finally:
        R.teardown()  # leaves the torchrun process group, also when set-up failed


def load_run_config(out: str | Path) -> Config:
    """The config a run folder was trained with (its ``config.yaml``)."""
    path = Path(out) / "config.yaml"
    if not path.is_file():
        raise TrainingError(f"cannot resume: {path} not found (is {out} a run folder written by `ivpt train`?)")
    return load_config(path)


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

    def __init__(self, cfg: Config, out: str | Path, *, resume: bool = False, progress: bool = True) -> None:
        from ..data import build_datasets, reset_corrupt_count

        self.cfg, self.out, self.progress = cfg, Path(out), progress
        self.info = R.setup(cfg.train.device)
        self.device = self.info.device
        state = self._read_resume_state() if resume else None  # read and checked before anything is written
        check_output_folder_all_ranks(self.out, self.info)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)

        self.data = build_datasets(cfg)
        if self.data.num_classes != cfg.model.num_classes:
            raise TrainingError(
                f"the dataset at {cfg.data.root} has {self.data.num_classes} classes but model.num_classes="
                f"{cfg.model.num_classes}; set model.num_classes={self.data.num_classes}"
            )
        self.train_set = SeededDataset(self.data.train, cfg.train.seed)
        o = cfg.optim
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
        if state is not None:
            self._restore(state)
        if self.info.is_main:
            _save_config(cfg, self.out)

        # Every IVPT parameter receives a gradient when all loss terms are on; baselines leave some unused.
        unused = not self.model.maps_only_view or any(w == 0 for w in cfg.loss.weights().values())
        self.net: nn.Module = self.model
        if self.info.distributed:
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=unused,
            )
        if state is not None and self.info.is_main:
            remove_stale_temporaries(self.out)  # left by a kill inside an atomic write
            remove_stale_temporaries(self.out / "best")
        self.log = _CsvLog(self.out / "log.csv", self.info.is_main, last_step=None if state is None else self.step)
        self.tb = _Tensorboard(self.out, self.info.is_main and cfg.train.tensorboard)
        self.window = _Window(self.device)
        self.health = ConceptHealth()
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
    def _read_resume_state(self) -> dict:
        """last.pt, checked against the config before the run folder is touched."""
        path = self.out / "last.pt"
        if not path.is_file():
            raise TrainingError(f"cannot resume: {path} not found; nothing to resume")
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # truncated or foreign files fail in many ways
            raise TrainingError(f"cannot resume: {path} is unreadable ({type(exc).__name__}: {exc}); "
                                "it was not written by a finished checkpoint save") from exc
        if not isinstance(state, dict) or "model" not in state or "config" not in state:
            raise TrainingError(f"cannot resume: {path} is not a training checkpoint written by `ivpt train`")
        changed = [k for k in config_changes(Config.from_dict(state["config"]), self.cfg)
                   if k not in RESUMABLE_CHANGES]
        if changed:
            raise TrainingError(
                f"cannot resume {self.out}: the config differs from the checkpoint's in {', '.join(changed)}, "
                "which would not continue the same run exactly; start a new run with --out (only "
                "optim.epochs, optim.min_steps, train.max_steps, logging, checkpoint, device, worker and eval "
                "settings may change)"
            )
        return state

    def _restore(self, state: dict) -> None:
        path = self.out / "last.pt"
        try:
            check_backbone(self.model, state.get("backbone"), path)
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
        rng = state["rng"]
        _set_rng_state(rng[self.info.rank] if self.info.rank < len(rng) else rng[0], self.eq_gen)
        if self.info.is_main:
            print(f"resumed from {path} at epoch {self.epoch}, step {self.step}")

    # ----------------------------------------------------------------------------------------------- the run
    def fit(self) -> dict:
        """Every remaining epoch, then the test pass; returns ``metrics.json``'s content. A run resumed after it
        reached ``train.max_steps`` (e.g. killed during its test pass) goes straight to the test pass."""
        max_steps = self.cfg.train.max_steps
        first = self.epochs if max_steps and self.step >= max_steps else self.epoch
        for epoch in range(first, self.epochs):
            done = self.train_epoch(epoch)
            self.end_epoch(epoch, finished=not done or self.batch_in_epoch >= self.steps_per_epoch)
            if done:
                break
        self.log.close()
        self.tb.close()
        return self.finish()

    def train_epoch(self, epoch: int) -> bool:
        """Optimiser steps of ``epoch`` from ``self.batch_in_epoch`` on; True when ``train.max_steps`` is reached."""
        o = self.cfg.optim
        self.train_set.set_epoch(epoch)
        first = self.batch_in_epoch
        sampler = GlobalBatchSampler(
            len(self.train_set), self.micro_global, rank=self.info.rank, world_size=self.info.world_size,
            seed=self.cfg.train.seed, epoch=epoch, start=first * o.grad_accum,
            num_batches=self.steps_per_epoch * o.grad_accum,
        )
        from ..data import collate_skip_corrupt, loader_generator

        loader = DataLoader(self.train_set, batch_sampler=sampler, num_workers=self.cfg.data.num_workers,
                            collate_fn=collate_skip_corrupt, pin_memory=self.device.type == "cuda",
                            generator=loader_generator(), persistent_workers=False)
        self.model.train()
        bar = _progress(self.progress and self.info.is_main, self.steps_per_epoch - first,
                        f"epoch {epoch + 1}/{self.epochs}")
        done = False
        micro: list[dict | None] = []
        for batch in loader:
            micro.append(batch)
            if len(micro) < o.grad_accum:
                continue
            self.optimizer_step(epoch, micro)
            micro = []
            bar.update(1)
            done = bool(self.cfg.train.max_steps and self.step >= self.cfg.train.max_steps)
            closing = done or self.batch_in_epoch >= self.steps_per_epoch  # written below, with the health
            if self.step % self.cfg.train.log_every == 0 and not closing:
                row = self.emit(epoch)
                bar.set_postfix(loss=f"{row['total']:.3f}", img_s=f"{row['img_per_s']:.1f}")
            if self.cfg.train.ckpt_every_steps and self.step % self.cfg.train.ckpt_every_steps == 0:
                self.save_last(epoch, self.batch_in_epoch)
            if done:
                break
        bar.close()
        self.epoch_health = self.health.flush(R.all_reduce_sum)  # every rank: the counts are summed
        if self.window.n or self.epoch_health:
            self.emit(epoch, self.epoch_health)
        return done

    def optimizer_step(self, epoch: int, micro_batches: list[dict | None]) -> None:
        """Forward/backward every micro-batch, then ONE finite check (one host sync), clip and step.

        A non-finite loss in ANY micro-batch (or, outside fp16 where the scaler skips such steps, a non-finite
        gradient) stops the run before the optimiser or a checkpoint sees the corrupted gradients."""
        o = self.cfg.optim
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        terms_seen = []
        for i, batch in enumerate(micro_batches):
            if batch is None:  # every image of the micro-batch was unreadable
                continue
            x = batch["image"].to(self.device, non_blocking=True)
            y = batch["label"].to(self.device, non_blocking=True)
            last = i == len(micro_batches) - 1
            sync = self.net.no_sync() if self.info.distributed and not last else contextlib.nullcontext()
            with sync:
                total, terms = compute_loss(self.net, x, y, self.cfg, self.eq_gen, health=self.health)
                self.scaler.scale(total / o.grad_accum).backward()
            finite &= torch.isfinite(total.detach())
            terms_seen.append(terms)
            self.window.add(terms, total, x.shape[0] * self.info.world_size)
        self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the fp16-scaled ones
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, o.grad_clip if o.grad_clip > 0 else math.inf)
        if o.amp != "fp16":
            finite &= torch.isfinite(norm)
        if R.any_true(~finite):
            self.optimizer.zero_grad(set_to_none=True)
            bad = next((t for t in terms_seen if not all(torch.isfinite(v) for v in t.values())), None)
            names = [k for k, v in (bad or {}).items() if not torch.isfinite(v)] or ["gradients"]
            raise TrainingError(
                f"non-finite loss at epoch {epoch + 1}, step {self.step + 1}: term(s) {', '.join(names)}. "
                f"Nothing was stepped or saved; the last good checkpoint {self.out / 'last.pt'} is kept. Lower the "
                "learning rates or try optim.amp=none"
            )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_lrs = _group_lrs(self.optimizer)
        self.scheduler.step()  # the rates of the next step: lr_factor(self.step + 1)
        self.step += 1
        self.batch_in_epoch += 1

    def end_epoch(self, epoch: int, *, finished: bool) -> None:
        """Concept-health warning, validation, ``best/`` and ``last.pt``."""
        warning = collapse_warning(self.epoch_health, self.health.num_prototypes, epoch + 1)
        if warning and self.info.is_main:
            logging.getLogger("ivpt").warning(warning)
        val = None
        if self.data.val is not None:
            val = self._top1(self.data.val, "validation")
        improved = val is None or val > self.best_val
        if improved:
            self.best_val = val if val is not None else self.best_val
            if self.info.is_main:
                self.model.save_pretrained(self.out / "best", extra={
                    "epoch": epoch + 1, "step": self.step, "val_top1": val,
                    "class_names": list(self.data.class_names)})
        self.save_last(epoch + 1 if finished else epoch, 0 if finished else self.batch_in_epoch)
        self.batch_in_epoch = 0 if finished else self.batch_in_epoch
        if self.info.is_main:
            msg = f"epoch {epoch + 1}: step {self.step}"
            if val is not None:
                msg += f", val top-1 {val:.2f}%" + (" (best)" if improved else "")
            if self.epoch_health:
                stages = range(len(self.health.num_prototypes))
                msg += (", concepts alive " + "/".join(f"{self.epoch_health[f'alive_s{i}']:.2f}" for i in stages)
                        + ", map entropy " + "/".join(f"{self.epoch_health[f'entropy_s{i}']:.2f}" for i in stages))
            print(msg)

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
    def emit(self, epoch: int, health: dict[str, float] | None = None) -> dict:
        """Write one log row: the loss terms since the last row, the last step's rates and ``health``."""
        row = {**self.window.flush(epoch, self.step, self.step_lrs, self.t_start), **(health or {})}
        self.log.write(row, LOG_FIELDS + self.health.columns)
        self.tb.log(row, self.step)
        return row

    def save_last(self, epoch: int, batch_in_epoch: int) -> None:
        """Atomically write ``last.pt``: trained parameters, optimiser, scheduler, scaler, position and every
        process's RNG state (all ranks take part in gathering the RNG states)."""
        rng = R.all_gather_object(_rng_state(self.eq_gen), self.info.world_size)
        if self.info.is_main:
            atomic_torch_save({
                "model": adapter_state(self.model), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": epoch, "batch_in_epoch": batch_in_epoch, "step": self.step, "best_val": self.best_val,
                "total_steps": self.total_steps,
                "rng": rng, "config": self.cfg.to_dict(), "backbone": backbone_identity(self.model),
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


class _Window:
    """Loss terms summed on the device since the last log row; read back (one sync) only when a row is written."""

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

    def flush(self, epoch: int, step: int, lrs: dict[str, float], t_start: float) -> dict:
        now = time.perf_counter()
        row = {"epoch": epoch + 1, "step": step, "lr_head": lrs.get("classifier", float("nan")),
               "lr_concepts": next((lrs[k] for k in ("prototypes", "prompts", "tokens") if k in lrs), float("nan")),
               "img_per_s": self.images / max(now - self.t, 1e-9), "elapsed_s": now - t_start}
        names = list(self.sums)
        values = torch.stack([self.sums[k] for k in names]).tolist() if names else []  # one host sync
        row.update({k: v / max(self.n, 1) for k, v in zip(names, values)})
        self.reset(now)
        return row


def _group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    return {g["name"]: g["lr"] for g in optimizer.param_groups}


def _rng_state(eq_gen: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
             "equivariance": eq_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, eq_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
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
