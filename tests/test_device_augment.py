"""data.gpu_augment: the device half of the training augmentation (run here on CPU tensors) against the CPU (PIL)
pipeline, with the same per-item parameters, and each augmentation's effect on constructed images."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torchvision.transforms import functional as TF

from ivpt.config import DataConfig
from ivpt.data import (
    CubDataset,
    DeviceAugment,
    build_device_train_transform,
    build_eval_transform,
    build_train_transform,
    collate_skip_corrupt,
)
from ivpt.data import device_augment as D
from ivpt.data.transforms import RandomAffine, Sample, apply_transform
from ivpt.engine.ordering import SeededDataset

SIZE = 48
NO_AUGMENT = DataConfig(resize=SIZE, hflip=0.0, affine_degrees=0.0, affine_translate=0.0, affine_scale=[1.0, 1.0],
                        color_jitter=[0.0, 0.0, 0.0, 0.0])
STD = torch.tensor(NO_AUGMENT.std).view(1, 3, 1, 1)


def _images() -> list[Image.Image]:
    """Smooth random RGB images of three shapes (landscape, portrait, square)."""
    rng = np.random.default_rng(0)
    shapes = [(60, 80), (90, 64), (SIZE, SIZE)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(2))
            for h, w in shapes]


def _cpu_and_device(cfg: DataConfig, images: list[Image.Image], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU pipeline's batch and the device pipeline's, each item drawn from the same seed."""
    cpu_tf = build_train_transform(cfg, SIZE) if cfg.augment else build_eval_transform(cfg, SIZE)
    device_tf = build_device_train_transform(cfg, SIZE)
    cpu, items = [], []
    for i, image in enumerate(images):
        torch.manual_seed(seed + i)
        cpu.append(apply_transform(Sample(image=image), cpu_tf).image)
        torch.manual_seed(seed + i)
        sample = apply_transform(Sample(image=image), device_tf)
        items.append({"image": sample.image, "augment": sample.augment, "label": i})
    batch = collate_skip_corrupt(items)
    assert batch["image"].dtype == torch.uint8
    return torch.stack(cpu), DeviceAugment(cfg, SIZE)(batch["image"], batch["augment"])


@pytest.mark.parametrize("augment", [True, False])
def test_without_augmentation_the_device_path_equals_the_cpu_path(augment):
    # Both paths read the same uint8 pixels (PIL decode and resize in the worker) and crop at the same offset (a
    # random one from the same seed, or the centre); nearest sampling at whole-pixel positions copies pixels, and
    # both normalise (x / 255 - mean) / std in float32 — so they are EQUAL, well inside the uint8 rounding bound
    # of 0.5 / 255 / min(std) = 0.0088 (normalised units) that one extra rounding to uint8 could cost.
    cfg = dataclasses.replace(NO_AUGMENT, augment=augment)
    cpu, device = _cpu_and_device(cfg, _images())
    assert device.shape == cpu.shape == (3, 3, SIZE, SIZE)
    assert torch.equal(cpu, device)


def test_bilinear_warp_differs_from_pil_by_its_truncation_only():
    # PIL's bilinear affine TRUNCATES its interpolated value to uint8 (an error in (-1, 0] level); the device keeps
    # float. Same parameters, so CPU - device lies in (-1, 0] levels up to float error.
    cfg = dataclasses.replace(NO_AUGMENT, affine_degrees=90.0, affine_translate=0.2, affine_scale=[0.8, 1.2])
    for seed in (0, 10):
        cpu, device = _cpu_and_device(cfg, _images(), seed)
        levels = (cpu - device) * STD * 255
        assert levels.min() > -1.001 and levels.max() < 0.001
        assert levels.mean() < -0.2  # a real warp happened (truncation shows), not a copy


def test_all_augmentations_use_the_cpu_paths_parameters():
    # Flip, warp, crop and colour jitter all on: the jitter rounds to uint8 after each PIL op (and PIL's hue works
    # on 8-bit HSV), so pixels differ by a few levels — but only that: other parameters would differ by far more.
    cpu, device = _cpu_and_device(DataConfig(resize=SIZE), _images())
    levels = ((cpu - device) * STD * 255).abs()
    assert levels.mean() < 2.0 and levels.max() < 8.0
    other_seed = _cpu_and_device(DataConfig(resize=SIZE), _images(), seed=100)[1]
    assert ((other_seed - device) * STD * 255).abs().mean() > 10.0


def _pattern() -> Image.Image:
    """A square image whose every pixel is distinct: red = column, green = row, blue = a checkerboard."""
    v, u = np.mgrid[0:SIZE, 0:SIZE]
    return Image.fromarray(np.stack([u * 5, v * 5, ((u // 4 + v // 4) % 2) * 255], axis=-1).astype(np.uint8))


def test_flip_mirrors_exactly():
    plain = _cpu_and_device(NO_AUGMENT, [_pattern()])[1]
    flipped = _cpu_and_device(dataclasses.replace(NO_AUGMENT, hflip=1.0), [_pattern()])[1]
    assert torch.equal(flipped, plain.flip(-1))


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
def test_quarter_turn_rotates_the_pattern(monkeypatch, interpolation):
    # A 90° rotation about the centre of an even-sized square maps pixel centres onto pixel centres: both
    # samplers then copy pixels, and the result is the pattern turned clockwise on screen (torchvision's sense).
    monkeypatch.setattr(RandomAffine, "draw", lambda self, size: (90.0, (0.0, 0.0), 1.0))
    cfg = dataclasses.replace(NO_AUGMENT, affine_degrees=90.0, affine_interpolation=interpolation)
    plain = _cpu_and_device(NO_AUGMENT, [_pattern()])[1]
    cpu, turned = _cpu_and_device(cfg, [_pattern()])
    clockwise = torch.rot90(plain, k=-1, dims=(-2, -1))
    assert torch.allclose(turned, clockwise, atol=1e-5)
    # The CPU path agrees, up to PIL's truncation of a bilinear value sampled a hair off the centre (cos 90° != 0).
    assert ((cpu - clockwise) * STD * 255).abs().max() < 1.001


def test_shift_exposes_the_fill(monkeypatch):
    # Translate right by 10 pixels: the first 10 columns come from outside the image and take the affine fill.
    monkeypatch.setattr(RandomAffine, "draw", lambda self, size: (0.0, (10.0, 0.0), 1.0))
    for fill in ("mean", "zero"):
        cfg = dataclasses.replace(NO_AUGMENT, affine_translate=0.25, affine_fill=fill)
        plain = _cpu_and_device(NO_AUGMENT, [_pattern()])[1]
        shifted = _cpu_and_device(cfg, [_pattern()])[1]
        assert torch.allclose(shifted[..., 10:], plain[..., :-10], atol=1e-5)
        expected = torch.zeros(3) if fill == "zero" else torch.tensor([124, 116, 104]) / 255  # round(255 * mean)
        expected = (expected - torch.tensor(cfg.mean)) / torch.tensor(cfg.std)
        assert torch.allclose(shifted[0, :, :, :10], expected.view(3, 1, 1).expand(3, SIZE, 10), atol=1e-6)


def test_jitter_matches_torchvision_per_image():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 16, 16)
    factors = torch.tensor([[0.8, 1.2, 0.9, 0.05], [1.1, 0.7, 1.3, -0.04], [1.0, 1.0, 1.0, 0.0], [0.9, 1.1, 0.8, 0.5]])
    tv = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    ours = (D.adjust_brightness, D.adjust_contrast, D.adjust_saturation, D.adjust_hue)
    for i, (theirs, mine) in enumerate(zip(tv, ours)):
        expected = torch.stack([theirs(x[b], float(factors[b, i])) for b in range(4)])
        assert torch.allclose(mine(x, factors[:, i]), expected, atol=1e-6), theirs.__name__
    # The per-image order: each image gets the four adjustments in its own order, as torchvision would.
    order = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]])
    jitter = DeviceAugment(DataConfig(color_jitter=[0.2, 0.2, 0.2, 0.05]), 16).jitter(x, factors, order)
    for b in range(4):
        expected = x[b]
        for i in order[b].tolist():
            expected = tv[i](expected, float(factors[b, i]))
        assert torch.allclose(jitter[b], expected, atol=1e-5)


def test_collate_pads_decoded_images_and_keeps_their_frames():
    tf = build_device_train_transform(NO_AUGMENT, SIZE)
    items = [{"label": i, **dict(zip(("image", "augment"), (s.image, s.augment)))}
             for i, s in enumerate(apply_transform(Sample(image=im), tf) for im in _images())]
    batch = collate_skip_corrupt(items)
    # shorter side resized to 48: 64x48, 48x67, 48x48 (W x H) -> canvas 67 high, 64 wide
    assert batch["image"].shape == (3, 3, 67, 64)
    assert batch["augment"]["frame"][:, 2:].tolist() == [[64, 48], [48, 67], [48, 48]]
    assert batch["image"][0, :, 48:].eq(0).all() and batch["image"][1, :, :, 48:].eq(0).all()


def test_device_path_is_a_function_of_seed_epoch_and_index(tmp_path):
    from ivpt.data.synth import make_partworld

    root = make_partworld(tmp_path / "pw", classes=2, per_class=3, size=56, seed=0)
    cfg = DataConfig(root=str(root), resize=SIZE)
    data = SeededDataset(CubDataset(root, "train", transform=build_device_train_transform(cfg, SIZE)), seed=3)
    augment = DeviceAugment(cfg, SIZE)

    def batch(epoch):
        b = collate_skip_corrupt([data[(epoch, i)] for i in range(len(data))])
        return augment(b["image"], b["augment"])

    first = batch(0)
    assert torch.equal(batch(0), first)
    assert not torch.allclose(batch(1), first)
    assert first.shape == (len(data), 3, SIZE, SIZE)
