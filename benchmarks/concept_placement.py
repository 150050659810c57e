"""Where a concept model's prototypes sit: per stage and prototype, the share of test images it wins a patch in
(presence), the share of all patches it wins, and the share of its won patches that lie on the object (from the
dataset's foreground masks, e.g. a part-world's ``segmentations/``). Full test images, eval transform.

    python benchmarks/concept_placement.py RUN/best --data ROOT [--images 96]

Prints JSON: ``object_share`` (patches on the object / all patches) and per stage a list of
{prototype, background, presence, pixel_share, on_object}. A foreground concept with ``on_object`` near the
object's own share of the image lands on the object no more often than a random patch does.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from ivpt.data import build_eval_transform, open_dataset
from ivpt.runs import load_run


def placement(maps: torch.Tensor, on_object: torch.Tensor) -> list[dict]:
    """maps (B, n, H, W) and a boolean object mask at the same grid (B, H, W) → one record per prototype."""
    winners = maps.argmax(dim=1)
    n = maps.shape[1]
    rows = []
    for k in range(n):
        won = winners == k
        rows.append({"prototype": k, "background": k == n - 1,
                     "presence": round(won.flatten(1).any(1).float().mean().item(), 3),
                     "pixel_share": round(won.float().mean().item(), 3),
                     "on_object": round((won & on_object).sum().item() / max(1, won.sum().item()), 3)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--data", required=True, help="dataset root with foreground masks")
    parser.add_argument("--images", type=int, default=96, help="test images, spread evenly over the split")
    args = parser.parse_args()
    model, cfg, _ = load_run(args.checkpoint, overrides=[f"data.root={args.data}"])
    if not model.has_part_maps:
        raise SystemExit(f"{args.checkpoint}: model.kind={cfg.model.kind} has no part maps")
    dataset = open_dataset(cfg.data, "test", build_eval_transform(cfg.data, cfg.model.img_size), with_parts=True,
                           bbox_crop=cfg.data.bbox_crop)
    if not getattr(dataset, "has_masks", False):
        raise SystemExit(f"{args.data}: the test split has no foreground masks")
    step = max(1, len(dataset) // args.images)
    items = [dataset[i] for i in range(0, len(dataset), step)][: args.images]
    images = torch.stack([it["image"] for it in items])
    masks = torch.stack([it["mask"] for it in items]).float().reshape(len(items), 1, *images.shape[-2:])
    with torch.no_grad():
        maps = model(images).maps
    out = {"images": len(items), "stages": []}
    for (stage, _), stage_maps in zip(model.map_stages(), maps):
        grid = stage_maps.shape[-2:]
        on_object = F.adaptive_avg_pool2d(masks, grid).squeeze(1) > 0.5
        out["object_share"] = round(on_object.float().mean().item(), 3)
        out["stages"].append({"stage": stage, "prototypes": placement(stage_maps, on_object)})
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
