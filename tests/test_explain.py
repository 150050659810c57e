"""Explanations: what is computed, that figures are deterministic and show the model's numbers, the ``explain``
and ``report`` commands, and (with Chromium installed) that the HTML pages load cleanly with every image."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ivpt.cli import main
from ivpt.explain import (
    Explanation,
    concept_gallery,
    dataset_hierarchy,
    explain,
    hierarchy_svg,
    render_evidence,
    render_gallery,
    render_hierarchy,
    render_stage_regions,
)
from ivpt.explain.core import IMAGENET_MEAN, IMAGENET_STD

from .conftest import tiny_model


WEIGHT_RE = re.compile(
    r'<text class="weight"[^>]*data-stage="(\d+)" data-concept="(\d+)" data-coarse="(\d+)">([^<]+)</text>'
)


def _images(n: int = 2, size: int = 56, seed: int = 0) -> torch.Tensor:
    """Smooth normalised test images (blobs on a gradient) so that concepts form regions."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    out = []
    for _ in range(n):
        c = torch.rand(3, 2, generator=g)
        blob = torch.exp(-((xx - c[0, 0] + 0.5) ** 2 + (yy - c[0, 1] + 0.5) ** 2) * 6)
        img = torch.stack([0.5 + 0.4 * xx * c[1, 0], 0.4 + 0.3 * yy, blob]) * 0.8 + 0.1
        out.append(img.clamp(0, 1))
    x = torch.stack(out)
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


class TinyDataset(torch.utils.data.Dataset):
    """Items shaped like ``ivpt.data.CubDataset``'s: dicts with ``image``, ``label``, ``index``."""

    def __init__(self, n: int = 7) -> None:
        self.x = _images(n, seed=3)
        self.class_names = [f"class {c}" for c in range(7)]

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": i % 7, "index": i}


def _png_digest(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return hashlib.sha256(buf.getvalue()).hexdigest()


@pytest.fixture(scope="module")
def expl() -> Explanation:
    return explain(tiny_model(), _images(), class_names=[f"bird {c}" for c in range(7)], topk=5)


def test_explanation_fields_and_shapes(expl):
    model = tiny_model()
    model.train()
    x = _images(2, size=70)  # another size than the model's 56: a 5 × 5 grid
    e = explain(model, x, topk=3)
    assert model.training, "explain must restore the caller's mode"
    n_pro, N, C = [5, 4, 3], 2, 7
    assert e.images.shape == (2, 70, 70, 3) and e.images.dtype == np.uint8
    assert [m.shape for m in e.maps] == [(2, n, 5, 5) for n in n_pro]
    assert [lab.shape for lab in e.labels] == [(2, 70, 70)] * 3
    assert all(lab.max() < n for lab, n in zip(e.labels, n_pro))
    assert [p.shape for p in e.present] == [(2, n) for n in n_pro]
    assert [q.shape for q in e.assignments] == [(2, 4, N), (2, 3, N)]
    assert e.evidence.shape == (2, N, C) and e.logits.shape == (2, C)
    assert e.top_classes.shape == (2, 3) and np.all(np.diff(e.top_probs, axis=1) <= 0)
    np.testing.assert_allclose(e.probs.sum(1), 1, atol=1e-5)
    assert e.class_name(4) == "class 4" and expl.class_name(4) == "bird 4"
    # the de-normalised input is the input
    back = x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    assert np.abs(e.images.astype(float) - back.permute(0, 2, 3, 1).numpy() * 255).max() <= 0.51
    # a concept is present exactly when it wins a patch on the grid
    for maps, present in zip(e.maps, e.present):
        won = np.stack([np.isin(np.arange(maps.shape[1]), maps[b].argmax(0)) for b in range(2)])
        assert (won == present).all()


def test_evidence_sums_to_logits(expl):
    np.testing.assert_allclose(expl.evidence.sum(axis=1), expl.logits, atol=1e-5, rtol=0)
    model = tiny_model().eval()
    with torch.no_grad():
        out = model(_images())
    np.testing.assert_allclose(expl.logits, out.logits.numpy(), atol=1e-5)
    np.testing.assert_allclose(expl.evidence, out.part_logits.numpy() / out.part_logits.shape[1], atol=1e-6)


def test_evidence_figure_draws_the_global_part_as_one_more_row():
    """With model.global_part the figure has one more bar per class block (the global evidence, half of the logit
    at global_share 0.5), so its class blocks are one row taller; without it, the concept rows alone."""
    import dataclasses

    e = explain(tiny_model(global_part=True, global_share=0.5), _images())
    assert np.abs(e.global_evidence).max() > 0
    parts_only = dataclasses.replace(e, global_evidence=np.zeros_like(e.global_evidence))
    k = min(3, e.top_classes.shape[1])
    with_global, without = render_evidence(e, 0, classes=k), render_evidence(parts_only, 0, classes=k)
    row_h, title_h, pad, N = 21, 46, 16, e.num_coarse
    block_h = 40 + N * row_h + 14
    assert without.height == max(title_h + 224 + 44, title_h + k * block_h + pad)
    assert with_global.height == max(title_h + 224 + 44, title_h + k * (block_h + row_h) + pad)


def test_rendering_is_deterministic():
    digests = []
    for _ in range(2):
        e = explain(tiny_model(), _images())
        figs = [render_stage_regions(e, 1), render_evidence(e, 1), render_hierarchy(e, 1)]
        digests.append([_png_digest(f) for f in figs] + [hashlib.sha256(hierarchy_svg(e, 1).encode()).hexdigest()])
        assert all(f.mode == "RGB" and f.width > 200 and f.height > 200 for f in figs)
    assert digests[0] == digests[1]


def test_hierarchy_svg_shows_the_model_assignments(expl):
    svg = hierarchy_svg(expl, 0, min_weight=0.0, label_weight=0.0)
    shown = {(int(s), int(k), int(n)): t for s, k, n, t in WEIGHT_RE.findall(svg)}
    expected = {}
    for s, (q, present) in enumerate(zip(expl.assignments, expl.present)):
        for k in range(q.shape[1]):
            if present[0, k]:  # absent concepts carry the model's uniform placeholder: not drawn
                for n in range(q.shape[2]):
                    expected[(s, k, n)] = f"{q[0, k, n]:.2f}"
    assert expected and shown == expected
    # thresholds: no printed weight below label_weight, no edge below min_weight
    svg = hierarchy_svg(expl, 0, min_weight=0.45, label_weight=0.5)
    assert all(float(t) >= 0.5 for *_, t in WEIGHT_RE.findall(svg))
    edges = re.findall(r'<path class="edge".*?<title>[^<]*: ([0-9.]+)</title>', svg)
    assert all(float(w) >= 0.45 for w in edges)


def test_dataset_hierarchy_is_the_mean_over_present_concepts():
    model, data = tiny_model(), TinyDataset()
    loader = torch.utils.data.DataLoader(data, batch_size=3)
    h = dataset_hierarchy(model, loader)
    e = explain(model, data.x)
    assert h.num_images == len(data)
    for s, (q, present) in enumerate(zip(e.assignments, e.present)):
        fg = present[:, :-1]
        for k in range(q.shape[1]):
            if fg[:, k].any():
                np.testing.assert_allclose(h.assignments[s][k], q[fg[:, k], k].mean(0), atol=1e-5)
            else:
                assert np.isnan(h.assignments[s][k]).all()
        np.testing.assert_allclose(h.presence[s], fg.mean(0), atol=1e-6)
    svg = hierarchy_svg(h, label_weight=0.0, min_weight=0.0)
    for s, k, n, text in WEIGHT_RE.findall(svg):
        assert text == f"{h.assignments[int(s)][int(k), int(n)]:.2f}"


def test_concept_gallery():
    model, data = tiny_model(), TinyDataset()
    gallery = concept_gallery(model, data, -1, topk=3, patch=20, batch_size=4)
    e = explain(model, data.x)
    assert sorted(gallery) == [0, 1]  # the final stage's foreground concepts
    for k, items in gallery.items():
        assert len(items) == 3
        scores = [score for _, _, score in items]
        assert scores == sorted(scores, reverse=True)
        best = np.sort(e.maps[-1][:, k].reshape(len(data), -1).max(1))[::-1][:3]
        np.testing.assert_allclose(scores, best, atol=1e-6)
        for index, crop, score in items:
            assert 0 <= index < len(data) and crop.shape == (20, 20, 3) and crop.dtype == np.uint8
            assert score == pytest.approx(float(e.maps[-1][index, k].max()), abs=1e-6)
    rows = render_gallery(gallery, stage=2)
    assert sorted(rows) == [0, 1] and all(r.width > 3 * 96 for r in rows.values())


def _write_images(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    x = _images(count, size=80, seed=5)
    arrays = (x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
    paths = []
    for j, a in enumerate(arrays):
        img = Image.fromarray((a.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8))
        img = img.resize((96, 72))  # not square: the eval transform crops
        paths.append(str(folder / f"bird_{j}.png"))
        img.save(paths[-1])
    return paths


def test_cli_explain_writes_figures_and_index(tmp_path):
    ckpt = tmp_path / "run" / "best"
    tiny_model().save_pretrained(ckpt, extra={"class_names": [f"Warbler {c}" for c in range(7)]})
    images = _write_images(tmp_path / "in", 2)
    out = tmp_path / "explained"
    assert main(["explain", str(ckpt), *images, "--out", str(out), "--weights", "random", "--topk", "3",
                 "--img-size", "70"]) == 0
    html = (out / "index.html").read_text()
    for j in range(2):
        for kind in ("regions", "evidence", "hierarchy"):
            png = out / f"{j:02d}_bird_{j}_{kind}.png"
            assert png.is_file() and f'src="{png.name}"' in html
            with Image.open(png) as im:
                assert im.width > 200
        assert (out / f"{j:02d}_bird_{j}_hierarchy.svg").read_text().startswith("<svg")
    assert "Warbler" in html


def _write_cub(root: Path, n: int = 8) -> Path:
    """A tiny dataset in the CUB-200-2011 file layout (2 classes, one part)."""
    names = _write_images(root / "staging", n)
    (root / "images").mkdir(parents=True)
    (root / "parts").mkdir()
    rows = {"images": [], "labels": [], "split": [], "boxes": [], "locs": []}
    for j, path in enumerate(names, 1):
        rel = f"{j % 2 + 1:03d}.Bird_{j % 2}/{Path(path).name}"
        (root / "images" / rel).parent.mkdir(exist_ok=True)
        shutil.move(path, root / "images" / rel)
        rows["images"].append(f"{j} {rel}")
        rows["labels"].append(f"{j} {j % 2 + 1}")
        rows["split"].append(f"{j} {int(j > n // 2)}")
        rows["boxes"].append(f"{j} 4 4 80 60")
        rows["locs"].append(f"{j} 1 40 30 1")
    for name, key in (("images.txt", "images"), ("image_class_labels.txt", "labels"),
                      ("train_test_split.txt", "split"), ("bounding_boxes.txt", "boxes"),
                      ("parts/part_locs.txt", "locs")):
        (root / name).write_text("\n".join(rows[key]) + "\n")
    (root / "parts" / "parts.txt").write_text("1 head\n")
    return root


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """``ivpt report`` on a tiny CUB-layout dataset, with an eval.json and a log.csv in the run folder."""
    tmp = tmp_path_factory.mktemp("report")
    ckpt = tmp / "run" / "best"
    tiny_model(num_classes=2).save_pretrained(ckpt)  # the dataset's 2 classes: the report scores its labels
    (tmp / "run" / "eval.json").write_text(json.dumps({
        "top1": 81.25, "top5": 97.5, "consistency": 70.0, "stability": 72.5,
        "stage": {"index": 0, "n_pro": 5, "spec": "auto"},
        "per_stage": [{"stage": 0, "n_pro": 5, "consistency": 70.0}, {"stage": 2, "n_pro": 3, "consistency": 60.0}],
    }))
    with open(tmp / "run" / "log.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "step", "lr_head", "lr_concepts", "total", "classification", "img_per_s"])
        for step in range(1, 11):
            writer.writerow([step // 5, step, 1e-2, 2e-4, 3.0 / step, 2.0 / step, 100 + step])
    data = _write_cub(tmp / "cub")
    out = tmp / "report_out"
    assert main(["report", str(ckpt), "--data", str(data), "--out", str(out), "--weights", "random",
                 "--samples", "3", "--split", "train"]) == 0
    return out / "index.html"


def test_cli_report_sections(report):
    html = report.read_text()
    for anchor in ("metrics", "training", "hierarchy", "gallery-2", "gallery-0", "samples"):
        assert f'id="{anchor}"' in html
    assert "81.2" in html and "72.5" in html  # metric cards
    assert html.count('class="chart"') == 4  # total, classification, learning rate, throughput
    assert html.count('class="card sample"') == 3
    assert 'class="hierarchy"' in html
    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)  # self-contained


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _load_in_chromium(url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000",
           *extra, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


# Skipped only outside CI: `bash .ci/run` installs Chromium, and there (CI=true) a missing browser is a failure.
@pytest.mark.skipif(_chromium() is None and not os.environ.get("CI"),
                    reason="needs Chromium (Debian package 'chromium', installed by `bash .ci/run`)")
def test_html_pages_load_in_chromium(report, tmp_path):
    ckpt = tmp_path / "ckpt"
    tiny_model().save_pretrained(ckpt)
    out = tmp_path / "explained"
    assert main(["explain", str(ckpt), *_write_images(tmp_path / "in", 2), "--out", str(out),
                 "--weights", "random"]) == 0
    for page, expected in ((report, None), (out / "index.html", 6)):
        result = _load_in_chromium(page.as_uri(), tmp_path / f"profile-{page.parent.name}", "--dump-dom")
        assert result.returncode == 0, result.stderr[-2000:]
        match = re.search(r'<body[^>]*data-images-ok="(\d+)/(\d+)"', result.stdout)
        assert match, f"the page's load script did not run in {page}"
        ok, total = int(match[1]), int(match[2])
        assert total > 0 and ok == total, f"{total - ok} of {total} images did not display in {page}"
        if expected is not None:
            assert total == expected
        console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
        assert not console, f"console messages in {page}: {console}"
    shot = tmp_path / "report.png"
    result = _load_in_chromium(report.as_uri(), tmp_path / "profile-shot", f"--screenshot={shot}",
                               "--window-size=1280,2000", "--hide-scrollbars")
    assert shot.is_file(), result.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1280, 2000)
    artifacts = os.environ.get("IVPT_TEST_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(artifacts) / "report_screenshot.png")
        shutil.copy(report, Path(artifacts) / "report.html")
