"""IVPT eval-mode forward vs the plain timm ``forward_features`` of the same backbone, measured side by side.

    python benchmarks/forward_overhead.py [--backbone vit_small_patch14_dinov2] [--img-size 224] [--batch 8]

Runs alternate between the two models (A B A B ...) so machine noise hits both alike; prints medians and the ratio.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default="vit_small_patch14_dinov2")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--amp", choices=["none", "bf16"], default="none")
    args = p.parse_args()

    from ivpt.config import IVPTConfig
    from ivpt.models import IVPT

    torch.manual_seed(0)
    model = IVPT(IVPTConfig(backbone=args.backbone, img_size=args.img_size, weights="random",
                            deep_prompts=False)).eval()  # the concept prompts alone, as docs/speed.md reports
    backbone = model.backbone
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.amp == "bf16" else torch.no_grad
    runs = {"backbone": lambda: backbone.forward_features(x), "ivpt": lambda: model(x)}
    times = {k: [] for k in runs}
    with torch.no_grad():
        for fn in runs.values():  # warm-up
            with ctx():
                fn()
        for _ in range(args.repeats):
            for name, fn in runs.items():
                t = time.perf_counter()
                with ctx():
                    fn()
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({
        "backbone": args.backbone, "img_size": args.img_size, "batch": args.batch, "amp": args.amp,
        "threads": torch.get_num_threads(),
        "median_s": med, "ivpt_forward_vs_backbone": med["ivpt"] / med["backbone"],
    }, indent=2))


if __name__ == "__main__":
    main()
