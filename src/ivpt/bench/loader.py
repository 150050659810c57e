"""Throughput of the real training DataLoader (``ivpt bench``): images per second that reach the device, finished.

The loader is the trainer's own (:func:`ivpt.engine.ordering.train_loader`: persistent workers, prefetch, pinned
memory on CUDA, per-item seeds) over the training split of a synthetic part-world written in the CUB layout
(:func:`ivpt.data.synth.make_partworld`, JPEG files), with the paper's training augmentation, for both paths:

* ``cpu``: workers decode, resize, flip, warp, crop, jitter and normalise (PIL); the float batch is copied to the
  device;
* ``gpu_augment``: workers decode and resize only; the uint8 batch is copied to the device and finished there by
  :class:`ivpt.data.DeviceAugment` (``data.gpu_augment=true``).

One untimed epoch starts the workers; the following ``epochs`` are timed up to the device's last kernel.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from ..config import DataConfig

__all__ = ["LOADER_PATHS", "loader_throughput"]

LOADER_PATHS = ("cpu", "gpu_augment")


def loader_throughput(*, device: torch.device, img_size: int, batch: int, workers: int, images: int,
                      image_size: int, epochs: int = 2, seed: int = 0) -> dict[str, dict]:
    """{path: {"images_per_s", "images", "seconds"}} for each of :data:`LOADER_PATHS`, plus the settings used.

    ``images`` synthetic images of ``image_size`` px (square) are written to a temporary folder; batches of
    ``batch`` images of ``img_size`` px; ``workers`` loader processes."""
    from ..data import DeviceAugment, build_device_train_transform, build_train_transform, open_dataset
    from ..data.synth import make_partworld
    from ..engine.ordering import EpochBatches, SeededDataset, train_loader

    classes = 4
    out: dict[str, dict] = {"settings": {"workers": workers, "batch": batch, "img_size": img_size,
                                         "images": images, "image_size": image_size, "epochs": epochs}}
    with tempfile.TemporaryDirectory() as tmp:
        root = make_partworld(Path(tmp) / "pw", classes=classes, per_class=max(1, -(-images // classes)),
                              size=image_size, seed=seed, test_fraction=0.0, workers=max(1, workers))
        for path in LOADER_PATHS:
            cfg = DataConfig(root=str(root), resize=img_size, num_workers=workers, gpu_augment=path == "gpu_augment")
            transform = (build_device_train_transform if cfg.gpu_augment else build_train_transform)(cfg, img_size)
            dataset = SeededDataset(open_dataset(cfg, "train", transform), seed)
            batches = EpochBatches(len(dataset), min(batch, len(dataset)))
            loader = train_loader(dataset, batches, workers, pin_memory=device.type == "cuda")
            finish = DeviceAugment(cfg, img_size) if cfg.gpu_augment else None
            seen, started = 0, 0.0
            for epoch in range(epochs + 1):
                if epoch == 1:  # epoch 0 started the workers
                    _sync(device)
                    seen, started = 0, time.perf_counter()
                batches.start(epoch)
                for b in loader:
                    x = b["image"].to(device, non_blocking=True)
                    if finish is not None:
                        x = finish(x, b["augment"])
                    seen += x.shape[0]
            _sync(device)
            seconds = time.perf_counter() - started
            out[path] = {"images_per_s": seen / seconds, "images": seen, "seconds": seconds}
            if finish is not None and device.type == "cuda":
                from .phases import count_host_syncs

                x = b["image"].to(device, non_blocking=True)
                out[path]["host_syncs_per_batch"] = count_host_syncs(lambda: finish(x, b["augment"]), device)
            del loader  # its persistent workers exit
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
