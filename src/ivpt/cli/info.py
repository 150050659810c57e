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


def run(args: argparse.Namespace) -> int:
    from ..models import create_model, describe

    cfg = config_from_args(args)
    model = create_model(cfg.model, weights=args.weights)
    print(json.dumps(describe(model, cfg), indent=2))
    return 0
