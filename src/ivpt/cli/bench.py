"""``ivpt bench``: forward and training-step speed and peak memory of every model kind against the plain frozen
backbone, measured interleaved on this machine, the training DataLoader's images/s and the projected paper recipe;
writes ``OUT/bench.json`` and ``OUT/bench.md``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import non_negative_int, number_in, positive_int, whole_numbers


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="folder for bench.json and bench.md")
    parser.add_argument("--quick", action="store_true",
                        help="only every kind at --img-size with 3 repeats (about 2 min for ViT-S/14 on 2 CPU cores)")
    parser.add_argument("--backbone", default="vit_small_patch14_dinov2", help="timm VisionTransformer name")
    parser.add_argument("--batch", type=positive_int, default=8, help="images per batch (default 8)")
    parser.add_argument("--img-size", type=positive_int, default=224,
                        help="image size of the main comparison (default 224)")
    parser.add_argument("--sizes", type=whole_numbers(">= 1", "224,336"), default=[224, 336, 448, 518],
                        help="image sizes of the growth table (full run; default 224,336,448,518)")
    parser.add_argument("--stages", type=whole_numbers(">= 2", "2,3"), default=[2, 3, 4, 5], metavar="COUNTS",
                        help="n_pro lengths of the stage-growth table (full run; default 2,3,4,5)")
    parser.add_argument("--n-pro", type=whole_numbers(">= 2", "17,14,11,8,5", at_least=2),
                        default=[17, 14, 11, 8, 5], help="prototype counts (default paper)")
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help="timed rounds (default 3 with --quick, else 7)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"],
                        help="autocast precision of every forward and train step (default none: fp32)")
    parser.add_argument("--workers", type=non_negative_int, default=None,
                        help="training DataLoader workers for the loader measurement (default min(16, CPUs))")
    parser.add_argument("--loader-images", type=positive_int, default=None,
                        help="synthetic images the loader measurement reads (default 64 with --quick, else 512)")
    parser.add_argument("--loader-image-size", type=positive_int, default=500,
                        help="side of the synthetic JPEGs in px (default 500, about CUB's 500x375)")
    parser.add_argument("--no-loader", action="store_true", help="skip the DataLoader measurement")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default: torch's choice, one per physical core)")
    parser.add_argument("--frozen-tokens", action="store_true",
                        help="freeze pos/cls/reg tokens in every kind (default: the paper's set, they train)")
    parser.add_argument("--variants", action="store_true",
                        help="also time ivpt with one view, ivpt and vpt_deep with frozen tokens")
    parser.add_argument("--profile", action="store_true",
                        help="write torch.profiler tables of one ivpt and one vpt_deep train step and report where "
                             "ivpt's step time goes, by phase")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile every model (the path of train.compile); times the backbone, ivpt and "
                             "vpt_deep only")
    # For tests: JSON keyword arguments for timm.create_model (e.g. a tiny ViT).
    parser.add_argument("--backbone-kwargs", type=json.loads, default={}, help=argparse.SUPPRESS)
    parser.add_argument("--num-classes", type=number_in(">= 2", "200"), default=200, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    from ..bench import BenchOptions, run_bench
    from ..runtime import resolve_device

    resolve_device(args.device)  # a device this machine lacks: one line before anything is written
    opts = BenchOptions(
        out=args.out, quick=args.quick, backbone=args.backbone, backbone_kwargs=args.backbone_kwargs,
        batch=args.batch, img_size=args.img_size, n_pro=args.n_pro, num_classes=args.num_classes,
        train_tokens=not args.frozen_tokens, sizes=args.sizes, stage_counts=args.stages, repeats=args.repeats,
        device=args.device, threads=args.threads, memory=not args.no_memory, variants=args.variants,
        profile=args.profile, compile=args.compile,
        amp=args.amp, loader=not args.no_loader, workers=args.workers, loader_images=args.loader_images,
        loader_image_size=args.loader_image_size,
    )
    report = run_bench(opts, log=lambda s: print(s, file=sys.stderr, flush=True))
    print((args.out / "bench.md").read_text())
    return 0 if report["ratios"] else 1
