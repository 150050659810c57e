"""``ivpt train``: train from a YAML config with dotted overrides; ``--resume DIR`` continues a run exactly.

Works the same alone (``ivpt train ...``) and under ``torchrun --nproc_per_node=K -m ivpt.cli train ...``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--out", help="run folder (config.yaml, log.csv, last.pt, best/, metrics.json)")
    parser.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last.pt")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from ..engine import load_run_config, train

    if args.resume:
        out = Path(args.resume)
        if not (out / "last.pt").is_file():
            print(f"error: {out / 'last.pt'} not found; nothing to resume", file=sys.stderr)
            return 2
        cfg = load_run_config(out)
        if args.overrides:
            cfg = cfg.with_overrides(args.overrides)  # e.g. more epochs; the trainer refuses inexact changes
    else:
        if not args.out:
            print("error: --out DIR is required (or --resume DIR)", file=sys.stderr)
            return 2
        out = Path(args.out)
        if (out / "last.pt").exists():
            print(f"error: {out} already holds a run; use --resume {out} or another --out", file=sys.stderr)
            return 2
        cfg = config_from_args(args)
    metrics = train(cfg, out, resume=bool(args.resume), progress=not args.no_progress)
    print(json.dumps(metrics, indent=2))
    return 0
