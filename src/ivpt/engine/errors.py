"""The training loop's two ways to end early: a run that cannot go on, and a run stopped by a signal."""
from __future__ import annotations

__all__ = ["TrainingError", "TrainingStopped"]


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
