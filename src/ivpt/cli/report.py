"""``ivpt report CHECKPOINT --data ROOT --out DIR``: one self-contained HTML page (``DIR/index.html``) with the
metrics, training curves, dataset-level concept hierarchy, prototype galleries and explained test images."""
from __future__ import annotations

import argparse

from .common import add_checkpoint_arguments, non_negative_int, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a pretrained folder (config.json + model.safetensors), e.g. RUN/best")
    parser.add_argument("--data", help="dataset root (default: data.root of the run that wrote the checkpoint)")
    parser.add_argument("--out", required=True, help="output folder for index.html")
    parser.add_argument("--split", default="test", choices=["train", "test"], help="dataset split (default test)")
    parser.add_argument("--samples", type=positive_int, default=8, help="explained images shown (default 8)")
    parser.add_argument("--eval", dest="eval_file", help="eval.json to show (default: CHECKPOINT/../eval.json)")
    parser.add_argument("--log", help="training log.csv (default: CHECKPOINT/../log.csv)")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="use only the first N images for the hierarchy and galleries (default: all)")
    parser.add_argument("--gallery-topk", type=positive_int, default=8, help="patches per concept in the galleries")
    add_checkpoint_arguments(parser)
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--workers", type=non_negative_int, default=0, help="data loader worker processes")
    parser.add_argument("--allow-backbone-mismatch", action="store_true",
                        help="load even if the backbone weights differ from those the checkpoint was trained on")


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import check_output_folder
    from ..explain.report import report_checkpoint

    check_output_folder(args.out)  # before the passes over the dataset
    path = report_checkpoint(
        args.checkpoint, args.out, data_root=args.data, split=args.split, samples=args.samples,
        eval_file=args.eval_file, log_file=args.log, limit=args.limit, gallery_topk=args.gallery_topk,
        weights=args.weights, device=args.device, batch_size=args.batch_size, num_workers=args.workers,
        allow_backbone_mismatch=args.allow_backbone_mismatch,
    )
    print(f"written {path}")
    return 0
