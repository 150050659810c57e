"""Concept health: are the concepts of each stage alive, and how sure are the maps? Cheap, from the training
forward passes the trainer runs anyway (no extra pass over the data).

For each stage ``i`` of a model output's ``maps`` (tensors (B, n_i, H, W), background last), summed over the
clean training images of an epoch:

* ``alive_s{i}``: the share of the ``n_i - 1`` foreground prototypes that win (argmax over channels) at least
  :data:`ALIVE_SHARE` of the stage's pixels;
* ``entropy_s{i}``: the mean over pixels of the map's entropy over channels divided by ``log n_i``, in [0, 1]
  (1: uniform maps, 0: one-hot maps).

``s{i}`` is the position in ``maps`` (IVPT: stage ``i``; a model with one map stage has only ``s0``). Models
without concept maps give no columns.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = ["ALIVE_SHARE", "COLLAPSE_ALIVE_FRACTION", "ConceptHealth", "MapHealth", "health_summary", "weak_stages",
           "collapse_warning"]

ALIVE_SHARE = 0.01  # a foreground prototype is alive when it wins at least 1 % of the pixels
COLLAPSE_ALIVE_FRACTION = 0.5  # warn when fewer than half of a stage's foreground prototypes are alive


class ConceptHealth:
    """Per-stage pixel wins and entropy sums, accumulated on the device; read back once per epoch."""

    def __init__(self) -> None:
        self.num_prototypes: list[int] = []  # n_i per stage, fixed by the first maps seen
        self.last_wins: list[list[float]] = []  # pixels won per prototype and stage at the last flush
        self.reset()

    def reset(self) -> None:
        self.wins: list[torch.Tensor] = []  # (n_i,) pixels won per prototype
        self.entropy: list[torch.Tensor] = []  # () summed normalised pixel entropy

    def state_dict(self) -> dict:
        """The counts of the epoch so far (on the CPU), for ``last.pt``: a run resumed mid-epoch ends the epoch with
        the same counts, hence the same log row and the same revivals (:mod:`ivpt.engine.revive`)."""
        return {"num_prototypes": list(self.num_prototypes), "wins": [w.cpu() for w in self.wins],
                "entropy": [e.cpu() for e in self.entropy]}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        self.num_prototypes = list(state["num_prototypes"])
        self.wins = [w.to(device) for w in state["wins"]]
        self.entropy = [e.to(device) for e in state["entropy"]]

    @property
    def columns(self) -> list[str]:
        """The log columns of the stages seen so far: alive_s0, entropy_s0, alive_s1, ..."""
        return [f"{name}_s{i}" for i in range(len(self.num_prototypes)) for name in ("alive", "entropy")]

    @torch.no_grad()
    def add(self, maps: list[torch.Tensor]) -> None:
        """Add one batch: ``maps`` holds (B, n_i, H, W) soft maps per stage (an empty list adds nothing)."""
        if not self.num_prototypes:
            self.num_prototypes = [m.shape[1] for m in maps]
        first = not self.wins
        for i, m in enumerate(maps):
            p = m.detach().float()
            n = p.shape[1]
            winner = p.argmax(1, keepdim=True) == torch.arange(n, device=p.device).view(1, n, 1, 1)
            wins = winner.sum((0, 2, 3)).float()
            entropy = -(p * p.clamp_min(1e-12).log()).sum(1).sum() / math.log(n)
            if first:
                self.wins.append(wins)
                self.entropy.append(entropy)
            else:
                self.wins[i] += wins
                self.entropy[i] += entropy

    def flush(self, reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> dict[str, float]:
        """The epoch's ``alive_s*`` / ``entropy_s*`` (``reduce`` sums the counts over processes; one host sync),
        then reset. Nothing seen: an empty dict."""
        if not self.wins:
            return {}
        flat = reduce(torch.cat([*self.wins, torch.stack(self.entropy)])).tolist()
        wins, at = [], 0
        for n in self.num_prototypes:
            wins.append(flat[at:at + n])
            at += n
        self.reset()
        self.last_wins = wins
        return health_summary(wins, flat[at:])


class MapHealth:
    """A dataset-pass consumer (:func:`ivpt.eval.runner.run_pass`): the concept health of the eval-mode maps of a
    split, e.g. validation, read with ``health.flush(reduce)`` after the pass (it keeps no summable meter)."""

    def __init__(self) -> None:
        self.health = ConceptHealth()

    def update(self, batch: dict, forward) -> None:
        self.health.add(forward(batch["image"]).maps)

    def meters(self) -> list:
        return []


def health_summary(wins: list[list[float]], entropy_sums: list[float]) -> dict[str, float]:
    """``alive_s{i}`` and ``entropy_s{i}`` from per-prototype pixel wins (background last) and the summed
    normalised pixel entropy of each stage."""
    row = {}
    for i, (w, e) in enumerate(zip(wins, entropy_sums)):
        pixels = sum(w)
        foreground = w[:-1]
        row[f"alive_s{i}"] = sum(c >= ALIVE_SHARE * pixels for c in foreground) / len(foreground)
        row[f"entropy_s{i}"] = e / pixels
    return row


def weak_stages(health: dict[str, float], num_prototypes: list[int]) -> list[str]:
    """``"stage i a/b"`` for every stage with fewer than :data:`COLLAPSE_ALIVE_FRACTION` of its b foreground
    prototypes alive (a of them) in ``health`` (:func:`health_summary`'s row); empty when every stage holds."""
    weak = []
    for i, n in enumerate(num_prototypes):
        alive = health.get(f"alive_s{i}")
        if alive is not None and alive < COLLAPSE_ALIVE_FRACTION:
            weak.append(f"stage {i} {round(alive * (n - 1))}/{n - 1}")
    return weak


def collapse_warning(health: dict[str, float], num_prototypes: list[int], epoch: int) -> str | None:
    """One line naming every stage with fewer than :data:`COLLAPSE_ALIVE_FRACTION` of its foreground prototypes
    alive after ``epoch`` (1-based), else None."""
    weak = weak_stages(health, num_prototypes)
    if not weak:
        return None
    return (f"concepts collapsing after epoch {epoch}: foreground prototypes alive (winning >= "
            f"{ALIVE_SHARE:.0%} of pixels) {', '.join(weak)}; check the learning rates, the schedule "
            "(optim.schedule, optim.warmup) and the map losses: loss.entropy and loss.tv empty the stages when the "
            "object covers few patches (data.bbox_crop=true trains on box crops where the dataset has boxes)")
