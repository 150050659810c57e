"""``ivpt report CHECKPOINT --data ROOT --out DIR``: one self-contained HTML page (``DIR/index.html``) with the
metrics, training curves, dataset-level concept hierarchy, prototype galleries and explained test images."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a pretrained folder (config.json + model.safetensors), e.g. RUN/best")
    parser.add_argument("--data", help="dataset root (default: data.root of the run that wrote the checkpoint)")
    parser.add_argument("--out", required=True, help="output folder for index.html")
    parser.add_argument("--split", default="test", choices=["train", "test"], help="dataset split (default test)")
    parser.add_argument("--samples", type=int, default=8, help="explained images shown (default 8)")
    parser.add_argument("--eval", dest="eval_file", help="eval.json to show (default: CHECKPOINT/../eval.json)")
    parser.add_argument("--log", help="training log.csv (default: CHECKPOINT/../log.csv)")
    parser.add_argument("--limit", type=int, default=None,
                        help="use only the first N images for the hierarchy and galleries (default: all)")
    parser.add_argument("--gallery-topk", type=int, default=8, help="patches per concept in the galleries")
    parser.add_argument("--weights", default=None,
                        help="backbone weight source (default: the checkpoint's model.weights; 'random' for tests)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0, help="data loader worker processes")


def open_dataset(cfg, root: str, split: str):
    """The ``split`` of the dataset at ``root`` in the run's format, with the deterministic eval transform."""
    from ..data import build_eval_transform, open_dataset

    return open_dataset(cfg.data, split, build_eval_transform(cfg.data, cfg.model.img_size), root=root)


def run(args: argparse.Namespace) -> int:
    from ..data import DatasetError
    from ..explain.charts import read_log
    from ..explain.report import build_report, read_metrics
    from .explain import class_names_of, load_checkpoint

    checkpoint = Path(args.checkpoint)
    try:
        model, cfg, meta = load_checkpoint(checkpoint, weights=args.weights, device=args.device)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    root = args.data or cfg.data.root
    if not root:
        print("error: no dataset: pass --data ROOT", file=sys.stderr)
        return 2
    try:
        dataset = open_dataset(cfg, root, args.split)
    except (DatasetError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run_dir = checkpoint.resolve().parent
    eval_file = Path(args.eval_file) if args.eval_file else run_dir / "eval.json"
    if not eval_file.is_file() and not args.eval_file:
        eval_file = run_dir / "metrics.json"  # the trainer's test accuracy, when no evaluation was run
    log_file = Path(args.log) if args.log else run_dir / "log.csv"
    names = class_names_of(meta, cfg.model.num_classes) or list(getattr(dataset, "class_names", []) or []) or None
    m = cfg.model
    subtitle = (f"{checkpoint} · {m.backbone} at {m.img_size}px · n_pro {','.join(map(str, m.n_pro))} · "
                f"{m.num_classes} classes · {args.split} split of {root} ({len(dataset)} images)")
    path = build_report(
        model, dataset, args.out,
        metrics=read_metrics(eval_file),
        log=read_log(log_file) if log_file.is_file() else None,
        samples=args.samples, class_names=names, title=f"IVPT report — {checkpoint.resolve().parent.name}",
        subtitle=subtitle, batch_size=args.batch_size, num_workers=args.workers, limit=args.limit,
        gallery_topk=args.gallery_topk, mean=cfg.data.mean, std=cfg.data.std,
    )
    print(f"written {path}")
    return 0
