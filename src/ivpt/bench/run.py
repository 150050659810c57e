"""``run_bench``: measure every group of a plan, then write ``bench.json`` and ``bench.md`` (see
:mod:`ivpt.bench`)."""
from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable

import torch

from ..runtime import resolve_device
from .measure import time_group
from .options import BenchOptions, plan
from .report import _group_ratios, _projection, _summarise, _targets, render_markdown


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
            "amp": opts.amp, "compile": opts.compile,
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
