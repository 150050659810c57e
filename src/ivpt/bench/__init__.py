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

from ..config import Config, LossConfig, ModelConfig
from ..runtime import resolve_device

__all__ = ["BenchOptions", "Entry", "Group", "render_markdown", "run_bench"]

KINDS = ("ivpt", "linear", "vpt_shallow", "vpt_deep", "last_layer_parts")
BACKBONE = "backbone"  # label of the plain timm forward_features reference
TARGETS = {"ivpt_forward_vs_backbone": 1.15, "ivpt_train_step_vs_vpt_deep": 1.8}


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
    profile: bool = False  # torch.profiler tables of one ivpt and one vpt_deep train step

    @property
    def n_repeats(self) -> int:
        return self.repeats if self.repeats is not None else (3 if self.quick else 7)


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
        backbone_kwargs=dict(opts.backbone_kwargs),
    )
    model = dataclasses.replace(model, **entry.model)
    return Config(model=model, loss=dataclasses.replace(LossConfig(), **entry.loss))


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
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(opts.batch, 3, group.img_size, group.img_size, generator=gen).to(device)
        self.y = torch.randint(0, opts.num_classes, (opts.batch,), generator=gen).to(device)

    def forward(self) -> None:
        """Eval-mode, no-grad forward of the batch."""
        with torch.no_grad():
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
        total.backward()
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.optim.grad_clip)
        self.optimizer.step()
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
    for i in range(opts.n_repeats):
        for label, mode in order:
            result[label].setdefault(f"{mode}_s", []).append(_timed(runners[label].work(mode), device))
        log(f"  {group.name}: round {i + 1}/{opts.n_repeats} done")
    if opts.profile and group.name == "main":
        _profile(runners, opts.out, device, log)
    return result


def _profile(runners: dict[str, _Runner], out: Path, device: torch.device, log: Callable[[str], None]) -> None:
    """Write torch.profiler operator tables of one train step of ivpt and vpt_deep to ``out``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for label in ("ivpt", "vpt_deep"):
        if label not in runners:
            continue
        with profile(activities=activities) as prof:
            runners[label].train_step()
            _sync(device)
        table = prof.key_averages().table(sort_by=sort, row_limit=30)
        (out / f"profile_{label}_train.txt").write_text(table)
        log(f"  wrote {out / f'profile_{label}_train.txt'}")


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
        row.update({k: v for k, v in r.items() if k.endswith("_peak_mb")})
        models[label] = row
    return models


def _ratio(models: dict, a: str, b: str, mode: str, stat: str) -> float | None:
    x = models.get(a, {}).get(f"{mode}_{stat}_s")
    y = models.get(b, {}).get(f"{mode}_{stat}_s")
    return None if x is None or y is None else x / y


def _group_ratios(models: dict, stat: str) -> dict[str, float]:
    """Forward time of every model / backbone and train-step time / vpt_deep's, from ``stat`` ("median"/"min")."""
    ratios = {}
    for label in ["ivpt"] + [m for m in models if m not in (BACKBONE, "ivpt")]:
        ratios[f"{label}_forward_vs_backbone"] = _ratio(models, label, BACKBONE, "forward", stat)
        if label != "vpt_deep":
            ratios[f"{label}_train_step_vs_vpt_deep"] = _ratio(models, label, "vpt_deep", "train", stat)
    return {k: v for k, v in ratios.items() if v is not None}


def _machine(device: torch.device) -> dict:
    import timm

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {
        "device": str(device), "device_name": name, "torch": torch.__version__, "timm": timm.__version__,
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
        machine = _machine(device)
    finally:
        torch.set_num_threads(threads_before)  # a library call must not change the caller's thread count
    main = groups_out[0]
    ratios = main["ratios"]
    report = {
        "schema": 1,
        "quick": opts.quick,
        "machine": machine,
        "load_average_start": load_start,
        "load_average_end": _loadavg(),
        "settings": {
            "backbone": opts.backbone, "backbone_kwargs": opts.backbone_kwargs, "weights": "random",
            "batch": opts.batch, "img_size": opts.img_size, "n_pro": opts.n_pro, "num_prompts": opts.num_prompts,
            "num_classes": opts.num_classes, "repeats": opts.n_repeats, "train_tokens": opts.train_tokens,
            "trainable_set": (
                "paper (model.train_tokens=true): pos_embed, cls_token, reg_token train in ivpt, vpt_shallow, vpt_deep "
                "and last_layer_parts; the linear probe keeps them frozen"
                if opts.train_tokens else "tokens frozen (model.train_tokens=false) in every kind"
            ),
            "train_step": "trainer compute_loss (ivpt / last_layer_parts: clean + warped view in one forward, all loss "
                          "weights 1) + backward + grad-norm clip 2.0 + Adam step; time per image = step / batch",
            "forward": "eval mode, torch.no_grad; backbone = timm forward_features",
            "memory": ("peak of the first (warm-up) run above what was allocated before it, in MB: "
                       + ("torch.cuda.max_memory_allocated delta" if device.type == "cuda" else
                          "resident-set high-water mark (VmHWM, reset via /proc/self/clear_refs after malloc_trim) "
                          "minus the resident set before the run; includes allocator slack (a few MB)")),
            "ratios": "ratio of minimum times (load from other jobs only adds time); ratios_median: of medians "
                      "other jobs, which slow single runs)",
        },
        "ratios": ratios,
        "ratios_median": main["ratios_median"],
        "targets": {k: {"max": v, "measured": ratios.get(k), "measured_median": main["ratios_median"].get(k),
                        "met": ratios.get(k) is not None and ratios[k] <= v} for k, v in TARGETS.items()},
        "groups": groups_out,
        "elapsed_s": time.perf_counter() - started,
    }
    (opts.out / "bench.json").write_text(json.dumps(report, indent=2))
    (opts.out / "bench.md").write_text(render_markdown(report))
    return report


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
        (f"Backbone `{s['backbone']}` (random weights), batch {s['batch']}, {s['repeats']} interleaved "
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
         "| forward peak MB | train peak MB |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in main["models"].items():
        fwd = _both(main, label, "forward_vs_backbone") if label != BACKBONE else "1"
        train = "–" if r["train_median_s"] is None else "1" if label == "vpt_deep" else _both(
            main, label, "train_step_vs_vpt_deep")
        lines.append(
            f"| {label} | {r['trainable_params']:,} | {_fmt(r['forward_ms_per_image'])} | {fwd} | "
            f"{_fmt(r['train_ms_per_image'])} | {train} | {_fmt(r.get('forward_peak_mb'), '.0f')} | "
            f"{_fmt(r.get('train_peak_mb'), '.0f')} |"
        )
    lines += ["", "Targets:"]
    for k, t in report["targets"].items():
        verdict = "met" if t["met"] else "MISSED"
        lines.append(f"- {k}: {_fmt(t['measured'], '.2f')} [{_fmt(t['measured_median'], '.2f')}] "
                     f"(target ≤ {t['max']}) — {verdict}")
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
