"""``ivpt eval CHECKPOINT --data ROOT``: accuracy and interpretability metrics → ``OUT/eval.json`` + a table."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..config import EVAL_PROTOCOLS
    from ..eval import ALL_METRICS, DEFAULT_METRICS

    parser.add_argument("checkpoint", help="a pretrained folder (config.json + model.safetensors), e.g. RUN/best")
    parser.add_argument("--data", help="dataset root (default: data.root of the run that wrote the checkpoint)")
    parser.add_argument("--split", default="test", choices=["train", "test"])
    parser.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                        help=f"comma-separated subset of {','.join(ALL_METRICS)} (default: "
                             f"{','.join(DEFAULT_METRICS)}; ivpt.eval.registry describes them)")
    parser.add_argument("--stage", default=None,
                        help="stage for consistency/stability etc.: auto (n_pro[-3]), final or an index")
    parser.add_argument("--protocol", default=None, choices=EVAL_PROTOCOLS,
                        help="how interpretability scores are measured: corrected (ours) or reference (the authors' "
                             "code); default: eval.protocol of the run (docs/deviations.md)")
    parser.add_argument("--out", help="folder for eval.json (default: the checkpoint's run folder)")
    parser.add_argument("--weights", default=None, help="override the backbone weight source")
    parser.add_argument("--batch-size", type=positive_int, default=None)
    parser.add_argument("overrides", nargs="*", metavar="section.field=value",
                        help="config overrides, e.g. eval.half_size=36 data.format=cub")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--allow-backbone-mismatch", action="store_true",
                        help="evaluate even if the backbone weights differ from those the checkpoint was trained on")


def run(args: argparse.Namespace) -> int:
    from .. import runtime as R
    from ..checkpoint import atomic_write_text, check_output_folder_all_ranks
    from ..config import ConfigError
    from ..eval import evaluate_checkpoint, format_table
    from ..runs import run_config

    checkpoint = Path(args.checkpoint)
    extra = list(args.overrides)
    if args.data:
        extra.append(f"data.root={args.data}")
    if args.stage is not None:
        extra.append(f"eval.stage={args.stage}")
    if args.protocol is not None:
        extra.append(f"eval.protocol={args.protocol}")
    if args.batch_size:
        extra.append(f"eval.batch_size={args.batch_size}")
    cfg, meta = run_config(checkpoint, extra)
    if not cfg.data.root:
        raise ConfigError("no dataset: pass --data ROOT")
    out = Path(args.out) if args.out else checkpoint.parent
    info = R.setup(cfg.train.device)  # joins the process group under torchrun: each rank takes a shard
    try:
        check_output_folder_all_ranks(out, info)  # before the evaluation, so a read-only folder costs nothing
        result = evaluate_checkpoint(checkpoint, cfg, meta, weights=args.weights, split=args.split,
                                     allow_backbone_mismatch=args.allow_backbone_mismatch,
                                     metrics=[m for m in args.metrics.split(",") if m], info=info,
                                     progress=not args.no_progress)
    finally:
        R.teardown()
    if not info.is_main:
        return 0
    print(format_table(result))  # printed first: a failing write must not lose the numbers
    atomic_write_text(out / "eval.json", json.dumps(result, indent=2))
    print(f"written {out / 'eval.json'}")
    return 0
