"""Building the models of a group and measuring them: interleaved timing, peak memory (in process or in a
probe subprocess) and the optional profile (see :mod:`ivpt.bench`)."""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..config import Config, LossConfig, OptimConfig, model_config
from ..runtime import autocast
from .options import BACKBONE, BenchOptions, Entry, Group
from .phases import count_host_syncs


# ------------------------------------------------------------------------------------------------ building
def _config(opts: BenchOptions, group: Group, entry: Entry) -> Config:
    kind = "ivpt" if entry.kind == BACKBONE else entry.kind
    model = model_config({
        "kind": kind, "backbone": opts.backbone, "img_size": group.img_size, "num_classes": opts.num_classes,
        "n_pro": list(group.n_pro), "weights": "random", "train_tokens": opts.train_tokens,
        "num_prompts": opts.num_prompts, "backbone_kwargs": dict(opts.backbone_kwargs),
        "global_part": False, "deep_prompts": False,  # the paper's head and prompts, as the authors' code runs them
        **entry.model,  # each kind keeps the fields it reads
    })
    return Config(model=model, loss=dataclasses.replace(LossConfig(), **entry.loss), optim=OptimConfig(amp=opts.amp))


class _Runner:
    """A built model with its inputs: ``forward()`` and ``train_step()`` do one measured unit of work."""

    def __init__(self, opts: BenchOptions, group: Group, entry: Entry, device: torch.device) -> None:
        from ..engine.health import ConceptHealth
        from ..models import build_backbone, create_model

        self.entry, self.device = entry, device
        self.cfg = _config(opts, group, entry)
        torch.manual_seed(0)
        if entry.kind == BACKBONE:
            self.model = build_backbone(self.cfg.model, weights="random").to(device).eval()
            for p in self.model.parameters():
                p.requires_grad_(False)
            self.net = self.model.forward_features
        else:
            self.model = create_model(self.cfg.model, weights="random").to(device)
            self.net = self.model
            o = self.cfg.optim
            self.groups = self.model.param_groups(o.base_lr, o.head_lr_mult, o.concept_lr_mult)
            self.optimizer = torch.optim.Adam(self.groups, betas=tuple(o.betas), weight_decay=o.weight_decay)
            self.trainable = [p for g in self.groups for p in g["params"]]
            self.eq_gen = torch.Generator().manual_seed(0)
            self.health = ConceptHealth()  # the trainer's per-step concept-health sums, part of its step cost
            self.scaler = torch.amp.GradScaler(device.type, enabled=opts.amp == "fp16")
        if opts.compile:  # compiled at the first call of each mode, i.e. in the warm-up round
            self.net = torch.compile(self.net)
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(opts.batch, 3, group.img_size, group.img_size, generator=gen).to(device)
        self.y = torch.randint(0, opts.num_classes, (opts.batch,), generator=gen).to(device)

    def forward(self) -> None:
        """Eval-mode, no-grad forward of the batch (autocast at the bench's ``amp``)."""
        with torch.no_grad(), autocast(self.device, self.cfg.optim.amp):
            if self.entry.kind != BACKBONE:
                self.model.eval()
            self.net(self.x)

    def train_step(self) -> None:
        """One optimiser step as the trainer takes it (forward via the trainer's ``compute_loss``)."""
        from ..engine.trainer import compute_loss

        self.model.train()
        total, _ = compute_loss(self.net, self.x, self.y, self.cfg, self.eq_gen, health=self.health)
        self.scaler.scale(total).backward()
        self.scaler.unscale_(self.optimizer)
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def work(self, mode: str) -> Callable[[], None]:
        return self.forward if mode == "forward" else self.train_step

    def param_counts(self) -> dict[str, int]:
        params = list(self.model.parameters())
        return {"trainable_params": sum(p.numel() for p in params if p.requires_grad) if self.entry.trains else 0,
                "total_params": sum(p.numel() for p in params)}


def _modes(entry: Entry) -> list[str]:
    return ["forward", "train"] if entry.trains else ["forward"]


# --------------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def time_group(opts: BenchOptions, group: Group, device: torch.device, log: Callable[[str], None]) -> dict:
    """Build the group's models, run each once (warm-up; with ``memory`` its peak is measured), then time
    ``n_repeats`` interleaved rounds.

    Returns {label: {"forward_s": [...], "train_s": [...], "forward_peak_mb", "train_peak_mb", params...}} with
    raw per-batch seconds.
    """
    runners = {e.label: _Runner(opts, group, e, device) for e in group.entries}
    order = [(label, mode) for mode in ("forward", "train") for label, r in runners.items() if mode in _modes(r.entry)]
    result: dict[str, dict] = {label: {**r.param_counts(), "kind": r.entry.kind} for label, r in runners.items()}
    in_process = device.type == "cuda" or _reset_hwm()
    # Warm-up (Adam state, oneDNN/cuDNN kernel choice, allocator pools). Its peak is the one that decides whether
    # training fits, so memory is measured here; first-run extras (Adam state: 8 bytes per trainable parameter)
    # are small next to the activations.
    for label, mode in order:
        work = runners[label].work(mode)
        if not opts.memory:
            work()
        elif in_process:
            result[label][f"{mode}_peak_mb"] = measure_peak_mb(work, device)
        else:
            work()
            result[label][f"{mode}_peak_mb"] = _probe_subprocess(opts, group, runners[label].entry, mode)
        if device.type == "cuda":
            result[label][f"{mode}_host_syncs"] = count_host_syncs(work, device)
    for i in range(opts.n_repeats):
        for label, mode in order:
            result[label].setdefault(f"{mode}_s", []).append(_timed(runners[label].work(mode), device))
        log(f"  {group.name}: round {i + 1}/{opts.n_repeats} done")
    if opts.profile and group.name == "main":
        for label, phases in _profile(runners, opts.out, device, log).items():
            result[label]["train_phases"] = phases
    return result


def _profile(runners: dict[str, _Runner], out: Path, device: torch.device,
             log: Callable[[str], None]) -> dict[str, list[dict]]:
    """Write torch.profiler operator tables of one train step of ivpt and vpt_deep to ``out``; return each one's
    time by phase (:func:`ivpt.bench.phases.profile_phases`, from a second profiled step)."""
    from torch.profiler import ProfilerActivity, profile

    from .phases import profile_phases

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    phases = {}
    for label in ("ivpt", "vpt_deep"):
        if label not in runners:
            continue
        with profile(activities=activities) as prof:
            runners[label].train_step()
            _sync(device)
        table = prof.key_averages().table(sort_by=sort, row_limit=30)
        (out / f"profile_{label}_train.txt").write_text(table)
        log(f"  wrote {out / f'profile_{label}_train.txt'}")
        phases[label] = profile_phases(runners[label].train_step, device)
    return phases


# --------------------------------------------------------------------------------------------------- memory
def _status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _trim_heap() -> None:
    """Give freed heap pages back to the kernel (glibc), so the resident set is what is alive."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_hwm() -> bool:
    """Reset the resident-set high-water mark to the current resident set (Linux ≥ 4.0). False if impossible."""
    if _status_kb("VmHWM") is None:
        return False
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _peak_rss_kb() -> int:
    hwm = _status_kb("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, kB on Linux


def _rss_kb() -> int:
    rss = _status_kb("VmRSS")
    return rss if rss is not None else _peak_rss_kb()


def measure_peak_mb(fn: Callable[[], None], device: torch.device, *, reset: bool = True) -> float:
    """Peak memory (MB) of ``fn()`` above what was allocated before it (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    _trim_heap()
    if reset:
        _reset_hwm()
    before = _rss_kb()
    fn()
    return max(0, _peak_rss_kb() - before) / 1024


def _probe_subprocess(opts: BenchOptions, group: Group, entry: Entry, mode: str) -> float:
    """Fallback without a resettable high-water mark: one fresh process per measurement."""
    spec = {"opts": _opts_dict(opts), "group": dataclasses.asdict(group), "entry": dataclasses.asdict(entry),
            "mode": mode}
    done = subprocess.run([sys.executable, "-m", "ivpt.bench", "probe", json.dumps(spec)], check=True,
                          capture_output=True, text=True)
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"])


def _probe_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    opts = BenchOptions(**{**spec["opts"], "out": Path(spec["opts"]["out"])})
    group = Group(**{**spec["group"], "entries": []})
    runner = _Runner(opts, group, Entry(**spec["entry"]), torch.device("cpu"))
    print(json.dumps({"peak_mb": measure_peak_mb(runner.work(spec["mode"]), torch.device("cpu"), reset=False)}))


def _opts_dict(opts: BenchOptions) -> dict:
    d = dataclasses.asdict(opts)
    d["out"] = str(opts.out)
    return d
