"""What a bench run reports: per-model summaries and ratios, the projection of the paper recipe, the targets
check and the markdown tables (see :mod:`ivpt.bench`)."""
from __future__ import annotations

import statistics

from .options import BACKBONE, CUB_TEST_IMAGES, CUB_TRAIN_IMAGES, PAPER_EPOCHS, targets


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
        lines += ["", (f"## Training DataLoader ({st['workers']} workers, batch {st['batch']}, "
                       f"{st['img_size']} px crops from {st['image_size']} px JPEGs, paper augmentation, "
                       "to the device)"), ""]
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
        (f"Backbone `{s['backbone']}` (random weights), {s.get('precision', 'fp32')}"
         f"{', every model under torch.compile' if s.get('compile') else ''}, batch {s['batch']}, "
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
