"""Where a training step's time goes (``ivpt bench --profile``): the self time of every operator of one profiled
step, attributed to the phase of the code that ran it; and how often a piece of work makes the host wait for the
device (:func:`count_host_syncs`, CUDA).

torch.profiler records every operator with its caller chain (``with_stack``); an operator belongs to the first
phase of :data:`PHASES` whose pattern appears anywhere in that chain (so region pooling inside the head counts as
region pooling, and everything under the autograd engine as backward). Times are self times: on CUDA the kernels'
device time (what bounds the step), on CPU the host time (the Python tracer adds some overhead to the latter).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["PHASES", "count_host_syncs", "phase_of", "profile_phases"]

# (phase, patterns): the first phase with a pattern in an operator's caller chain takes its time.
PHASES: list[tuple[str, tuple[str, ...]]] = [
    ("backward", ("autograd::engine",)),
    ("optimiser (Adam)", ("torch/optim/", "Optimizer.step")),
    ("grad-norm clip", ("clip_grad",)),
    ("concept health", ("engine/health.py",)),
    ("losses (8 terms)", ("ivpt_losses",)),
    ("warp of the second view", ("losses.py",)),
    ("region pooling", ("region_pool",)),
    ("concept maps", ("): maps", "): renormalise", "): bias_for")),
    ("assignment + prompts", ("): assign", "): prompts", "): grouped_map")),
    ("stage features (norm)", ("): stage_features",)),
    ("head (modulation, classifier)", ("): classify",)),
    ("backbone (timm blocks, embedding)", ("timm/",)),
]
OTHER = "other (prompt insertion, glue)"


def phase_of(chain: list[str]) -> str:
    """The phase of an operator whose caller chain (innermost first: event names / Python frames) is ``chain``."""
    for phase, patterns in PHASES:
        if any(p in frame for frame in chain for p in patterns):
            return phase
    return OTHER


def profile_phases(step: Callable[[], None], device: torch.device) -> list[dict]:
    """Run ``step`` once under torch.profiler; rows {phase, ms, share} sorted by time (device time on CUDA, host
    time on CPU), plus ``host_ms`` (host time, on both)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, with_stack=True) as prof:
        step()
        if cuda:
            torch.cuda.synchronize(device)
    totals: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CPU:
            continue  # kernels are counted through the operator that launched them
        chain, parent = [event.name], event.cpu_parent
        while parent is not None:
            chain.append(parent.name)
            parent = parent.cpu_parent
        chain += list(getattr(event, "stack", None) or [])  # the Python frames, where the tracer did not nest them
        if any("torch/profiler/" in name for name in chain):
            continue  # the profiler starting and stopping
        device_us = getattr(event, "self_device_time_total", 0.0) if cuda else 0.0
        row = totals.setdefault(phase_of(chain), [0.0, 0.0])
        row[0] += device_us if cuda else event.self_cpu_time_total
        row[1] += event.self_cpu_time_total
    total = sum(v[0] for v in totals.values()) or 1.0
    rows = [{"phase": k, "ms": v[0] / 1000, "share": v[0] / total, "host_ms": v[1] / 1000} for k, v in totals.items()]
    return sorted(rows, key=lambda r: -r["ms"])


def count_host_syncs(fn: Callable[[], object], device: torch.device) -> int | None:
    """How many times ``fn()`` makes the host wait for the device (CUDA's sync debug mode reports each: stream
    synchronisations, blocking copies, ``.item()``); None off CUDA."""
    if device.type != "cuda":
        return None
    import warnings

    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)
