"""The ``ivpt`` command: parse, dispatch to ``ivpt.cli.<name>``, and turn user mistakes into one line and exit 2."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

COMMANDS: dict[str, str] = {
    "demo": "generate a part-world, train briefly on offline DINOv2 ViT-S/14 weights, evaluate",
    "info": "print a JSON summary of a config: stages, trainable parameters, parameter groups",
    "synth": "write a synthetic part-structured dataset in the CUB-200-2011 file layout",
    "train": "train a model from a YAML config with dotted overrides",
    "eval": "evaluate a checkpoint: accuracy and interpretability metrics",
    "compare": "train model kinds x seeds under one config, evaluate alike, write a comparison table and plot",
    "explain": "draw concept regions, hierarchy and evidence (IVPT) or trait maps (Prompt-CAM) for images",
    "report": "write a self-contained HTML report for a checkpoint",
    "bench": "measure forward/training speed of each model kind",
    "app": "a local web app to explore a checkpoint: regions, concepts, evidence, metrics",
}


def _available() -> dict[str, str]:
    found = {}
    for name, help_text in COMMANDS.items():
        if importlib.util.find_spec(f"ivpt.cli.{name}") is not None:
            found[name] = help_text
    return found


class _Parser(argparse.ArgumentParser):
    """An argument mistake is one line on stderr (``ivpt CMD: error: … (ivpt CMD --help)``) and exit 2, like every
    other user mistake; the usage is one ``--help`` away."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(
        prog="ivpt", description="Interpretable Visual Prompt Tuning: train, evaluate and explain concept prompts."
    )
    from ivpt import __version__

    parser.add_argument("--version", action="version", version=f"ivpt {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    argv = sys.argv[1:] if argv is None else argv
    commands = _available()
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, help_text in commands.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(f"ivpt.cli.{name}").add_arguments(p)
    args, extra = parser.parse_known_args(argv)
    # argparse cannot take positional overrides after options (``CKPT --out D a.b=1``); collect them here.
    dotted = [a for a in extra if "=" in a and not a.startswith("-") and "." in a.split("=", 1)[0]]
    if len(dotted) != len(extra) or (dotted and not hasattr(args, "overrides")):
        unknown = [a for a in extra if a not in dotted or not hasattr(args, "overrides")]
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if dotted:
        args.overrides = list(args.overrides or []) + dotted
    if args.command is None:
        parser.print_help()
        return 2
    _log_to_stderr()
    module = importlib.import_module(f"ivpt.cli.{args.command}")
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug or not isinstance(exc, _user_errors()):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _log_to_stderr() -> None:
    """The library's one-line notes (e.g. which backbone weights ``auto`` chose) go to stderr."""

    log = logging.getLogger("ivpt")
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (it may be replaced after set-up)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that describe a bad input or state and say what to do: one line and exit 2, no traceback."""
    from ..checkpoint import CheckpointError, OutputError
    from ..config import ConfigError
    from ..data import DatasetError
    from ..engine import TrainingError
    from ..runtime import DistributedError
    from ..weights import WeightsError

    return (ConfigError, DatasetError, CheckpointError, OutputError, WeightsError, TrainingError, DistributedError)

