"""Where and how a process computes: its device, its precision, and its place in a ``torchrun`` process group.

One code path for one process and for ``torchrun``: the launcher decides, not the device count.

Launched by ``torchrun`` (``TORCHELASTIC_RUN_ID`` / ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` set), every process
joins a process group — NCCL when it drives a GPU, gloo on CPU — even when the world has ONE process, so
``torchrun --nproc_per_node=1`` on one GPU runs every collective through NCCL. Launched plainly, the process is
rank 0 of a world of 1 and no group is created.

Every collective of the package goes through the helpers below. They refuse a tensor that does not live on the
device the group reduces on (CUDA for NCCL, CPU for gloo) with an error that names the fix, instead of NCCL's
crash at the end of a run.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .config import AMP_MODES, ConfigError

__all__ = [
    "AMP_MODES",
    "autocast",
    "resolve_device",
    "DistInfo",
    "DistributedError",
    "setup",
    "teardown",
    "launched_by_torchrun",
    "group_device",
    "all_reduce_sum",
    "any_true",
    "all_gather_object",
    "barrier",
    "compile_module",
    "compile_warning",
    "to_device",
]


def autocast(device: torch.device, amp: str):
    """The autocast context of precision ``amp`` (``none`` | ``bf16`` | ``fp16``) on ``device``; ``none`` runs fp32."""
    if amp not in AMP_MODES:
        raise ValueError(f"amp={amp!r} must be one of {', '.join(AMP_MODES)}")
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


class DistributedError(RuntimeError):
    """A collective was called with a tensor the process group cannot reduce."""


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when this process is in a process group (under torchrun, even with one process)."""
        return dist.is_available() and dist.is_initialized()


def resolve_device(requested: str, local_rank: int = 0, *, setting: str = "--device") -> torch.device:
    """``auto`` → this process's GPU if torch sees one, else CPU; ``cuda`` → ``cuda:LOCAL_RANK``; else as named.

    A device this machine does not have (CUDA without a visible GPU, a GPU index past the last one) or a string torch
    does not read is a :class:`ConfigError` naming ``setting`` (the option or config field it came from)."""
    if requested == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"{setting}={requested!r} is not a device; use {setting}=auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{setting}={requested!r}: no CUDA device is visible to torch on this machine "
                              f"(torch.cuda.is_available() is false); use {setting}=cpu or {setting}=auto")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        count = torch.cuda.device_count()
        if device.index >= count:
            named = "" if requested == str(device) else f" (cuda:{device.index})"
            raise ConfigError(f"{setting}={requested!r}{named} but torch sees {count} CUDA device(s), cuda:0 to "
                              f"cuda:{count - 1}; use {setting}=cuda or {setting}=auto")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{setting}={requested!r}: no MPS device is available on this machine; use {setting}=cpu "
                          f"or {setting}=auto")
    return device


def launched_by_torchrun() -> bool:
    """True when the environment of a torchrun (torch.distributed.run) worker is present."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def setup(requested_device: str = "auto", *, setting: str = "train.device") -> DistInfo:
    """Join the process group if launched by torchrun (any world size); pick this process's device (``setting``:
    where ``requested_device`` came from, for the error of a device this machine lacks)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(requested_device, local_rank, setting=setting)
    if launched_by_torchrun() and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            # device_id binds NCCL to this rank's GPU (barrier() otherwise guesses it, with a warning)
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def teardown() -> None:
    """Leave the process group. On a normal exit every rank first meets at a barrier, so that no rank closes its
    connections while a peer's last collective is still being delivered; while an exception propagates (called
    from a ``finally``) the barrier is skipped, as the other ranks may never reach it."""
    if dist.is_available() and dist.is_initialized():
        if sys.exc_info()[0] is None:
            dist.barrier()
        dist.destroy_process_group()


def group_device() -> torch.device | None:
    """The device the current process group reduces on (CUDA for NCCL, CPU otherwise); None without a group."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check(t: torch.Tensor, what: str) -> None:
    expected = group_device()
    if expected is not None and t.device.type != expected.type:
        raise DistributedError(
            f"{what}: tensor on {t.device} but the {dist.get_backend()} process group reduces {expected.type} "
            f"tensors; create it on the process's device (DistInfo.device = {expected})"
        )


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over processes in place and return it; identity without a process group."""
    if dist.is_available() and dist.is_initialized():
        _check(t, "all_reduce_sum")
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_true(flag: torch.Tensor) -> bool:
    """True if the boolean/0-1 tensor ``flag`` (on the process's device) is true on any process. One host sync."""
    t = flag.detach().reshape(1).to(torch.float32)
    return bool(all_reduce_sum(t).item() > 0)


def all_gather_object(obj: Any, world_size: int) -> list[Any]:
    """Every process's ``obj`` in rank order; ``[obj]`` without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Host tensor ``t`` on ``device`` without making the host wait for the device. A plain CPU→CUDA ``.to`` (and
    ``torch.tensor(..., device="cuda")``) synchronises the stream before it copies; this copies from pinned memory,
    queued behind the work already on the stream."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def compile_module(module: torch.nn.Module) -> tuple[torch.nn.Module, str | None]:
    """``(torch.compile(module), None)``, or ``(module, warning)`` when torch.compile refuses at once. Compilation
    itself happens at the first call (forward) and first backward; a caller that sees those fail falls back to
    ``module`` with :func:`compile_warning`."""
    try:
        return torch.compile(module), None
    except Exception as exc:  # e.g. an unsupported Python or platform
        return module, compile_warning(exc)


def compile_warning(exc: BaseException) -> str:
    """The one line that says compilation failed and the run goes on without it."""
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"train.compile: torch.compile failed ({type(exc).__name__}: {first}); continuing without compilation"
