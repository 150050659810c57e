"""``ivpt info``: what a config builds, before any training — stages, parameter counts and groups, as JSON."""
from __future__ import annotations

import argparse
import json

from .common import add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "--weights", default=None,
        help="backbone weight source for this summary; 'random' needs no download (default: model.weights)",
    )


def summarise(model, cfg) -> dict:
    """JSON-ready summary of a built model under ``cfg`` (a full :class:`ivpt.config.Config`)."""
    o = cfg.optim
    groups = model.param_groups(o.base_lr, o.head_lr_mult, o.concept_lr_mult)
    summary = {
        "kind": cfg.model.kind,
        "backbone": cfg.model.backbone,
        "img_size": cfg.model.img_size,
        "depth": len(model.backbone.blocks),
        "embed_dim": model.backbone.embed_dim,
        "num_prefix_tokens": model.backbone.num_prefix_tokens,
        "num_classes": cfg.model.num_classes,
    }
    if cfg.model.kind == "ivpt":
        m = cfg.model.num_stages
        summary["num_coarse"] = cfg.model.num_coarse
        summary["stages"] = [
            {
                "stage": i,
                "n_pro": n,
                "foreground": n - 1,
                "feeds": f"input of block {model.first_prompted + i}" if i < m else "classifier (output of last block)",
                "prompt_tokens": cfg.model.num_coarse if i < m else 0,
            }
            for i, n in enumerate(cfg.model.n_pro)
        ]
    summary["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    summary["total_params"] = sum(p.numel() for p in model.parameters())
    summary["param_groups"] = [
        {"name": g["name"], "lr": g["lr"], "params": sum(p.numel() for p in g["params"])} for g in groups
    ]
    return summary


def run(args: argparse.Namespace) -> int:
    from ..model import create_model

    cfg = config_from_args(args)
    model = create_model(cfg.model, weights=args.weights)
    print(json.dumps(summarise(model, cfg), indent=2))
    return 0
