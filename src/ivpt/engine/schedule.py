"""Learning-rate schedules defined on training progress: a pure function of the optimiser step.

Every parameter group's rate at optimiser step ``s`` (0-based: the ``s``-th step of the run) is its peak rate
(``base_lr x`` the group's multiplier) times :func:`lr_factor`. With ``T`` total steps (:func:`total_steps`),
``E`` steps per epoch and ``W = round(optim.warmup x T)`` warm-up steps::

    lr_factor(s) = warm(s) x decay(s)
    warm(s)      = min(1, (s + 1) / W)                     (1 when W = 0)
    decay(s)     = gamma ** floor(floor(s / E) / step_epochs)   schedule = step
                 = (1 + cos(pi x min(1, max(0, s - W) / max(1, T - W)))) / 2   schedule = cosine
                 = 1                                        schedule = constant

The groups at the concept rate (``group["rate"] == CONCEPT_RATE``, :meth:`ivpt.models.base.FrozenViT.param_groups`)
are further multiplied by :func:`concept_factor`, a linear rise from ``optim.concept_lr_start`` at step 0 to 1
at step ``R = max(1, round(optim.concept_lr_ramp x T))`` (1 throughout when ``concept_lr_ramp`` is 0)::

    concept_factor(s) = start + (1 - start) x min(1, s / R)

``schedule=step`` with ``warmup=0`` is the paper's per-epoch step decay: during epoch ``e`` every step runs at
``gamma ** (e // step_epochs)`` of the peak, what ``StepLR(step_size=step_epochs)`` stepped once per epoch gives.
The trainer applies the factor through :class:`torch.optim.lr_scheduler.LambdaLR` stepped after every optimiser
step; its state (the step count) is saved in ``last.pt``, so a resumed run continues on the same curve.
"""
from __future__ import annotations

import math

import torch

from ..config import Config, OptimConfig
from ..models.base import CONCEPT_RATE

__all__ = ["run_epochs", "total_steps", "warmup_steps", "lr_factor", "concept_factor", "depends_on_total",
           "build_scheduler", "steps_above_half_peak", "schedule_warning", "FULL_RATE_MIN_STEPS"]

# Fewer optimiser steps than this above half the peak rate: concepts rarely form (docs/training.md), so warn.
FULL_RATE_MIN_STEPS = 500


def run_epochs(optim: OptimConfig, steps_per_epoch: int) -> int:
    """Epochs of the run: ``optim.epochs``, raised until the run has at least ``optim.min_steps`` optimiser steps
    (a small dataset gets as many steps as a large one would, instead of a few hundred)."""
    return max(optim.epochs, math.ceil(optim.min_steps / steps_per_epoch))


def total_steps(optim: OptimConfig, steps_per_epoch: int, max_steps: int = 0) -> int:
    """Optimiser steps of the whole run: ``run_epochs x steps_per_epoch``, or ``max_steps`` when set and
    smaller."""
    total = run_epochs(optim, steps_per_epoch) * steps_per_epoch
    return min(total, max_steps) if max_steps else total


def warmup_steps(total: int, optim: OptimConfig) -> int:
    """``W = round(optim.warmup x total)``: the steps over which the rate rises to its peak."""
    return round(optim.warmup * total)


def lr_factor(step: int, total: int, steps_per_epoch: int, optim: OptimConfig) -> float:
    """Multiplier of every group's peak rate at optimiser step ``step`` (0-based) of a ``total``-step run with
    ``steps_per_epoch`` steps per epoch; the formulas are in the module docstring."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch={steps_per_epoch} must be at least 1")
    w = warmup_steps(total, optim)
    warm = min(1.0, (step + 1) / w) if w else 1.0
    if optim.schedule == "step":
        decay = optim.gamma ** ((step // steps_per_epoch) // optim.step_epochs)
    elif optim.schedule == "cosine":
        progress = min(1.0, max(0, step - w) / max(1, total - w))
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        decay = 1.0
    return warm * decay


def concept_factor(step: int, total: int, optim: OptimConfig) -> float:
    """Extra multiplier of the concept-rate groups at optimiser step ``step`` of a ``total``-step run: the rise from
    ``optim.concept_lr_start`` to 1 over the first ``optim.concept_lr_ramp`` of the steps (module docstring)."""
    if optim.concept_lr_ramp <= 0:
        return 1.0
    ramp = max(1, round(optim.concept_lr_ramp * total))
    return optim.concept_lr_start + (1.0 - optim.concept_lr_start) * min(1.0, step / ramp)


def depends_on_total(cfg: Config) -> list[str]:
    """The settings whose curves follow the run's total steps, as ``section.field=value`` (empty: none does), so a
    resume must keep epochs and max_steps: the rate's cosine decay and warm-up, the concept rate's ramp, the entropy
    and (when it is on) the parts-only weights' warm-ups."""
    optim, loss = cfg.optim, cfg.loss
    settings = [(optim.schedule == "cosine", f"optim.schedule={optim.schedule}"),
                (optim.warmup > 0, f"optim.warmup={optim.warmup}"),
                (optim.concept_lr_ramp > 0, f"optim.concept_lr_ramp={optim.concept_lr_ramp}"),
                (loss.entropy_warmup > 0, f"loss.entropy_warmup={loss.entropy_warmup}"),
                (loss.parts_only > 0 and loss.parts_only_warmup > 0,
                 f"loss.parts_only_warmup={loss.parts_only_warmup}")]
    return [setting for follows, setting in settings if follows]


def build_scheduler(optimizer: torch.optim.Optimizer, total: int, steps_per_epoch: int,
                    optim: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step LambdaLR that sets every group to its peak rate x :func:`lr_factor` (x :func:`concept_factor` for
    a group whose ``rate`` is :data:`CONCEPT_RATE`); step it after each optimiser step. Building it sets the rates of
    step 0."""
    def head(step: int) -> float:
        return lr_factor(step, total, steps_per_epoch, optim)

    def concept(step: int) -> float:
        return head(step) * concept_factor(step, total, optim)

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [concept if g.get("rate") == CONCEPT_RATE else head for g in optimizer.param_groups])


def last_step_rates(scheduler: torch.optim.lr_scheduler.LambdaLR) -> list[float]:
    """Each group's rate in the optimiser step before the scheduler's current index, as :func:`build_scheduler`'s
    LambdaLR set it then (base rate x its factor at index - 1): the rates a restored run's last step ran at."""
    return [base * factor(scheduler.last_epoch - 1) for factor, base in zip(scheduler.lr_lambdas, scheduler.base_lrs,
                                                                             strict=True)]


def steps_above_half_peak(total: int, steps_per_epoch: int, optim: OptimConfig,
                          *, stop_at: int | None = None) -> int:
    """How many of the ``total`` steps run the concept groups (the rates that form the concepts) at more than half
    their peak: :func:`lr_factor` x :func:`concept_factor` above 0.5 (counting stops at ``stop_at``)."""
    count = 0
    for step in range(total):
        count += lr_factor(step, total, steps_per_epoch, optim) * concept_factor(step, total, optim) > 0.5
        if stop_at is not None and count >= stop_at:
            break
    return count


def schedule_warning(total: int, steps_per_epoch: int, optim: OptimConfig) -> str | None:
    """One line when fewer than :data:`FULL_RATE_MIN_STEPS` steps run the concept groups above half their peak
    rate, else None."""
    high = steps_above_half_peak(total, steps_per_epoch, optim, stop_at=FULL_RATE_MIN_STEPS)
    if high >= FULL_RATE_MIN_STEPS:
        return None
    ramp = (f", optim.concept_lr_start={optim.concept_lr_start} over optim.concept_lr_ramp={optim.concept_lr_ramp}"
            if optim.concept_lr_ramp > 0 else "")
    return (f"the schedule leaves {high} of {total} optimiser steps with the concept groups above half their peak "
            f"rate (optim.schedule={optim.schedule}{ramp}, {steps_per_epoch} steps per epoch); with fewer than "
            f"{FULL_RATE_MIN_STEPS} the concepts may not form: train longer"
            + (" or use optim.schedule=constant (the recipe)" if optim.schedule == "step" else ""))
