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
    figure_bytes,
    read_log,
    render_evidence,
    render_gallery,
    render_hierarchy,
    render_stage_regions,
    training_figure,
)
from ivpt.explain.core import IMAGENET_MEAN, IMAGENET_STD

from .conftest import tiny_model


# In the hierarchy's SVG every printed weight is a group with id weight-<stage>-<concept>-<coarse> holding its text.
WEIGHT_RE = re.compile(r'<g id="weight-(\d+)-(\d+)-(\d+)">.*?<text[^>]*>([^<]+)</text>', re.S)


def hierarchy_svg(source, index=None, **kwargs) -> str:
    return figure_bytes(render_hierarchy(source, index, **kwargs), "svg").decode()


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
    at global_share 0.5); without it, the concept bars alone. The bars of a class are its evidence."""
    import dataclasses

    e = explain(tiny_model(global_part=True, global_share=0.5), _images())
    assert np.abs(e.global_evidence).max() > 0
    parts_only = dataclasses.replace(e, global_evidence=np.zeros_like(e.global_evidence))
    k, N = min(3, e.top_classes.shape[1]), e.num_coarse
    for expl, rows in ((e, N + 1), (parts_only, N)):
        blocks = render_evidence(expl, 0, classes=k).axes[1:]  # the regions panel, then one chart per class
        assert len(blocks) == k
        for ax, c in zip(blocks, expl.top_classes[0, :k]):
            widths = [bar.get_width() for bar in ax.patches]
            assert len(widths) == rows and [t.get_text() for t in ax.get_yticklabels()][-1] == \
                ("global" if rows > N else f"concept {N - 1}")
            expected = list(expl.evidence[0, :, c]) + ([expl.global_evidence[0, c]] if rows > N else [])
            np.testing.assert_allclose(widths, expected, atol=1e-6)


def test_rendering_is_deterministic():
    digests = []
    for _ in range(2):
        e = explain(tiny_model(), _images())
        figs = [render_stage_regions(e, 1), render_evidence(e, 1), render_hierarchy(e, 1)]
        files = [figure_bytes(f, "png") for f in figs] + [figure_bytes(figs[2], fmt) for fmt in ("svg", "pdf")]
        digests.append([hashlib.sha256(b).hexdigest() for b in files])
        for png in files[:3]:
            with Image.open(io.BytesIO(png)) as im:
                assert im.width > 200 and im.height > 200
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
    # thresholds: no printed weight below label_weight, exactly the edges of at least min_weight
    svg = hierarchy_svg(expl, 0, min_weight=0.45, label_weight=0.5)
    assert all(float(t) >= 0.5 for *_, t in WEIGHT_RE.findall(svg))
    edges = {tuple(map(int, e)) for e in re.findall(r'<g id="edge-(\d+)-(\d+)-(\d+)">', svg)}
    assert edges == {key for key, text in expected.items() if expl.assignments[key[0]][0, key[1], key[2]] >= 0.45}


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
    texts = [t.get_text() for t in render_gallery(gallery, stage=2).axes[0].texts]  # a caption under every crop
    assert [t for t in texts if t.startswith("#")] == \
        [f"#{index} · {score:.2f}" for k in (0, 1) for index, _, score in gallery[k]]


def test_gallery_captions_name_class_and_part():
    from ivpt.explain.core import run_batches
    from ivpt.explain.gallery import GalleryAccumulator, collate_images

    model, data = tiny_model(), TinyDataset()
    acc = GalleryAccumulator(-1, topk=2, patch=56)  # crops of the whole image: they hold every visible keypoint
    kp, visible = torch.tensor([[10.0, 10.0], [30.0, 30.0]]), torch.tensor([False, True])
    batch = collate_images([{**data[i], "keypoints": kp, "visible": visible} for i in range(len(data))])
    for _, x, out in run_batches(model, [batch]):
        acc.update(x, out, batch["index"].tolist(), batch)
    captions, summary = acc.captions(data.class_names, ["beak", "wing"])
    for k, items in acc.result().items():
        assert captions[k] == [f"class {data[i]['label']}\npart: wing" for i, _, _ in items]
        assert summary[k] == "shows wing\nin 2 of 2"


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
    assert "Warbler" in html and not list(out.glob("*.svg"))


@pytest.mark.parametrize("fmt", ["svg", "pdf"])
def test_cli_explain_format_writes_every_figure_in_it(tmp_path, fmt):
    import xml.etree.ElementTree as ET

    ckpt = tmp_path / "ckpt"
    tiny_model().save_pretrained(ckpt)
    out = tmp_path / "explained"
    assert main(["explain", str(ckpt), *_write_images(tmp_path / "in", 1), "--out", str(out), "--weights",
                 "random", "--format", fmt]) == 0
    files = sorted(out.glob("00_bird_0_*"))
    assert [f.name for f in files] == [f"00_bird_0_{kind}.{fmt}" for kind in ("evidence", "hierarchy", "regions")]
    html = (out / "index.html").read_text()
    for f in files:
        assert f'href="{f.name}"' in html if fmt == "pdf" else f'src="{f.name}"' in html
        if fmt == "svg":
            root = ET.fromstring(f.read_bytes())  # well-formed XML
            assert root.tag.endswith("svg") and "<svg" in f.read_text()
            assert "predicted" in f.read_text() or "stage" in f.read_text()  # text stays text (editable)
        else:
            assert f.read_bytes().startswith(b"%PDF") and f.read_bytes().rstrip().endswith(b"%%EOF")
    assert not list(out.glob("*.png"))


# ------------------------------------------------------------------------------- Prompt-CAM's trait maps
def _prompt_cam():
    from ivpt.models import create_model

    from .conftest import tiny_cfg

    torch.manual_seed(0)
    model = create_model(tiny_cfg(kind="prompt_cam"))
    with torch.no_grad():
        model.prompts.add_(0.5 * torch.randn_like(model.prompts))
    return model


def test_trait_explanation_is_the_models_maps():
    from ivpt.explain import TraitExplanation, explain_traits
    from ivpt.models.prompt_cam import trait_part_maps

    model = _prompt_cam().train()
    x = _images(3)
    e = explain_traits(model, x, classes=[4, 0], class_names=[f"bird {c}" for c in range(7)], topk=3)
    assert model.training, "explain_traits must restore the caller's mode"
    K, h = 2, 4  # heads, grid side
    assert e.images.shape == (3, 56, 56, 3) and e.classes.shape == (3, 3)
    assert e.attention.shape == (3, 3, K, h, h) and e.part_maps.shape == (3, 3, K + 1, h, h)
    with torch.no_grad():
        out = model.eval()(x)
    assert (e.classes[:, 0] == out.logits.argmax(-1).numpy()).all() and (e.classes[:, 1:] == [4, 0]).all()
    np.testing.assert_array_equal(e.logits, out.logits.numpy())
    np.testing.assert_allclose(e.part_maps[:, 0], out.maps[0].numpy(), atol=1e-6)  # what the metrics score
    flat = torch.from_numpy(e.attention).flatten(0, 1).flatten(-2)
    np.testing.assert_allclose(e.part_maps, trait_part_maps(flat, (h, h)).unflatten(0, (3, 3)).numpy(), atol=1e-6)
    assert e.class_name(4) == "bird 4" and e.num_heads == K
    batched = TraitExplanation.concat([explain_traits(model, x[:2], classes=[4, 0]),
                                       explain_traits(model, x[2:], classes=[4, 0])])
    np.testing.assert_allclose(batched.attention, e.attention, atol=1e-6)
    assert (batched.classes == e.classes).all() and batched.class_names is None


def test_class_ids_by_id_and_name():
    from ivpt.config import ConfigError
    from ivpt.explain import class_ids

    names = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "7"]
    assert class_ids(["1", "001.Black_footed_Albatross", "002.laysan_albatross", "7"], names, 3) == [1, 0, 1, 2]
    assert class_ids(["2"], None, 3) == [2]
    for bad in ("3", "Albatross", "-1"):
        with pytest.raises(ConfigError, match=rf"^--class '{bad}' names no class of the model: give a class id "
                                              "from 0 to 2; names such as '001.Black"):
            class_ids([bad], names, 3)


@pytest.mark.parametrize("fmt", ["png", "svg", "pdf"])
def test_cli_explain_prompt_cam_draws_trait_maps(tmp_path, fmt, capsys):
    ckpt = tmp_path / "ckpt"
    _prompt_cam().save_pretrained(ckpt, extra={"class_names": [f"Warbler {c}" for c in range(7)]})
    out = tmp_path / "explained"
    assert main(["explain", str(ckpt), *_write_images(tmp_path / "in", 2), "--out", str(out), "--weights", "random",
                 "--format", fmt, "--class", "3", "--class", "warbler 5"]) == 0
    assert sorted(f.name for f in out.iterdir()) == [f"00_bird_0_traits.{fmt}", f"01_bird_1_traits.{fmt}",
                                                     "index.html"]
    html = (out / "index.html").read_text()
    assert "trait maps (attention heads) per class" in html and "Warbler" in html
    for f in out.glob(f"*.{fmt}"):
        assert f'href="{f.name}"' in html if fmt == "pdf" else f'src="{f.name}"' in html
    if fmt == "svg":  # one row per class: the predicted one, then --class 3 and --class 'warbler 5'
        text = (out / "00_bird_0_traits.svg").read_text()
        assert "predicted: Warbler" in text and "chosen: Warbler 3" in text and "chosen: Warbler 5" in text
        assert text.count("head 1 · peak") == 3
    capsys.readouterr()
    assert main(["explain", str(ckpt), *_write_images(tmp_path / "in", 1), "--out", str(tmp_path / "x"),
                 "--weights", "random", "--class", "Robin"]) == 2
    assert capsys.readouterr().err.startswith("error: --class 'Robin' names no class of the model")


def test_cli_explain_class_needs_prompt_cam(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    tiny_model().save_pretrained(ckpt)
    assert main(["explain", str(ckpt), *_write_images(tmp_path / "in", 1), "--out", str(tmp_path / "x"),
                 "--weights", "random", "--class", "1"]) == 2
    assert capsys.readouterr().err == (f"error: --class draws a class's trait maps: it needs model.kind=prompt_cam, "
                                       f"and {ckpt} holds a 'ivpt' model (its evidence figure shows the top "
                                       "classes)\n")
    assert not (tmp_path / "x" / "index.html").exists()


def test_training_figure_plots_validation_and_concept_health(tmp_path):
    log = tmp_path / "log.csv"
    with open(log, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "step", "total", "classification", "val_top1", "val_parts_only_top1",
                         "val_part_share", "alive_s0", "entropy_s0", "alive_s1", "entropy_s1"])
        for step in range(1, 7):  # health and validation are filled in the last row of each epoch only
            end = step % 3 == 0
            writer.writerow([1 + (step - 1) // 3, step, 3.0 / step, 2.0 / step] +
                            ([40 + step, 30 + step, 0.1 * step, 0.75, 0.3, 1.0, 0.2] if end else [""] * 7))
    fig = training_figure(read_log(log))
    lines = {ax.get_title(loc="left"): [line.get_label().split()[0] for line in ax.get_lines()
                                        if not line.get_label().startswith("_")] for ax in fig.axes}  # not epoch marks
    alive = next(t for t in lines if t.startswith("concepts alive"))
    entropy = next(t for t in lines if t.startswith("map entropy"))
    assert lines[alive] == ["alive_s0", "alive_s1"] and lines[entropy] == ["entropy_s0", "entropy_s1"]
    assert lines["validation accuracy (%)"] == ["val_top1", "val_parts_only_top1"]
    assert lines["validation part share · last 0.6"] == ["val_part_share"]
    assert lines["total loss · last 0.5"] == ["total"]
    (val, *_) = next(ax for ax in fig.axes if ax.get_title(loc="left").startswith("validation")).get_lines()
    assert list(val.get_xdata()) == [3, 6] and list(val.get_ydata()) == [43, 46]  # the epochs' points, joined
    without = training_figure({k: v for k, v in read_log(log).items() if not k.startswith(("alive", "entropy_s"))})
    assert not [ax for ax in without.axes if ax.get_title(loc="left").startswith(("concepts alive", "map entropy"))]


def test_pages_escape_a_class_name(tmp_path):
    """jinja2 autoescapes: a class named like markup is shown as text in both pages, never run."""
    name = "<script>alert(1)</script>"
    ckpt = tmp_path / "run" / "best"
    tiny_model(num_classes=2).save_pretrained(ckpt, extra={"class_names": [name, "Bird_1"]})
    out = tmp_path / "explained"
    assert main(["explain", str(ckpt), *_write_images(tmp_path / "in", 1), "--out", str(out), "--weights",
                 "random", "--topk", "2"]) == 0
    data = _write_cub(tmp_path / "cub", 4)
    (data / "classes.txt").write_text(f"1 {name}\n2 Bird_1\n")
    assert main(["report", str(ckpt), "--data", str(data), "--out", str(tmp_path / "rep"), "--weights", "random",
                 "--samples", "2", "--split", "train"]) == 0
    for page in (out / "index.html", tmp_path / "rep" / "index.html"):
        html = page.read_text()
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and name not in html
        assert html.count("<script>") == 1  # the page's own image check only


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
    assert "81.2" in html and "72.5" in html  # metric table
    # one line per metric: what it measures and which way is better
    assert "share of images whose highest logit is their label" in html and "↑ higher is better" in html
    assert html.count('alt="training curves"') == 1
    assert html.count('class="card sample"') == 3
    assert 'alt="concept hierarchy"' in html
    assert "4 foreground + background" in html and "n_pro 5" not in html  # prototype counts said one way
    assert "ground-truth part whose keypoint" in html  # the dataset has keypoints: the galleries name parts
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
