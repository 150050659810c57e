"""``ivpt synth OUT``: write a synthetic part-world (see :mod:`ivpt.data.synth`) in the CUB-200-2011 layout, so that
every command that reads CUB (train, eval, explain) can run on it."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..data.synth import DIFFICULTIES, MAX_CLASSES
from .common import non_negative_int, number_in, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="output folder (created; must not already hold a dataset unless --overwrite)")
    parser.add_argument("--classes", type=number_in(f"[2, {MAX_CLASSES}]", "10"), default=10,
                        help=f"number of classes (2..{MAX_CLASSES}, default 10)")
    parser.add_argument("--per-class", type=positive_int, default=40, help="images per class (default 40)")
    parser.add_argument("--size", type=number_in(">= 16", "224"), default=224,
                        help="image side in pixels, at least 16 (default 224)")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="the same seed writes the same bytes (default 0)")
    parser.add_argument("--test-fraction", type=number_in("[0, 1]", "0.5", integer=False), default=0.5,
                        help="fraction of each class in the test split (default 0.5)")
    parser.add_argument("--difficulty", choices=DIFFICULTIES, default="standard",
                        help="nuisance level (default standard; its bytes never change). hard: rotation +-60 deg, "
                             "smaller and off-centre birds, layered textured backgrounds, distractors in part "
                             "colours, more and thicker branches in front, lighting gradient, colour cast, blur. "
                             "medium: the same kinds, milder")
    parser.add_argument("--workers", type=positive_int, default=1, help="processes rendering images (default 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in OUT")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import OutputError
    from ..data.synth import make_partworld

    start = time.perf_counter()
    try:
        out = make_partworld(
            Path(args.out), classes=args.classes, per_class=args.per_class, size=args.size, seed=args.seed,
            test_fraction=args.test_fraction, workers=args.workers, progress=not args.no_progress,
            overwrite=args.overwrite, difficulty=args.difficulty,
        )
    except FileExistsError as exc:  # one line and exit 2 through ivpt.cli.main (--debug: the traceback)
        raise OutputError(str(exc)) from exc
    seconds = time.perf_counter() - start
    n = args.classes * args.per_class
    kind = f", {args.difficulty}" if args.difficulty != "standard" else ""
    print(f"wrote {n} images ({args.classes} classes x {args.per_class}, {args.size}px{kind}) in {seconds:.1f}s "
          f"({n / max(seconds, 1e-9):.0f} images/s) to {out}")
    return 0
