"""``ivpt explain CHECKPOINT IMAGE... --out DIR [--format png|svg|pdf] [--class C ...]``: for an IVPT checkpoint,
concept regions, hierarchy and class evidence of each image; for a Prompt-CAM one, the trait maps (per-head attention)
of the predicted class and of each ``--class``; as figure files plus ``DIR/index.html`` showing them."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from .common import add_checkpoint_arguments, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a pretrained folder (config.json + model.safetensors), e.g. RUN/best")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format PIL reads)")
    parser.add_argument("--out", required=True, help="output folder (created if needed)")
    parser.add_argument("--topk", type=positive_int, default=5, help="classes kept in the prediction (default 5)")
    parser.add_argument("--img-size", type=positive_int, default=None,
                        help="input side in pixels (default: the checkpoint's model.img_size)")
    add_checkpoint_arguments(parser)
    parser.add_argument("--batch-size", type=positive_int, default=16, help="images per forward pass")
    parser.add_argument("--format", default="png", choices=["png", "svg", "pdf"],
                        help="file format of every figure (default png; svg and pdf keep text editable)")
    parser.add_argument("--class", dest="classes", action="append", default=[], metavar="CLASS",
                        help="model.kind=prompt_cam: also draw the trait maps of this class (an id from 0, or a class "
                             "name) beside the predicted class's; repeat for several")
    parser.add_argument("--allow-backbone-mismatch", action="store_true",
                        help="load even if the backbone weights differ from those the checkpoint was trained on")


def run(args: argparse.Namespace) -> int:
    from ..config import ConfigError
    from ..explain import Explanation, TraitExplanation, class_ids, explain, explain_traits
    from ..checkpoint import check_output_folder
    from ..explain.images import load_readable_images
    from ..explain.report import write_explained_images, write_trait_images
    from ..models import IVPT, PromptCAM
    from ..runs import class_names_of, load_run

    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        print(f"error: image file(s) not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    check_output_folder(args.out)
    model, cfg, meta = load_run(args.checkpoint, weights=args.weights, device=args.device,
                                allow_backbone_mismatch=args.allow_backbone_mismatch)
    traits = isinstance(model, PromptCAM)
    if not (traits or isinstance(model, IVPT)):
        raise ConfigError(f"{args.checkpoint} holds a {cfg.model.kind!r} model; explanations need model.kind=ivpt "
                          "or prompt_cam")
    if args.classes and not traits:
        raise ConfigError(f"--class draws a class's trait maps: it needs model.kind=prompt_cam, and {args.checkpoint} "
                          f"holds a {cfg.model.kind!r} model (its evidence figure shows the top classes)")
    size = args.img_size or cfg.model.img_size
    # A run's data.resize belongs to its img_size; another size resizes the shorter side to itself.
    data = dataclasses.replace(cfg.data, resize=0) if args.img_size else cfg.data
    names = class_names_of(meta, cfg.model.num_classes)
    chosen = class_ids(args.classes, names, cfg.model.num_classes)
    paths = [Path(p) for p in args.images]
    parts, done = [], []
    for start in range(0, len(paths), args.batch_size):
        batch = paths[start : start + args.batch_size]
        x, kept, bad = load_readable_images(batch, size, data=data)
        for i, reason in bad.items():
            print(f"skipped {batch[i]}: not a readable image ({reason})", file=sys.stderr)
        if x is not None:
            common = dict(class_names=names, topk=args.topk, mean=cfg.data.mean, std=cfg.data.std)
            parts.append(explain_traits(model, x, classes=chosen, **common) if traits
                         else explain(model, x, **common))
            done.extend(batch[i] for i in kept)
    if not done:
        print(f"error: none of the {len(paths)} image(s) could be read; nothing was explained", file=sys.stderr)
        return 2
    files = [p.name for p in done]
    if traits:
        index = write_trait_images(TraitExplanation.concat(parts), files, args.out, fmt=args.format)
    else:
        index = write_explained_images(Explanation.concat(parts), files, args.out, fmt=args.format)
    skipped = f" ({len(paths) - len(done)} unreadable image(s) skipped)" if len(done) < len(paths) else ""
    print(f"written {len(done)} explanation(s) to {args.out}{skipped}; open {index}")
    return 0
