"""An exponential moving average of the trained parameters (``optim.ema_decay``; not the paper).

At the recipe's constant rate the last iterate of Adam is a noisy point of the trajectory; the average over the
last steps (about ``1 / (1 - optim.ema_decay)`` of them) is what a decaying rate would settle on, without giving up the
steps at the full rate that the concepts need (benchmarks/recipe.md, "A constant rate", "A moving average of the
parameters"). After optimiser step ``n`` (1-based) each average ``a`` of
a parameter ``p`` moves by::

    a <- d_n x a + (1 - d_n) x p,   d_n = min(optim.ema_decay, (1 + n) / (10 + n))

(the warm-up of ``d_n`` keeps the first steps from being pinned to the initialisation). Validation, ``best/`` and the
test pass read the averages (:meth:`ParameterEma.applied`); training reads and updates the parameters themselves. The
averages live in the parameters' dtype beside them on the device and are saved in ``last.pt``, so a resume continues
them exactly. Under torchrun every rank holds the same parameters and so the same averages.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["ParameterEma"]


class ParameterEma:
    """Averages of the named parameters ``params`` (those the optimiser steps), updated by :meth:`update` after each
    step."""

    def __init__(self, params: dict[str, torch.Tensor], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay={decay} must lie in (0, 1)")
        self.names, self.params = list(params), list(params.values())
        self.decay, self.updates = decay, 0
        self.averages = [p.detach().clone() for p in self.params]

    def current_decay(self) -> float:
        """``d_n`` of the next update: ``min(decay, (1 + n) / (10 + n))`` with ``n`` the updates so far plus one."""
        n = self.updates + 1
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self) -> None:
        """Move every average towards its parameter by ``1 - d_n`` (one fused call, no read-back)."""
        torch._foreach_lerp_(self.averages, [p.detach() for p in self.params], 1.0 - self.current_decay())
        self.updates += 1

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the parameters hold the averages; after it, their own values again (also on error)."""
        with torch.no_grad():
            saved = [p.detach().clone() for p in self.params]
            for p, a in zip(self.params, self.averages):
                p.copy_(a)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)

    def state_dict(self) -> dict:
        """``{"averages": {name: CPU tensor}, "updates": int}``: plain tensors, loadable with ``weights_only``."""
        return {"averages": {n: a.detach().cpu() for n, a in zip(self.names, self.averages)},
                "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s averages onto the parameters' devices; names and shapes must match."""
        averages = state["averages"]
        if list(averages) != self.names or any(averages[n].shape != p.shape for n, p in zip(self.names, self.params)):
            raise ValueError("its parameter averages do not match the model's trained parameters")
        self.averages = [averages[n].to(device=p.device, dtype=p.dtype).clone()
                         for n, p in zip(self.names, self.params)]
        self.updates = int(state["updates"])
