"""Which epoch ``best/`` holds: model selection on the validation split that respects the concepts.

An epoch is *alive* when every stage keeps at least half of its foreground prototypes winning 1 % of the
validation pixels (:func:`ivpt.engine.health.weak_stages`). An alive epoch always displaces a dead ``best/``, a dead
epoch never displaces an alive one. Among epochs alike in that respect, ``train.selection`` decides:

- ``best_top1``: the epoch with the highest validation top-1 (ties: the earlier);
- ``latest_within_se`` (the default): the latest epoch whose validation top-1 is within one standard error of the
  best top-1 seen so far, SE = 100·√(p(1 − p)/n) for a top-1 of p measured on n images. A validation split of a few
  dozen images cannot tell such epochs apart (n = 48 at p = 0.8: SE = 5.8 points); the later one's concepts have
  trained longer (benchmarks/recipe.md, "Model selection").
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..config.sections import SELECTIONS


def top1_standard_error(top1: float, n: int) -> float:
    """Standard error (percentage points) of a top-1 of ``top1`` % measured on ``n`` images."""
    p = min(max(top1 / 100.0, 0.0), 1.0)
    return 100.0 * math.sqrt(p * (1.0 - p) / n) if n > 0 else 0.0


@dataclass
class Selection:
    """The running state of the rule: the best validation top-1 seen among the epochs alike (alive or dead) with
    ``best/``, and whether ``best/`` is alive. Saved in ``last.pt`` so that a resumed run chooses as an
    uninterrupted one."""

    rule: str  # train.selection (whose default the config holds)
    best_val: float = -math.inf
    best_alive: bool = False

    def __post_init__(self) -> None:
        if self.rule not in SELECTIONS:
            raise ValueError(f"selection rule {self.rule!r} is unknown; choose one of {', '.join(SELECTIONS)}")

    def consider(self, val: float | None, alive: bool, n: int) -> bool:
        """Whether the epoch with validation top-1 ``val`` (%, on ``n`` images; None: no validation split, every
        epoch is taken) and concepts ``alive`` becomes ``best/``; updates the state."""
        if val is None:
            return True
        if alive != self.best_alive:
            if not alive:
                return False
            self.best_val, self.best_alive = val, True
            return True
        if self.rule == "best_top1":
            if val > self.best_val:
                self.best_val = val
                return True
            return False
        self.best_val = max(self.best_val, val)
        return val >= self.best_val - top1_standard_error(self.best_val, n)
