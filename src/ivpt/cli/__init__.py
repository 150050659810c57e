"""The ``ivpt`` command. Each subcommand lives in its own module ``ivpt.cli.<name>`` exposing
``add_arguments(parser)`` and ``run(args) -> int``; modules are imported only when their command runs, so
``ivpt --help`` stays fast and optional dependencies stay optional."""
from .main import COMMANDS, main

__all__ = ["COMMANDS", "main"]
