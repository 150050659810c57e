"""``last.pt``: written by :meth:`Trainer.save_last` (:func:`save_last_state`), read and checked before a resumed run
touches its folder (:func:`read_resume_state`, :func:`check_same_data`), and restored into the set-up trainer
(:func:`restore_state`). Each function takes the :class:`~ivpt.engine.trainer.Trainer`."""
from __future__ import annotations

import logging

from .. import runtime as R
from ..checkpoint import (
    CheckpointError,
    adapter_state,
    atomic_torch_save,
    backbone_identity,
    check_backbone,
    load_adapter_state,
    load_training_state,
    non_finite_entries,
)
from ..config import Config, config_changes, saved_config
from .errors import TrainingError
from .records import _rate_lrs
from .runfolder import RESUMABLE_CHANGES, check_resumable
from .schedule import depends_on_total, last_step_rates
from .state import _data_identity, _describe_data, _optimizer_tensors, _rng_state, _set_rng_state

__all__ = ["read_resume_state", "check_same_data", "restore_state", "save_last_state"]


def read_resume_state(trainer) -> dict:
    """last.pt, checked against the config before the run folder is touched."""
    path = check_resumable(trainer.out)
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
    changed = [k for k in config_changes(trained, trainer.cfg) if k not in RESUMABLE_CHANGES]
    if changed:
        raise TrainingError(
            f"cannot resume {trainer.out}: the config differs from the checkpoint's in {', '.join(changed)}, "
            "which would not continue the same run exactly; start a new run with --out (only "
            "optim.epochs, optim.min_steps, train.max_steps, logging, checkpoint, device, worker and eval "
            "settings may change)"
        )
    state["trained_root"] = trained.data.root
    return state


def check_same_data(trainer, state: dict) -> None:
    """A resume with another ``data.root`` (a moved dataset) is named, and refused when the dataset there is not
    the one the run trained on (its training split's size, classes and class counts, stored in last.pt)."""
    old, new = state.get("trained_root"), trainer.cfg.data.root
    if old == new:
        return
    saved, mine = state.get("data"), _data_identity(trainer.data)
    if saved is not None and saved != mine:
        raise TrainingError(
            f"cannot resume {trainer.out}: the dataset at {new} is not the one the run was trained on: "
            f"{_describe_data(mine)} there, but the run was trained on {old} with {_describe_data(saved)}; "
            f"resume with data.root={old} (or the same dataset moved), or start a new run with --out")
    if trainer.info.is_main:
        check = "" if saved is not None else " (this last.pt predates the check that it is the same dataset)"
        logging.getLogger("ivpt").warning(f"resuming with data.root={new} (the run was trained on {old}){check}")


def restore_state(trainer, state: dict) -> None:
    """Load a checked ``last.pt`` (:func:`read_resume_state`) into the set-up trainer: parameters, optimiser,
    scheduler, scaler, position, best/ so far, this rank's generators, the epoch's concept-health counts and, with
    ``optim.ema_decay``, the parameters' moving averages."""
    path = trainer.out / "last.pt"
    try:
        check_backbone(trainer.model, state.get("backbone"), path)
        bad = non_finite_entries({f"optimizer.{k}": v for k, v in _optimizer_tensors(state["optimizer"])})
        if bad:
            raise CheckpointError(f"{path} holds non-finite values in {', '.join(bad[:5])}; it was saved after "
                                  "training diverged")
        load_adapter_state(trainer.model, state["model"], path)
    except CheckpointError as exc:
        raise TrainingError(f"cannot resume: {exc}") from exc
    if "lr_lambdas" not in state["scheduler"]:
        raise TrainingError(f"cannot resume: {path} holds the per-epoch scheduler of an earlier ivpt; finish it "
                            "with that version or start a new run with --out")
    follows = depends_on_total(trainer.cfg)
    if follows and state.get("total_steps") != trainer.total_steps:
        raise TrainingError(
            f"cannot resume {trainer.out}: {' with '.join(follows)} follows the run's total steps, which would "
            f"change from {state.get('total_steps')} to {trainer.total_steps}; keep optim.epochs, optim.min_steps "
            "and train.max_steps, or start a new run with --out")
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.scaler.load_state_dict(state["scaler"])
    trainer.epoch, trainer.batch_in_epoch, trainer.step = state["epoch"], state["batch_in_epoch"], state["step"]
    trainer.selection.best_val = state["best_val"]
    # A last.pt from before the selection rule chose best/ by top-1 alone: its best/ counts as alive.
    trainer.selection.best_alive = state.get("best_alive", True)
    trainer.val_scores = dict(state.get("val_scores", {}))  # the scores of the last validated epoch
    # the step those scores were measured after; a last.pt from before the key was saved at the end of a validated
    # epoch (or after the test pass began), as every last.pt was then but a periodic mid-epoch checkpoint
    trainer.val_step = state.get("val_step", state["step"])
    rng = state["rng"]
    _set_rng_state(rng[trainer.info.rank] if trainer.info.rank < len(rng) else rng[0], trainer.eq_gen)
    if trainer.ema is not None:
        if "ema" not in state:
            raise TrainingError(f"cannot resume: {path} holds no parameter averages for optim.ema_decay")
        try:
            trainer.ema.load_state_dict(state["ema"])
        except ValueError as exc:
            raise TrainingError(f"cannot resume: {path}: {exc}") from None
    if trainer.step > 0:  # the rates of the step before last.pt, for a log row written before the next step
        trainer.step_lrs = _rate_lrs(trainer.optimizer, last_step_rates(trainer.scheduler))
    window = state.get("window")  # the log row's loss sums so far; absent in a last.pt from before they were saved
    if window and trainer.info.rank < len(window):
        trainer.window.load_state_dict(window[trainer.info.rank])
    health = state.get("health")  # absent in a last.pt from before the counts were saved
    if health and trainer.info.rank < len(health):
        trainer.health.load_state_dict(health[trainer.info.rank], trainer.device)
    if trainer.info.is_main:
        print(f"resumed from {path} at epoch {trainer.epoch}, step {trainer.step}")


def save_last_state(trainer, epoch: int, batch_in_epoch: int) -> None:
    """The write of :meth:`Trainer.save_last` (which reads the pending finite flags and checks the state first):
    trained parameters, optimiser, scheduler, scaler, position and every process's RNG state, atomically (all ranks
    take part in gathering the RNG states)."""
    rng = R.all_gather_object(_rng_state(trainer.eq_gen), trainer.info.world_size)
    health = R.all_gather_object(trainer.health.state_dict(), trainer.info.world_size)
    window = R.all_gather_object(trainer.window.state_dict(), trainer.info.world_size)
    if trainer.info.is_main:
        atomic_torch_save({
            "model": adapter_state(trainer.model), "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(), "scaler": trainer.scaler.state_dict(),
            "epoch": epoch, "batch_in_epoch": batch_in_epoch, "step": trainer.step,
            "best_val": trainer.selection.best_val, "best_alive": trainer.selection.best_alive,
            "total_steps": trainer.total_steps, "start": trainer.start, "val_scores": dict(trainer.val_scores),
            "val_step": trainer.val_step,
            "rng": rng, "health": health, "window": window, "config": trainer.cfg.to_dict(),
            **({} if trainer.ema is None else {"ema": trainer.ema.state_dict()}),
            "backbone": backbone_identity(trainer.model),
            "data": _data_identity(trainer.data),
        }, trainer.out / "last.pt")
