"""What prototypes placed by the keypoint annotation score on a trained concept model's own features: a reference
for its consistency. Per stage, every annotated keypoint gets the mean feature of the patch under it over the training
split's box crops, and the background the mean feature of the patches off the object (the foreground masks; without
masks, the patches that hold no visible keypoint). These prototypes replace the trained ones (no spatial bias) and
the test split is scored with the consistency protocol of ``ivpt eval`` (box crops, ``eval.protocol`` of the run),
beside the trained prototypes' own score from the same pass.

    python benchmarks/keypoint_prototypes.py RUN/best --data ROOT [--stages 0,1]

Prints JSON: per stage, ``trained`` and ``keypoint_prototypes`` consistency (percent) and the number of prototypes
of each. The reference is supervised by the keypoints and is not an upper bound: a concept set can score more (a
concept that always peaks on the object's middle hits its body keypoint in most crops), but a trained score far
below it says the concepts, not the features, miss the parts.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from ivpt.data import build_eval_transform, open_dataset
from ivpt.metrics import consistency_score, keypoint_hits, keypoint_patches, keypoint_prototypes, part_frame_keypoints
from ivpt.models.prototypes import nearest_prototype_maps
from ivpt.runs import load_run


def load_crops(cfg, split: str) -> dict:
    """Every box crop of ``split`` as ``ivpt eval`` scores it (the whole box resized to the model input)."""
    transform = build_eval_transform(cfg.data, cfg.model.img_size, square=True)
    dataset = open_dataset(cfg.data, split, transform, with_parts=True, bbox_crop=True)
    items = [dataset[i] for i in range(len(dataset))]
    if not items or "keypoints" not in items[0]:
        raise SystemExit(f"{cfg.data.root}: the {split} split has no keypoints")
    out = {"image": torch.stack([it["image"] for it in items]),
           "keypoints": torch.stack([torch.as_tensor(it["keypoints"]) for it in items]).float(),
           "visible": torch.stack([torch.as_tensor(it["visible"]) for it in items]).bool(),
           "label": torch.tensor([it["label"] for it in items]),
           "original": {k: torch.from_numpy(v) for k, v in dataset.original_parts(range(len(dataset))).items()}}
    if "mask" in items[0]:
        out["mask"] = torch.stack([torch.as_tensor(it["mask"]) for it in items]).float()
    return out


def stage_features(model, images: torch.Tensor, batch: int = 32) -> list[torch.Tensor]:
    """(B, D, H, W) features that each stage reads, in stage order, from one pass over ``images``."""
    with torch.no_grad():
        per_batch = [model.concept_features(images[i:i + batch]) for i in range(0, len(images), batch)]
    out = []
    for f in (torch.cat(stage) for stage in zip(*per_batch)):
        side = int(round(f.shape[1] ** 0.5))
        out.append(f.transpose(1, 2).reshape(f.shape[0], f.shape[2], side, side))
    return out


def background_patches(crops: dict, grid: int) -> torch.Tensor:
    """(B, grid, grid) bool: patches at least half off the foreground mask, or without masks the patches that hold
    no visible keypoint."""
    b, side = crops["image"].shape[0], crops["image"].shape[-1]
    if "mask" in crops:
        on = F.adaptive_avg_pool2d(crops["mask"].reshape(b, 1, side, side), (grid, grid)).squeeze(1)
        return on < 0.5
    free = torch.ones(b, grid * grid, dtype=torch.bool)
    vis = crops["visible"]
    index = keypoint_patches(crops["keypoints"], vis, (grid, grid), image_size=side)
    free[torch.arange(b).unsqueeze(1).expand_as(index)[vis], index[vis]] = False
    return free.reshape(b, grid, grid)


def consistency_of(maps: torch.Tensor, test: dict, cfg) -> float:
    """Consistency of the foreground channels of ``maps`` (background last) on the test crops."""
    e = cfg.eval
    kp, vis = part_frame_keypoints(test["keypoints"], test["visible"], test["image"].shape[-1], **test["original"],
                                   frame=e.part_frame, protocol=e.protocol)
    hits = keypoint_hits(maps[:, :-1], kp, vis, frame=e.part_frame, half_size=e.half_size)
    return consistency_score(hits, vis, test["label"], threshold=e.threshold)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--data", required=True, help="dataset root with keypoints (CUB layout)")
    parser.add_argument("--stages", default=None, help="comma-separated stage indices (default: every stage)")
    args = parser.parse_args()
    model, cfg, _ = load_run(args.checkpoint, overrides=[f"data.root={args.data}"])
    if not model.has_part_maps:
        raise SystemExit(f"{args.checkpoint}: model.kind={cfg.model.kind} has no part maps")
    model.eval()
    train, test = load_crops(cfg, "train"), load_crops(cfg, "test")
    with torch.no_grad():
        trained_maps = [torch.cat(m) for m in zip(*(model(test["image"][i:i + 32]).maps
                                                    for i in range(0, len(test["image"]), 32)))]
    stages = [s for s, _ in model.map_stages()]
    wanted = stages if args.stages is None else [int(s) for s in args.stages.split(",")]
    out = {"checkpoint": args.checkpoint, "protocol": cfg.eval.protocol, "test_images": len(test["image"]),
           "stages": []}
    train_features, test_features = stage_features(model, train["image"]), stage_features(model, test["image"])
    for position, stage in enumerate(stages):
        if stage not in wanted:
            continue
        f_train = train_features[position]
        protos = keypoint_prototypes(f_train, train["keypoints"], train["visible"],
                                     background_patches(train, f_train.shape[-1]), image_size=train["image"].shape[-1])
        reference = nearest_prototype_maps(test_features[position], protos)
        out["stages"].append({"stage": stage,
                              "trained": round(consistency_of(trained_maps[position], test, cfg), 1),
                              "trained_prototypes": trained_maps[position].shape[1] - 1,
                              "keypoint_prototypes": round(consistency_of(reference, test, cfg), 1),
                              "keypoints": protos.shape[0] - 1})
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
