"""Speed and memory of every model kind, measured side by side on this machine (``ivpt bench``).

What is measured, per group of models built at one image size and one ``n_pro``:

- forward: eval mode, ``torch.no_grad``, one batch of ``batch`` images; the reference is the plain frozen timm
  backbone's ``forward_features`` on the same batch;
- train step: exactly what the trainer does per optimiser step — :func:`ivpt.engine.trainer.compute_loss` (one forward
  of the clean and the warped view together for ivpt / last_layer_parts with equivariance on, all loss terms),
  backward, global grad-norm clip, Adam step on the model's ``param_groups``, ``zero_grad``;
- peak memory of the first forward / first train step (the warm-up run) above what was resident before it
  (model, inputs): activations, gradients, workspace, plus the Adam state the first step creates (8 bytes per
  trainable parameter). CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the run. CPU
  (tracemalloc cannot see torch's allocations): the kernel's resident-set high-water mark (``VmHWM``), reset
  through ``/proc/self/clear_refs`` after ``malloc_trim`` hands freed heap pages back, minus the resident set
  before the run. Where that reset is not possible, each measurement runs in a fresh subprocess
  (``python -m ivpt.bench probe``) and reports its max-RSS delta instead.

Runs interleave the models (A B C A B C ...) so that machine noise — other jobs on a shared CPU — is spread over
all of them. The headline ``ratios`` divide minimum times: load from other processes only ever adds time, and a
burst of it slows single runs (with 2 OpenMP threads on 2 busy cores, by up to 4×), so the fastest run is the
best estimate of a model's own cost; ``ratios_median`` divide medians, and the raw times are kept. Per-image
times are time / ``batch``: a train step of ivpt processes 2·batch images internally but trains on ``batch``
distinct ones. Backbone weights are random (no
download): speed does not depend on the values.

Groups: ``main`` (every kind at ``img_size``), then (full run only) growth with the image size (224, 336, 448,
518) and with the number of prompted stages (``n_pro`` of length 2..5), each with the backbone and VPT-deep as
the references measured in the same interleaved loop. ``--quick`` measures ``main`` only with few repeats.

Precision: ``amp`` (none | bf16 | fp16) autocasts every forward and train step, the backbone reference's too
(fp16 train steps go through a GradScaler, as the trainer's). Besides the models: the images/s of the real
training DataLoader for the CPU and the ``data.gpu_augment`` path (:mod:`ivpt.bench.loader`), and the
projection of the paper recipe on CUB from the measured numbers (:func:`project`). ``--profile`` adds operator
tables and where an ivpt train step's time goes, by phase (:mod:`ivpt.bench.phases`).
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import AMP_MODES, Config, LossConfig, ModelConfig, OptimConfig
from ..runtime import autocast, resolve_device
from .phases import count_host_syncs

__all__ = ["BenchOptions", "Entry", "Group", "project", "render_markdown", "run_bench", "targets"]

KINDS = ("ivpt", "linear", "vpt_shallow", "vpt_deep", "last_layer_parts")
BACKBONE = "backbone"  # label of the plain timm forward_features reference
# The paper recipe on CUB-200-2011 that the projection times: 25 epochs over the 5,994 training images, then the
# 5,794 test images.
CUB_TRAIN_IMAGES, CUB_TEST_IMAGES, PAPER_EPOCHS = 5994, 5794, 25


def targets(device_type: str, amp: str) -> dict[str, dict[str, float]]:
    """The speed targets that apply on ``device_type`` at precision ``amp``: {name: {"max" or "min":
    value}}. Ratios hold for any backbone; the two absolute ones are stated for ViT-S/14 at 224 px (training
    images/s, loader included) and for the paper config, ViT-B/14-reg4 at 518 px (full recipe seconds)."""
    if device_type == "cuda":
        return {"ivpt_forward_vs_backbone": {"max": 1.03 if amp == "none" else 1.05},
                "ivpt_train_step_vs_backbone_forward": {"max": 3.0},
                "train_images_per_s": {"min": 1500.0},
                "full_recipe_s": {"max": 600.0}}
    return {"ivpt_forward_vs_backbone": {"max": 1.10}, "ivpt_train_step_vs_vpt_deep": {"max": 1.5}}


@dataclass
class BenchOptions:
    """Everything a bench run depends on (the CLI fills it from its arguments)."""

    out: Path
    quick: bool = False
    backbone: str = "vit_small_patch14_dinov2"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    batch: int = 8
    img_size: int = 224
    n_pro: list[int] = field(default_factory=lambda: [17, 14, 11, 8, 5])
    num_classes: int = 200
    num_prompts: int = 10
    train_tokens: bool = True  # the paper's trainable set: pos_embed / cls_token / reg_token train
    sizes: list[int] = field(default_factory=lambda: [224, 336, 448, 518])
    stage_counts: list[int] = field(default_factory=lambda: [2, 3, 4, 5])  # len(n_pro) of the stage groups
    repeats: int | None = None  # None: 3 with --quick, else 7
    device: str = "auto"
    threads: int | None = None  # torch intra-op threads; None keeps torch's default (one per physical core)
    memory: bool = True
    variants: bool = False  # also ivpt with one view and with frozen tokens (where the train time goes)
    profile: bool = False  # torch.profiler tables of one ivpt and one vpt_deep train step, ivpt's by phase
    amp: str = "none"  # autocast of every forward and train step: none | bf16 | fp16
    loader: bool = True  # measure the training DataLoader's images/s (CPU and gpu_augment paths)
    workers: int | None = None  # loader workers; None: min(16, CPUs)
    loader_images: int | None = None  # synthetic images; None: 64 with --quick, else 512
    loader_image_size: int = 500  # px of the (square) synthetic JPEGs, about CUB's 500 x 375

    def __post_init__(self) -> None:
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp={self.amp!r} must be one of {', '.join(AMP_MODES)}")

    @property
    def n_repeats(self) -> int:
        return self.repeats if self.repeats is not None else (3 if self.quick else 7)

    @property
    def n_workers(self) -> int:
        return self.workers if self.workers is not None else min(16, os.cpu_count() or 1)

    @property
    def n_loader_images(self) -> int:
        return self.loader_images if self.loader_images is not None else (64 if self.quick else 512)


@dataclass
class Entry:
    """One model in a group: ``kind`` is a model kind or ``backbone``; overrides adjust its model/loss config."""

    label: str
    kind: str
    model: dict[str, Any] = field(default_factory=dict)
    loss: dict[str, Any] = field(default_factory=dict)

    @property
    def trains(self) -> bool:
        return self.kind != BACKBONE


@dataclass
class Group:
    """Models measured together, interleaved, at one image size and one ``n_pro``."""

    name: str
    img_size: int
    n_pro: list[int]
    entries: list[Entry]


def plan(opts: BenchOptions) -> list[Group]:
    """The groups a run measures: ``main`` always; image-size and stage growth unless ``quick``."""
    main = [Entry(BACKBONE, BACKBONE)] + [Entry(k, k) for k in KINDS]
    if opts.variants:
        main += [
            Entry("ivpt[1 view]", "ivpt", loss={"equivariance": 0.0}),
            Entry("ivpt[tokens frozen]", "ivpt", model={"train_tokens": False}),
            Entry("vpt_deep[tokens frozen]", "vpt_deep", model={"train_tokens": False}),
        ]
    groups = [Group("main", opts.img_size, list(opts.n_pro), main)]
    if opts.quick:
        return groups
    refs = [Entry(BACKBONE, BACKBONE), Entry("ivpt", "ivpt"), Entry("vpt_deep", "vpt_deep")]
    groups += [Group(f"img_size={s}", s, list(opts.n_pro), refs) for s in opts.sizes]
    for count in opts.stage_counts:
        if not 2 <= count <= len(opts.n_pro):
            continue
        groups.append(Group(f"stages={count - 1}", opts.img_size, list(opts.n_pro[-count:]), refs))
    return groups


# ------------------------------------------------------------------------------------------------ building
def _config(opts: BenchOptions, group: Group, entry: Entry) -> Config:
    kind = "ivpt" if entry.kind == BACKBONE else entry.kind
    model = ModelConfig(
        kind=kind, backbone=opts.backbone, img_size=group.img_size, num_classes=opts.num_classes,
        n_pro=list(group.n_pro), weights="random", train_tokens=opts.train_tokens, num_prompts=opts.num_prompts,
        global_part=False, deep_prompts=False,  # the paper's head and prompts, as the authors' code runs them
        backbone_kwargs=dict(opts.backbone_kwargs),
    )
    model = dataclasses.replace(model, **entry.model)
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
        else:
            self.model = create_model(self.cfg.model, weights="random").to(device)
            o = self.cfg.optim
            self.groups = self.model.param_groups(o.base_lr, o.head_lr_mult, o.concept_lr_mult)
            self.optimizer = torch.optim.Adam(self.groups, betas=tuple(o.betas), weight_decay=o.weight_decay)
            self.trainable = [p for g in self.groups for p in g["params"]]
            self.eq_gen = torch.Generator().manual_seed(0)
            self.health = ConceptHealth()  # the trainer's per-step concept-health sums, part of its step cost
            self.scaler = torch.amp.GradScaler(device.type, enabled=opts.amp == "fp16")
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(opts.batch, 3, group.img_size, group.img_size, generator=gen).to(device)
        self.y = torch.randint(0, opts.num_classes, (opts.batch,), generator=gen).to(device)

    def forward(self) -> None:
        """Eval-mode, no-grad forward of the batch (autocast at the bench's ``amp``)."""
        with torch.no_grad(), autocast(self.device, self.cfg.optim.amp):
            if self.entry.kind == BACKBONE:
                self.model.forward_features(self.x)
            else:
                self.model.eval()
                self.model(self.x)

    def train_step(self) -> None:
        """One optimiser step as the trainer takes it (forward via the trainer's ``compute_loss``)."""
        from ..engine.trainer import compute_loss

        self.model.train()
        total, _ = compute_loss(self.model, self.x, self.y, self.cfg, self.eq_gen, health=self.health)
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


# ------------------------------------------------------------------------------------------------ reporting
def _median(values: list[float] | None) -> float | None:
    return statistics.median(values) if values else None


def _summarise(raw: dict, batch: int) -> dict:
    models = {}
    for label, r in raw.items():
        row = {k: r[k] for k in ("kind", "trainable_params", "total_params")}
        for mode in ("forward", "train"):
            times = r.get(f"{mode}_s")
            med = _median(times)
            row[f"{mode}_s"] = times
            row[f"{mode}_median_s"] = med
            row[f"{mode}_min_s"] = min(times) if times else None
            row[f"{mode}_ms_per_image"] = None if not times else 1000 * min(times) / batch
            row[f"{mode}_median_ms_per_image"] = None if med is None else 1000 * med / batch
        row.update({k: v for k, v in r.items() if k.endswith(("_peak_mb", "_host_syncs")) or k == "train_phases"})
        models[label] = row
    return models


def _ratio(models: dict, a: str, b: str, mode: str, stat: str) -> float | None:
    x = models.get(a, {}).get(f"{mode}_{stat}_s")
    y = models.get(b, {}).get(f"{mode}_{stat}_s")
    return None if x is None or y is None else x / y


def _group_ratios(models: dict, stat: str) -> dict[str, float]:
    """Forward time of every model / backbone forward, train-step time / vpt_deep's train step and / backbone
    forward, from ``stat`` ("median"/"min")."""
    ratios = {}
    for label in ["ivpt"] + [m for m in models if m not in (BACKBONE, "ivpt")]:
        ratios[f"{label}_forward_vs_backbone"] = _ratio(models, label, BACKBONE, "forward", stat)
        if label != "vpt_deep":
            ratios[f"{label}_train_step_vs_vpt_deep"] = _ratio(models, label, "vpt_deep", "train", stat)
        x, y = models.get(label, {}).get(f"train_{stat}_s"), models.get(BACKBONE, {}).get(f"forward_{stat}_s")
        ratios[f"{label}_train_step_vs_backbone_forward"] = None if x is None or y is None else x / y
    return {k: v for k, v in ratios.items() if v is not None}


def project(train_ms_per_image: float, eval_ms_per_image: float, loader_images_per_s: float | None, *,
            train_images: int = CUB_TRAIN_IMAGES, test_images: int = CUB_TEST_IMAGES,
            epochs: int = PAPER_EPOCHS) -> dict:
    """The paper recipe's time from measured numbers: an epoch takes ``train_images`` x max(train step per image,
    1 / loader images per s) (whichever of the step and the loader is slower bounds it), the recipe ``epochs``
    epochs plus ``test_images`` eval forwards. No loader measurement: the step alone."""
    loader_ms = None if not loader_images_per_s else 1000 / loader_images_per_s
    per_image_ms = max(train_ms_per_image, loader_ms or 0.0)
    epoch_s = train_images * per_image_ms / 1000
    eval_s = test_images * eval_ms_per_image / 1000
    total_s = epochs * epoch_s + eval_s
    slower = f"max({train_ms_per_image:.3f} ms step, {loader_ms:.3f} ms loader)" if loader_ms else \
        f"{train_ms_per_image:.3f} ms step"
    return {
        "train_ms_per_image": train_ms_per_image, "loader_ms_per_image": loader_ms,
        "eval_ms_per_image": eval_ms_per_image, "bound_by": "loader" if (loader_ms or 0) > train_ms_per_image
        else "step", "train_images_per_s": 1000 / per_image_ms, "epoch_s": epoch_s, "eval_s": eval_s,
        "full_recipe_s": total_s, "train_images": train_images, "test_images": test_images, "epochs": epochs,
        "formula": (f"{epochs} epochs x {train_images} images x {slower} + {test_images} x "
                    f"{eval_ms_per_image:.3f} ms eval = {epochs} x {epoch_s:.1f} s + {eval_s:.1f} s = {total_s:.0f} s "
                    f"({total_s / 60:.1f} min)"),
    }


def _machine(device: torch.device) -> dict:
    import timm

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {
        "device": str(device), "device_name": name, "torch": torch.__version__, "timm": timm.__version__,
        "device_memory_gb": (torch.cuda.get_device_properties(device).total_memory / 2**30
                             if device.type == "cuda" else None),
        "python": platform.python_version(), "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(), "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def run_bench(opts: BenchOptions, *, log: Callable[[str], None] = lambda s: None) -> dict:
    """Measure every group of :func:`plan`; write ``bench.json`` and ``bench.md`` into ``opts.out``."""
    opts.out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(opts.device)
    threads_before = torch.get_num_threads()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    try:
        started, load_start = time.perf_counter(), _loadavg()
        groups_out = []
        for group in plan(opts):
            log(f"{group.name}: {len(group.entries)} models at {group.img_size}px, n_pro={group.n_pro}")
            models = _summarise(time_group(opts, group, device, log), opts.batch)
            groups_out.append({"name": group.name, "img_size": group.img_size, "n_pro": group.n_pro,
                               "ratios": _group_ratios(models, "min"),
                               "ratios_median": _group_ratios(models, "median"), "models": models})
        loader = None
        if opts.loader:
            from .loader import loader_throughput

            log(f"loader: {opts.n_loader_images} synthetic {opts.loader_image_size}px JPEGs, {opts.n_workers} workers")
            loader = loader_throughput(device=device, img_size=opts.img_size, batch=opts.batch,
                                       workers=opts.n_workers, images=opts.n_loader_images,
                                       image_size=opts.loader_image_size)
        machine = _machine(device)
    finally:
        torch.set_num_threads(threads_before)  # a library call must not change the caller's thread count
    main = groups_out[0]
    ratios = main["ratios"]
    projection = _projection(main["models"].get("ivpt"), loader)
    report = {
        "schema": 1,
        "quick": opts.quick,
        "machine": machine,
        "load_average_start": load_start,
        "load_average_end": _loadavg(),
        "settings": {
            "backbone": opts.backbone, "backbone_kwargs": opts.backbone_kwargs, "weights": "random",
            "batch": opts.batch, "img_size": opts.img_size, "n_pro": opts.n_pro, "num_prompts": opts.num_prompts,
            "amp": opts.amp,
            "num_classes": opts.num_classes, "repeats": opts.n_repeats, "train_tokens": opts.train_tokens,
            "trainable_set": (
                "paper (model.train_tokens=true): pos_embed, cls_token, reg_token train in ivpt, vpt_shallow, vpt_deep "
                "and last_layer_parts; the linear probe keeps them frozen"
                if opts.train_tokens else "tokens frozen (model.train_tokens=false) in every kind"
            ),
            "train_step": "trainer compute_loss (ivpt / last_layer_parts: clean + warped view in one forward, all loss "
                          "weights 1) + backward + grad-norm clip 2.0 + Adam step; time per image = step / batch",
            "forward": "eval mode, torch.no_grad; backbone = timm forward_features",
            "precision": f"autocast {opts.amp} for every forward and train step" if opts.amp != "none" else "fp32",
            "memory": ("peak of the first (warm-up) run above what was allocated before it, in MB: "
                       + ("torch.cuda.max_memory_allocated delta" if device.type == "cuda" else
                          "resident-set high-water mark (VmHWM, reset via /proc/self/clear_refs after malloc_trim) "
                          "minus the resident set before the run; includes allocator slack (a few MB)")),
            "ratios": "ratio of minimum times (load from other jobs only adds time); ratios_median: of medians "
                      "other jobs, which slow single runs)",
        },
        "ratios": ratios,
        "ratios_median": main["ratios_median"],
        "targets": _targets(device.type, opts.amp, ratios, main["ratios_median"], projection),
        "loader": loader,
        "projection": projection,
        "groups": groups_out,
        "elapsed_s": time.perf_counter() - started,
    }
    (opts.out / "bench.json").write_text(json.dumps(report, indent=2))
    (opts.out / "bench.md").write_text(render_markdown(report))
    return report


def _projection(ivpt: dict | None, loader: dict | None) -> dict | None:
    """:func:`project` from the main group's ivpt (minimum times) and the faster loader path."""
    if not ivpt or ivpt.get("train_ms_per_image") is None:
        return None
    from .loader import LOADER_PATHS

    paths = [p for p in LOADER_PATHS if loader and p in loader]
    best = max(paths, key=lambda p: loader[p]["images_per_s"], default=None)  # type: ignore[index]
    out = project(ivpt["train_ms_per_image"], ivpt["forward_ms_per_image"],
                  loader[best]["images_per_s"] if best else None)  # type: ignore[index]
    out["loader_path"] = best
    return out


def _targets(device_type: str, amp: str, ratios: dict, ratios_median: dict, projection: dict | None) -> dict:
    """Each target of :func:`targets` with what was measured (ratios of minima [medians], projection) and whether
    it is met."""
    out = {}
    for name, bound in targets(device_type, amp).items():
        ((kind, value),) = bound.items()
        measured = ratios.get(name, (projection or {}).get(name))
        met = measured is not None and (measured <= value if kind == "max" else measured >= value)
        out[name] = {kind: value, "measured": measured, "measured_median": ratios_median.get(name), "met": met}
    return out


def _loader_lines(loader: dict | None, projection: dict | None) -> list[str]:
    """The loader and projection sections of the markdown report."""
    lines = []
    if loader:
        st = loader["settings"]
        lines += ["", (f"## Training DataLoader ({st['workers']} workers, batch {st['batch']}, {st['img_size']} px crops "
                       f"from {st['image_size']} px JPEGs, paper augmentation, to the device)"), ""]
        lines += [f"- {path}: {loader[path]['images_per_s']:.0f} images/s ({loader[path]['images']} images in "
                  f"{loader[path]['seconds']:.2f} s)" for path in loader if path != "settings"]
    if projection:
        via = f", loader path {projection['loader_path']}" if projection.get("loader_path") else ", no loader measured"
        lines += ["", f"## Projection: the paper recipe on CUB at this config (bound by the {projection['bound_by']}"
                      f"{via})", "",
                  f"{projection['formula']}; end to end {projection['train_images_per_s']:.0f} training images/s."]
    return lines


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "–" if value is None else format(value, spec)


def _both(group: dict, label: str, ratio: str) -> str:
    """"min-ratio [median-ratio]" of ``label`` in a report group."""
    key = f"{label}_{ratio}"
    return f"{_fmt(group['ratios'].get(key), '.2f')} [{_fmt(group['ratios_median'].get(key), '.2f')}]"


def render_markdown(report: dict) -> str:
    """Markdown tables of a :func:`run_bench` report."""
    m, s = report["machine"], report["settings"]
    lines = [
        f"# ivpt bench — {m['device']} ({m['device_name']}), torch {m['torch']}, {m['threads']} threads",
        "",
        (f"Backbone `{s['backbone']}` (random weights), {s.get('precision', 'fp32')}, batch {s['batch']}, "
         f"{s['repeats']} interleaved "
         f"runs. Trainable set: {s['trainable_set']}. Load average at start/end: {report['load_average_start']} / "
         f"{report['load_average_end']} on {m['cpu_count']} CPUs: bursts of load from other jobs slow single runs; "
         "interleaving spreads them over all models, and ratios of minimum times are the least affected."),
        "",
    ]
    main = report["groups"][0]
    lines += [
        f"## All kinds at {main['img_size']} px, n_pro={main['n_pro']}",
        "",
        ("Times are minima over the runs; ratios of minima [of medians in brackets]. Time per image = batch time "
         "/ batch; a train step of ivpt and "
         "last_layer_parts forwards and backwards the clean and the warped batch together, as the trainer does."),
        "",
        ("| model | trainable params | forward ms/img | × backbone | train step ms/img | × vpt_deep "
         "| × backbone fwd | forward peak MB | train peak MB |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in main["models"].items():
        fwd = _both(main, label, "forward_vs_backbone") if label != BACKBONE else "1"
        trains = r["train_median_s"] is not None
        train = "–" if not trains else "1" if label == "vpt_deep" else _both(main, label, "train_step_vs_vpt_deep")
        vs_forward = _both(main, label, "train_step_vs_backbone_forward") if trains else "–"
        lines.append(
            f"| {label} | {r['trainable_params']:,} | {_fmt(r['forward_ms_per_image'])} | {fwd} | "
            f"{_fmt(r['train_ms_per_image'])} | {train} | {vs_forward} | {_fmt(r.get('forward_peak_mb'), '.0f')} | "
            f"{_fmt(r.get('train_peak_mb'), '.0f')} |"
        )
    lines += ["", "Targets:"]
    for k, t in report["targets"].items():
        verdict = "met" if t["met"] else "MISSED"
        bound = f"≤ {t['max']}" if "max" in t else f"≥ {t['min']}"
        median = f" [{_fmt(t['measured_median'], '.2f')}]" if t.get("measured_median") is not None else ""
        lines.append(f"- {k}: {_fmt(t['measured'], '.2f')}{median} (target {bound}) — {verdict}")
    ivpt = main["models"].get("ivpt", {})
    if ivpt.get("train_host_syncs") is not None:
        lines += ["", (f"Host syncs (the host waiting for the device): {ivpt['train_host_syncs']} per ivpt train step, "
                       f"{ivpt.get('forward_host_syncs')} per eval forward (fp16 steps: the GradScaler's one read).")]
    lines += _loader_lines(report.get("loader"), report.get("projection"))
    phases = main["models"].get("ivpt", {}).get("train_phases")
    if phases:
        unit = "device" if m["device"].startswith("cuda") else "host"
        lines += ["", f"## Where an ivpt train step's time goes ({unit} self time by phase, one profiled step)", "",
                  "| phase | ms | share | host ms |", "|---|---:|---:|---:|"]
        lines += [f"| {r['phase']} | {r['ms']:.2f} | {100 * r['share']:.1f} % | {r['host_ms']:.2f} |" for r in phases]
    growth = report["groups"][1:]
    if growth:
        lines += [
            "",
            "## Growth",
            "",
            ("| group | n_pro | px | backbone fwd ms/img | ivpt fwd ms/img | × backbone | vpt_deep train ms/img "
             "| ivpt train ms/img | × vpt_deep | ivpt train peak MB |"),
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for g in growth:
            mm = g["models"]
            lines.append(
                f"| {g['name']} | {','.join(map(str, g['n_pro']))} | {g['img_size']} | "
                f"{_fmt(mm[BACKBONE]['forward_ms_per_image'])} | {_fmt(mm['ivpt']['forward_ms_per_image'])} | "
                f"{_both(g, 'ivpt', 'forward_vs_backbone')} | "
                f"{_fmt(mm['vpt_deep']['train_ms_per_image'])} | {_fmt(mm['ivpt']['train_ms_per_image'])} | "
                f"{_both(g, 'ivpt', 'train_step_vs_vpt_deep')} | "
                f"{_fmt(mm['ivpt'].get('train_peak_mb'), '.0f')} |"
            )
    lines += ["", f"Elapsed: {report['elapsed_s']:.0f} s.", ""]
    return "\n".join(lines)
