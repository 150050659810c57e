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


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (a count, a size, a batch); anything else is argparse's usage error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number, e.g. 8") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive whole number, e.g. 8")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: a whole number >= 0 (e.g. data loader workers, where 0 means none)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number, e.g. 0") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is not a whole number >= 0, e.g. 0")
    return value
