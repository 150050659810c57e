"""The training loop: one code path for CPU, one GPU and ``torchrun`` (plain DDP).

Each optimiser step sees a global batch of ``optim.batch_size`` images (split over processes and
``optim.grad_accum`` micro-batches). The clean batch and its randomly warped copy go through the model as ONE
forward pass of twice the batch, so DDP sees a single forward per backward and the equivariance view costs no
extra launch overhead. Checkpoints (``last.pt``) hold everything needed to continue bit-for-bit on CPU.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..checkpoint import adapter_state, atomic_torch_save, atomic_write_text
from ..config import LOSS_TERMS, Config
from ..losses import random_affine, warp
from ..model import create_model
from . import distributed as D
from .evaluate import evaluate_accuracy
from .ordering import GlobalBatchSampler, SeededDataset

__all__ = ["TrainingError", "train", "SimulatedCrash"]

LOG_FIELDS = ["epoch", "step", "lr_head", "lr_concepts", "total", *LOSS_TERMS, "img_per_s", "elapsed_s"]


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


class SimulatedCrash(RuntimeError):
    """Raised by the test hook ``crash_after_step`` to imitate a process killed mid-epoch."""


def _autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _split_output(out: Any, n: int) -> tuple[Any, Any]:
    """Split every batch-major tensor of a model output dataclass at ``n``: (first n, rest)."""
    first, rest = {}, {}
    for f in dataclasses.fields(out):
        value = getattr(out, f.name)
        if isinstance(value, list):
            first[f.name], rest[f.name] = [v[:n] for v in value], [v[n:] for v in value]
        elif isinstance(value, torch.Tensor):
            first[f.name], rest[f.name] = value[:n], value[n:]
        else:
            first[f.name] = rest[f.name] = value
    return type(out)(**first), type(out)(**rest)


def _rng_state(eq_gen: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
             "equivariance": eq_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, eq_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    eq_gen.set_state(state["equivariance"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather_rng(eq_gen: torch.Generator, info: D.DistInfo) -> list[dict]:
    mine = _rng_state(eq_gen)
    if not info.distributed:
        return [mine]
    import torch.distributed as dist

    states: list[Any] = [None] * info.world_size
    dist.all_gather_object(states, mine)
    return states


class _CsvLog:
    """Append-only CSV log (rank 0); a resumed run keeps writing to the same file."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.enabled = enabled
        if not enabled:
            return
        new = not path.exists()
        self.file = path.open("a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=LOG_FIELDS)
        if new:
            self.writer.writeheader()

    def write(self, row: dict) -> None:
        if self.enabled:
            self.writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
            self.file.flush()

    def close(self) -> None:
        if self.enabled:
            self.file.close()


class _Tensorboard:
    def __init__(self, out: Path, enabled: bool) -> None:
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter  # lazy: optional dependency
            except ImportError as exc:
                raise TrainingError("train.tensorboard=true needs `pip install tensorboard`") from exc
            self.writer = SummaryWriter(str(out / "tensorboard"))

    def log(self, row: dict, step: int) -> None:
        if self.writer is not None:
            for k, v in row.items():
                if isinstance(v, float) and k not in ("epoch", "step"):
                    self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _save_config(cfg: Config, out: Path) -> None:
    import yaml

    atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def load_run_config(out: Path) -> Config:
    import yaml

    path = out / "config.yaml"
    if not path.is_file():
        raise TrainingError(f"cannot resume: {path} not found (is {out} a run folder written by `ivpt train`?)")
    return Config.from_dict(yaml.safe_load(path.read_text()))


def train(
    cfg: Config,
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    crash_after_step: int | None = None,
) -> dict:
    """Train ``cfg`` into folder ``out``; with ``resume`` continue from ``out/last.pt``.

    Writes ``config.yaml``, ``log.csv``, ``last.pt`` (full training state), ``best/`` (pretrained folder chosen
    on the validation split, or the last epoch without one) and ``metrics.json`` (test accuracy of ``best``).
    Returns the content of ``metrics.json``.
    """
    from ..data import build_datasets, collate_skip_corrupt, corrupt_count, reset_corrupt_count

    out = Path(out)
    info = D.setup(cfg.train.device)
    try:
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            _save_config(cfg, out)
        torch.manual_seed(cfg.train.seed + info.rank)
        random.seed(cfg.train.seed + info.rank)
        np.random.seed(cfg.train.seed + info.rank)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        eq_gen = torch.Generator().manual_seed(cfg.train.seed)  # same on every rank: one transform per step

        data = build_datasets(cfg)
        if data.num_classes != cfg.model.num_classes:
            raise TrainingError(
                f"the dataset at {cfg.data.root} has {data.num_classes} classes but model.num_classes="
                f"{cfg.model.num_classes}; set model.num_classes={data.num_classes}"
            )
        train_set = SeededDataset(data.train, cfg.train.seed)
        o = cfg.optim
        micro_global = o.batch_size // o.grad_accum
        if o.batch_size % (o.grad_accum * info.world_size):
            raise TrainingError(
                f"optim.batch_size={o.batch_size} must divide by optim.grad_accum x processes "
                f"= {o.grad_accum} x {info.world_size}"
            )
        steps_per_epoch = (len(train_set) // micro_global) // o.grad_accum

        model = create_model(cfg.model).to(info.device)
        groups = model.param_groups(o.base_lr, o.head_lr_mult, o.concept_lr_mult)
        optimizer = torch.optim.Adam(groups, betas=tuple(o.betas), weight_decay=o.weight_decay)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=o.step_epochs, gamma=o.gamma)
        scaler = torch.amp.GradScaler(info.device.type, enabled=o.amp == "fp16")
        trainable = [p for g in groups for p in g["params"]]

        start_epoch, start_batch, step, best_val = 0, 0, 0, -math.inf
        if resume:
            state = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
            model.load_state_dict(state["model"], strict=False)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            start_epoch, start_batch, step = state["epoch"], state["batch_in_epoch"], state["step"]
            best_val = state["best_val"]
            rng = state["rng"]
            _set_rng_state(rng[info.rank] if info.rank < len(rng) else rng[0], eq_gen)
            if info.is_main:
                print(f"resumed from {out / 'last.pt'} at epoch {start_epoch}, step {step}")

        unused = cfg.model.kind != "ivpt" or any(w == 0 for w in cfg.loss.weights().values())
        net: nn.Module = model
        if info.distributed:
            net = nn.parallel.DistributedDataParallel(
                model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
                find_unused_parameters=unused,
            )

        def save_last(epoch: int, batch_in_epoch: int) -> None:
            rng = _gather_rng(eq_gen, info)
            if info.is_main:
                atomic_torch_save({
                    "model": adapter_state(model), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                    "epoch": epoch, "batch_in_epoch": batch_in_epoch, "step": step, "best_val": best_val,
                    "rng": rng, "config": cfg.to_dict(),
                }, out / "last.pt")

        log = _CsvLog(out / "log.csv", info.is_main)
        tb = _Tensorboard(out, info.is_main and cfg.train.tensorboard)
        reset_corrupt_count()

        def emit(epoch: int) -> dict:
            row = _flush(window, epoch, step, optimizer, t_start)
            log.write(row)
            tb.log(row, step)
            return row

        t_start, window = time.perf_counter(), {"n": 0, "images": 0, "t": time.perf_counter(), "sums": {}}
        done = False
        for epoch in range(start_epoch, o.epochs):
            train_set.set_epoch(epoch)
            first = start_batch if epoch == start_epoch else 0
            sampler = GlobalBatchSampler(len(train_set), micro_global, rank=info.rank, world_size=info.world_size,
                                         seed=cfg.train.seed, epoch=epoch, start=first * o.grad_accum)
            loader = DataLoader(train_set, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                                collate_fn=collate_skip_corrupt, pin_memory=info.device.type == "cuda",
                                generator=_loader_generator(), persistent_workers=False)
            model.train()
            bar = _progress(progress and info.is_main, steps_per_epoch - first, f"epoch {epoch + 1}/{o.epochs}")
            micro = 0
            batch_in_epoch = first
            for batch in loader:
                if batch is None:
                    continue
                x = batch["image"].to(info.device, non_blocking=True)
                y = batch["label"].to(info.device, non_blocking=True)
                micro += 1
                last_micro = micro % o.grad_accum == 0
                sync = contextlib.nullcontext() if (last_micro or not info.distributed) else net.no_sync()
                with sync:
                    total, terms = _loss(net, x, y, cfg, eq_gen, info.device)
                    scaler.scale(total / o.grad_accum).backward()
                _accumulate(window, terms, total, x.shape[0] * info.world_size)
                if not last_micro:
                    continue
                bad = not torch.isfinite(total).item()
                if D.broadcast_flag(bad, info.device):
                    names = [k for k, v in terms.items() if not torch.isfinite(v)] or ["total"]
                    raise TrainingError(
                        f"non-finite loss at epoch {epoch + 1}, step {step + 1}: term(s) {', '.join(names)}. "
                        f"The last good checkpoint {out / 'last.pt'} is kept; lower the learning rates or try "
                        "optim.amp=none"
                    )
                scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
                if o.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(trainable, o.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                batch_in_epoch += 1
                bar.update(1)
                if step % cfg.train.log_every == 0:
                    row = emit(epoch)
                    bar.set_postfix(loss=f"{row['total']:.3f}", img_s=f"{row['img_per_s']:.1f}")
                if cfg.train.ckpt_every_steps and step % cfg.train.ckpt_every_steps == 0:
                    save_last(epoch, batch_in_epoch)
                if crash_after_step is not None and step == crash_after_step:
                    raise SimulatedCrash(f"simulated crash after step {step}")
                if cfg.train.max_steps and step >= cfg.train.max_steps:
                    done = True
                    break
            bar.close()
            if window["n"]:
                emit(epoch)
            finished_epoch = not done or batch_in_epoch >= steps_per_epoch
            if finished_epoch:
                scheduler.step()
            val = None
            if data.val is not None:
                val = evaluate_accuracy(model, data.val, cfg, info, progress=False)["top1"]
            improved = val is None or val > best_val
            if improved:
                best_val = val if val is not None else best_val
                if info.is_main:
                    model.save_pretrained(out / "best", extra={"epoch": epoch + 1, "step": step, "val_top1": val})
            save_last(epoch + 1 if finished_epoch else epoch, 0 if finished_epoch else batch_in_epoch)
            if info.is_main:
                msg = f"epoch {epoch + 1}: step {step}"
                print(msg + (f", val top-1 {val:.2f}%" + (" (best)" if improved else "") if val is not None else ""))
            if done:
                break
        log.close()
        tb.close()

        from ..checkpoint import load_pretrained, read_pretrained_config

        if info.distributed:
            import torch.distributed as dist

            dist.barrier()  # rank 0 has written best/
        _, meta = read_pretrained_config(out / "best")
        load_pretrained(model, out / "best")
        test = evaluate_accuracy(model, data.test, cfg, info, progress=progress and info.is_main)
        skipped = int(D.all_reduce_sum(torch.tensor([float(corrupt_count())])).item())
        metrics = {
            "test_top1": test["top1"] / 100,
            "test_top5": test["top5"] / 100,
            "test_balanced_top1": test["balanced_top1"] / 100,
            "num_classes": data.num_classes,
            "chance": 1.0 / data.num_classes,
            "best_val_top1": None if best_val == -math.inf else best_val / 100,
            "best_epoch": meta.get("epoch"),
            "steps": step,
            "train_images": len(train_set),
            "test_images": len(data.test),
            "corrupt_images_skipped": skipped,
            "seconds": time.perf_counter() - t_start,
        }
        if info.is_main:
            import json

            atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
        return metrics
    finally:
        D.teardown()


def _loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: Config, eq_gen: torch.Generator,
          device: torch.device) -> tuple[torch.Tensor, dict]:
    """Forward the clean batch (plus its warped copy when equivariance is on) and return the weighted loss."""
    from ..losses import ivpt_losses

    b = x.shape[0]
    theta = None
    if cfg.model.kind in ("ivpt", "last_layer_parts") and cfg.loss.equivariance > 0:
        theta = random_affine(b, rotation_deg=cfg.loss.eq_rotation_deg, translate=cfg.loss.eq_translate,
                              scale=tuple(cfg.loss.eq_scale), device=device, generator=eq_gen)
        x = torch.cat([x, warp(x, theta)])
    # IVPT needs only the concept maps of the warped view, so its backbone pass there skips autograd.
    kwargs = {"maps_only_from": b} if theta is not None and cfg.model.kind == "ivpt" else {}
    with _autocast(device, cfg.optim.amp):
        out = net(x, **kwargs)
    warped = None
    if theta is not None:
        out, warped = _split_output(out, b)
    return ivpt_losses(out, y, cfg.loss, warped_out=warped, theta=theta)


def _accumulate(window: dict, terms: dict, total: torch.Tensor, images: int) -> None:
    window["n"] += 1
    window["images"] += images
    sums = window["sums"]
    for k, v in {**terms, "total": total.detach()}.items():
        sums[k] = sums.get(k, 0.0) + float(v)


def _flush(window: dict, epoch: int, step: int, optimizer: torch.optim.Optimizer, t_start: float) -> dict:
    now = time.perf_counter()
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    row = {"epoch": epoch + 1, "step": step, "lr_head": lrs.get("classifier", float("nan")),
           "lr_concepts": next((lrs[k] for k in ("prototypes", "prompts", "tokens") if k in lrs), float("nan")),
           "img_per_s": window["images"] / max(now - window["t"], 1e-9), "elapsed_s": now - t_start}
    row.update({k: v / window["n"] for k, v in window["sums"].items()})
    window.update(n=0, images=0, t=now, sums={})
    return row


def _loader_generator() -> torch.Generator:
    # A DataLoader draws its workers' base seed from the global RNG unless given a generator; that draw would
    # shift the Gumbel-noise stream depending on when loaders are created (and break exact resume). Items are
    # seeded by SeededDataset, so this generator's value does not matter.
    return torch.Generator().manual_seed(0)


def _progress(enabled: bool, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False)
