"""Training throughput of the CPU config on part-world images, and where a step's time goes.

    python benchmarks/train_throughput.py [--img-size 224] [--batch 16] [--repeats 4]

Builds the CPU config with the paper's five stages (DINOv2 ViT-S/14, n_pro 17,14,11,8,5 set here; random weights:
speed does not depend on them) and times full optimiser steps (both views, all eight losses, backward, clipping,
Adam) through the trainer's own ``compute_loss``, alternating two settings in one run:

* ``paper``: pos/cls/reg tokens trainable — backward must run through every block down to the embeddings;
* ``frozen_tokens``: tokens frozen — blocks before the first prompted stage run without autograd.

Forward and backward time inside backbone modules (embedding, blocks, final norm) is measured with module hooks;
the rest of the step (concept stages, pooling, losses, optimiser) is reported as "outside the backbone".
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


class BackboneTimer:
    """Accumulates wall time spent in the backbone's blocks, forward and backward, via module hooks."""

    def __init__(self, backbone: torch.nn.Module) -> None:
        self.total = 0.0
        self._start: dict[int, float] = {}
        for module in [backbone.patch_embed, *backbone.blocks, backbone.norm]:
            module.register_forward_pre_hook(self._begin)
            module.register_forward_hook(self._end)
            module.register_full_backward_pre_hook(self._begin_bw)
            module.register_full_backward_hook(self._end_bw)

    def _begin(self, module, *args):
        self._start[id(module)] = time.perf_counter()

    def _end(self, module, *args):
        self.total += time.perf_counter() - self._start.pop(id(module))

    def _begin_bw(self, module, grad_output):
        self._start[("bw", id(module))] = time.perf_counter()  # type: ignore[index]

    def _end_bw(self, module, grad_input, grad_output):
        self.total += time.perf_counter() - self._start.pop(("bw", id(module)))  # type: ignore[arg-type]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=4)
    args = p.parse_args()

    from ivpt.config import load_config
    from ivpt.data import CubDataset, build_train_transform
    from ivpt.data.synth import make_partworld
    from ivpt.engine.trainer import compute_loss
    from ivpt.models import create_model

    root = Path(tempfile.mkdtemp()) / "pw"
    make_partworld(root, classes=4, per_class=args.batch // 2, size=args.img_size, seed=0, test_fraction=0.5)
    base = load_config(Path(__file__).resolve().parents[1] / "configs" / "cpu_vits14_224.yaml",
                       [f"model.img_size={args.img_size}", "model.num_classes=4", "model.weights=random",
                        f"data.root={root}", "model.deep_prompts=false",  # the concept prompts alone,
                        "model.n_pro=17,14,11,8,5"])  # and the paper's five stages, as docs/speed.md reports
    ds = CubDataset(root, "all", transform=build_train_transform(base.data, args.img_size))
    batch = [ds[i] for i in range(args.batch)]
    x = torch.stack([b["image"] for b in batch])
    y = torch.tensor([b["label"] for b in batch])

    settings = {}
    for name, tokens in (("paper", True), ("frozen_tokens", False)):
        cfg = base.with_overrides([f"model.train_tokens={str(tokens).lower()}"])
        torch.manual_seed(0)
        model = create_model(cfg.model).train()
        groups = model.param_groups(cfg.optim.base_lr, cfg.optim.head_lr_mult, cfg.optim.concept_lr_mult)
        settings[name] = (cfg, model, torch.optim.Adam(groups), BackboneTimer(model.backbone))

    def step(cfg, model, opt, timer):
        timer.total = 0.0
        t = time.perf_counter()
        total, _ = compute_loss(model, x, y, cfg, torch.Generator().manual_seed(0))
        total.backward()
        torch.nn.utils.clip_grad_norm_([q for g in opt.param_groups for q in g["params"]], cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t, timer.total

    for s in settings.values():  # warm-up
        step(*s)
    times = {name: [] for name in settings}
    inside = {name: [] for name in settings}
    for _ in range(args.repeats):
        for name, s in settings.items():
            t, b = step(*s)
            times[name].append(t)
            inside[name].append(b)
    report = {"img_size": args.img_size, "batch": args.batch, "threads": torch.get_num_threads()}
    for name in settings:
        t = statistics.median(times[name])
        report[name] = {
            "step_s": t,
            "img_per_s": args.batch / t,
            "share_outside_backbone": 1 - statistics.median(inside[name]) / t,
        }
    report["frozen_tokens_speedup"] = report["paper"]["step_s"] / report["frozen_tokens"]["step_s"]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
