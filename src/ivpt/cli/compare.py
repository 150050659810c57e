"""``ivpt compare``: train model kinds x seeds under one config, evaluate each with one protocol, and write the
paper's Table 1 (``compare.md``), ``compare.json`` and a top-1 vs consistency plot; ``--tabulate`` builds the same
from existing run folders (see :mod:`ivpt.compare`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_config_arguments, config_from_args, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..config import MODEL_KINDS

    add_config_arguments(parser)
    parser.add_argument("--out", required=True,
                        help="comparison folder: runs/<kind>-seed<k>/, compare.json, compare.md, compare.png/.svg; "
                             "running again reuses finished runs and resumes interrupted ones")
    parser.add_argument("--kinds", default=",".join(MODEL_KINDS),
                        help=f"comma-separated model kinds (default: all of {','.join(MODEL_KINDS)})")
    parser.add_argument("--seeds", default="0", help="comma-separated train.seed values, e.g. 0,1,2 (default 0)")
    parser.add_argument("--tabulate", nargs="+", metavar="RUN_DIR",
                        help="build the comparison from these finished run folders (config.yaml + eval.json) "
                             "without training")
    parser.add_argument("--jobs", type=positive_int, default=1,
                        help="runs trained at once, each in its own process (default 1); on a GPU, small runs "
                             "share it better several at a time")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from ..compare import CompareError, compare, format_markdown, tabulate

    out = Path(args.out)
    if args.tabulate:
        if args.config or args.overrides:
            raise CompareError("--tabulate reads the runs' own configs; drop --config and the overrides")
        result = tabulate(args.tabulate, out)
    else:
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            raise CompareError(f"--seeds {args.seeds!r} must be comma-separated integers, e.g. 0,1,2") from None
        kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
        result = compare(config_from_args(args), out, kinds=kinds, seeds=seeds, progress=not args.no_progress,
                         jobs=args.jobs)
    print(format_markdown(result))
    print(f"written {out / 'compare.json'}, {out / 'compare.md'}, {out / 'compare.png'}, {out / 'compare.svg'}")
    return 0
