"""Arguments and helpers shared by several subcommands."""
from __future__ import annotations

import argparse
from typing import Callable

from ..config import Bounds, Config, load_config


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (see configs/); defaults apply without one")
    parser.add_argument(
        "overrides", nargs="*", metavar="section.field=value",
        help="dotted overrides applied after the file, e.g. model.n_pro=17,14,11,8,5 optim.epochs=5",
    )


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """``--weights`` and ``--device``: where a checkpoint's frozen backbone comes from and where it runs."""
    parser.add_argument("--weights", default=None,
                        help="backbone weight source (default: the checkpoint's model.weights; 'random' for tests)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def _whole_number(minimum: int, what: str, example: str) -> Callable[[str], int]:
    """argparse type: a whole number >= ``minimum``; anything else is one error line naming the flag."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number, e.g. {example}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is not {what}, e.g. {example}")
        return value

    return parse


# A count, a size, a batch.
positive_int = _whole_number(1, "a positive whole number", "8")
# E.g. data loader workers, where 0 means none.
non_negative_int = _whole_number(0, "a whole number >= 0", "0")


def number_in(spec: str, example: str, *, integer: bool = True) -> Callable[[str], int | float]:
    """argparse type: a finite number (a whole one with ``integer``) within ``spec``, as a config field's bounds
    (:meth:`ivpt.config.Bounds.parse`: ``">= 16"``, ``"[0, 1]"``); anything else is argparse's usage error."""
    bounds = Bounds.parse(spec)
    kind = "whole number" if integer else "number"

    def parse(text: str) -> int | float:
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind}, e.g. {example}") from None
        if not bounds.holds(value):
            raise argparse.ArgumentTypeError(f"{text} is not a {kind} {bounds.describe(integer, words=False)}, "
                                             f"e.g. {example}")
        return value

    return parse


def whole_numbers(spec: str, example: str, *, at_least: int = 1) -> Callable[[str], list[int]]:
    """argparse type: ``at_least`` or more comma-separated whole numbers, each within ``spec`` (as
    :func:`number_in`)."""
    one = number_in(spec, example)

    def parse(text: str) -> list[int]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        if len(values) < at_least:
            raise argparse.ArgumentTypeError(f"{text!r} needs at least {at_least} comma-separated whole numbers, "
                                             f"e.g. {example}")
        try:
            return [int(one(v)) for v in values]
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"in {text!r}: {exc}") from None

    return parse
