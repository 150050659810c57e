"""``ivpt app RUN_DIR [--data ROOT] [--host 127.0.0.1 --port 7860]``: a local web app to explore a checkpoint —
an image's prediction, concept regions, hierarchy and evidence; each concept over the dataset; the run's metrics
and training curves (see docs/app.md)."""
from __future__ import annotations

import argparse
import sys

from .common import add_checkpoint_arguments, number_in, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN_DIR",
                        help="a run folder written by `ivpt train` (its best/ checkpoint), or a checkpoint folder")
    parser.add_argument("--data", help="dataset root (default: data.root of the run)")
    parser.add_argument("--split", default="test", choices=["train", "test"],
                        help="dataset split to pick images from and index (default test)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine)")
    parser.add_argument("--port", type=number_in("[1, 65535]", "7860"), default=7860, help="port (default 7860)")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="index only the first N dataset images for the concept view (default: all)")
    parser.add_argument("--topk", type=positive_int, default=5, help="classes shown in the prediction (default 5)")
    add_checkpoint_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..app import AppSession, find_checkpoint, gradio_missing, serve

    find_checkpoint(args.run)  # not a run: one line, before anything is loaded
    missing = gradio_missing()
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        return 2
    session = AppSession.open(args.run, data=args.data, split=args.split, weights=args.weights, device=args.device,
                              limit=args.limit, topk=args.topk)
    if session.dataset_note:
        print(f"note: {session.dataset_note}", file=sys.stderr)
    print(f"ivpt app: {session.kind} from {session.checkpoint} on http://{args.host}:{args.port} (Ctrl-C stops it)",
          flush=True)
    try:
        serve(session, host=args.host, port=args.port)
    except OSError as exc:
        print(f"error: cannot serve on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    return 0
