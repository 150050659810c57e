"""``ivpt train``: train from a YAML config with dotted overrides; ``--resume DIR`` continues a run exactly.

``--out DIR`` starts a new run and refuses a folder that already holds one (any of config.yaml, log.csv, last.pt,
best/, metrics.json, ...). ``--resume DIR`` continues with the run's own config (DIR/config.yaml) plus the dotted
overrides; a ``--config`` given with it must say the same (else the differing keys are named), and ``--out``, if
given, must be DIR. SIGTERM / SIGINT stop at the next step boundary with last.pt saved (exit 128 + the signal).

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
    parser.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last.pt, with its config "
                                                        "and the dotted overrides")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from ..config import config_changes
    from ..engine import TrainingError, TrainingStopped, check_resumable, has_started_starts, train
    from ..runs import run_config

    if args.resume:
        out = Path(args.resume)
        if args.out and Path(args.out).resolve() != out.resolve():
            raise TrainingError(f"--resume {out} continues the run in {out} (a run stays in its folder), but --out "
                                f"{args.out} names another folder; drop --out")
        if not has_started_starts(out):
            check_resumable(out)
        cfg, _ = run_config(out, args.overrides)  # e.g. more epochs; the trainer refuses inexact changes
        if args.config:
            changed = config_changes(cfg, config_from_args(args))
            if changed:
                raise TrainingError(
                    f"--config {args.config} differs from the config of {out} in {', '.join(changed)}; --resume "
                    f"continues with {out / 'config.yaml'}: drop --config and give changes as overrides (key=value)")
    else:
        if not args.out:
            print("error: --out DIR is required (or --resume DIR)", file=sys.stderr)
            return 2
        out = Path(args.out)
        cfg = config_from_args(args)
    try:
        metrics = train(cfg, out, resume=bool(args.resume), progress=not args.no_progress, new_run=not args.resume)
    except TrainingStopped as stop:
        print(str(stop), file=sys.stderr)
        return 128 + stop.signum
    print(json.dumps(metrics, indent=2))
    return 0
