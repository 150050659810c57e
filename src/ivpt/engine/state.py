"""What ``last.pt`` holds beyond the parameters (every generator's state, the optimiser's tensors, the identity of
the training data), and the SIGTERM / SIGINT handler of the training loop with the error that ends a run it
stopped."""
from __future__ import annotations

import random
import signal
import sys
import threading
from typing import Any

import numpy as np
import torch

from .errors import TrainingStopped


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


class _StopOnSignal:
    """While the training loop runs, SIGTERM and SIGINT set ``trainer.stop_signal`` instead of ending the process:
    the loop stops at the next step boundary with last.pt saved (:meth:`Trainer._stop_due`). A second signal stops at
    once (KeyboardInterrupt). Only in the main thread (elsewhere signals cannot be caught); the previous handlers
    come back on exit, so a signal during the test pass ends the process as usual."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, trainer) -> None:  # the Trainer
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


def stopped(trainer) -> TrainingStopped:
    """The :class:`TrainingStopped` that ends a run stopped by a signal, with ``last.pt`` saved at its last step."""
    signum = trainer.stop_signal or signal.SIGTERM  # under torchrun another rank may have received it
    name = signal.Signals(signum).name
    return TrainingStopped(f"stopped by {name} after step {trainer.step} (epoch {trainer._step_epoch()}); "
                           f"{trainer.out / 'last.pt'} holds it: continue with `ivpt train --resume {trainer.out}`",
                           signum)
