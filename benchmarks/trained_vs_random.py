"""Interpretability of a trained checkpoint against the same model with freshly initialised (random) concept
stages and head, on the same backbone and test split.

    python benchmarks/trained_vs_random.py RUN_DIR [--metrics nmi_ari,consistency,stability]

RUN_DIR is a folder written by ``ivpt train`` or ``ivpt demo`` (its ``best/`` checkpoint and ``config.yaml``).
Prints both evaluations side by side as JSON (scores in percent, per stage).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--metrics", default="nmi_ari,consistency,stability")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    args = p.parse_args()

    from ivpt.checkpoint import load_pretrained
    from ivpt.runs import run_config
    from ivpt.eval import evaluate
    from ivpt.models import create_model

    cfg, meta = run_config(args.run / "best", [])
    metrics = [m for m in args.metrics.split(",") if m]
    trained = create_model(cfg.model)
    load_pretrained(trained, args.run / "best", meta=meta)
    torch.manual_seed(args.seed)
    random_model = create_model(cfg.model, weights="random")
    random_model.backbone.load_state_dict(trained.backbone.state_dict())  # same backbone, random stages
    rows = {}
    for name, model in (("trained", trained), ("random", random_model)):
        result = evaluate(model, cfg, metrics=metrics, progress=False)
        rows[name] = {"stage": result.get("stage"), "per_stage": result.get("per_stage"),
                      **{k: result[k] for k in ("consistency", "stability", "nmi", "ari") if k in result}}
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
