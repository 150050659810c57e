"""Interpretability of a trained checkpoint against the same model with freshly initialised (random) concept
stages and head (several draws, their mean), on the same backbone and test split.

    python benchmarks/trained_vs_random.py RUN_DIR [--metrics nmi_ari,consistency,stability] [--seeds 1,2,3]

RUN_DIR is a folder written by ``ivpt train`` or ``ivpt demo`` (its ``best/`` checkpoint and ``config.yaml``).
Prints both evaluations side by side as JSON (scores in percent, per stage).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--metrics", default="nmi_ari,consistency,stability")
    p.add_argument("--seeds", default="1,2,3",
                   help="seeds of the random initialisations (the run's own initial state is its train.seed)")
    args = p.parse_args()

    from ivpt.checkpoint import load_pretrained
    from ivpt.runs import run_config
    from ivpt.eval import evaluate
    from ivpt.models import create_model

    cfg, meta = run_config(args.run / "best", [])
    metrics = [m for m in args.metrics.split(",") if m]
    trained = create_model(cfg.model)
    load_pretrained(trained, args.run / "best", meta=meta)
    keys = ("consistency", "stability", "nmi", "ari")
    result = evaluate(trained, cfg, metrics=metrics, progress=False)
    rows = {"trained": {"stage": result.get("stage"), **{k: result[k] for k in keys if k in result}}}
    draws = []
    for seed in [int(s) for s in args.seeds.split(",") if s]:
        random_model = create_model(cfg.model, weights="random", seed=seed)
        random_model.backbone.load_state_dict(trained.backbone.state_dict())  # same backbone, random stages
        draws.append(evaluate(random_model, cfg, metrics=metrics, progress=False))
    rows["random"] = {k: {"mean": float(np.mean([d[k] for d in draws])), "values": [d[k] for d in draws]}
                      for k in keys if all(k in d for d in draws)}
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
