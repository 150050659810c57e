"""Arguments and helpers shared by several subcommands."""
from __future__ import annotations

import argparse

from ..config import Config, load_config


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (see configs/); defaults apply without one")
    parser.add_argument(
        "overrides", nargs="*", metavar="section.field=value",
        help="dotted overrides applied after the file, e.g. model.n_pro=17,14,11,8,5 optim.epochs=5",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)
