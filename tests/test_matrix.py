"""Every command x every model kind x every dataset format, on a tiny ViT (4 blocks, width 32, 42 px).

The datasets are the tiny trees of :mod:`tests.test_datasets` in each release's own layout (a small part-world for
cub, class folders for imagefolder). Each (format, kind) is trained once, lazily, by ``ivpt train`` into the run
folder ``ivpt compare`` would use (``OUT/runs/<kind>-seed0``), and the other commands reuse that run: ``eval``
(its eval.json), ``explain`` (three images in batches of one; IVPT's concepts, Prompt-CAM's trait maps, the other
kinds refused), ``report`` and ``compare`` (which finds the run finished). Each combination is its own test id, so a
failure names the command, the kind and the format.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from ivpt.cli import main
from ivpt.config import MODEL_KINDS
from ivpt.data.synth import make_partworld
from ivpt.formats import DATASET_FORMATS

from .conftest import TINY
from .test_datasets import CLASSES, WRITERS, _photo

FORMATS = tuple(DATASET_FORMATS)
KINDS = tuple(MODEL_KINDS)
COMBINATIONS = [pytest.param(fmt, kind, id=f"{fmt}-{kind}") for fmt in FORMATS for kind in KINDS]
NUM_CLASSES = {**CLASSES, "cub": 3, "imagefolder": 3}


def _write_cub(root: Path) -> Path:
    return make_partworld(root, classes=3, per_class=3, size=48, seed=0, test_fraction=0.34)


def _write_imagefolder(root: Path) -> Path:
    """root/<class>/*.jpg, no train/test folders: the reader holds out a fixed share of each class as test."""
    for c, name in enumerate(("ant", "bee", "cat")):
        (root / name).mkdir(parents=True)
        for k in range(3):
            _photo(10 * c + k).save(root / name / f"{k}.jpg")
    return root


DATASET_WRITERS = {**WRITERS, "cub": _write_cub, "imagefolder": _write_imagefolder}


class _Cache:
    """Datasets and runs made on first use and shared by every test of the module (a failure is kept too, so
    every test that needs the run fails with the training error)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.roots: dict[str, Path] = {}
        self.runs: dict[tuple[str, str], Path | BaseException] = {}

    def root(self, fmt: str) -> Path:
        if fmt not in self.roots:
            self.roots[fmt] = DATASET_WRITERS[fmt](self.base / "data" / fmt)
        return self.roots[fmt]

    def config(self, fmt: str) -> Path:
        path = self.base / f"{fmt}.yaml"
        if not path.is_file():
            config = {
                "model": dict(backbone="vit_small_patch14_reg4_dinov2", img_size=42, num_classes=NUM_CLASSES[fmt],
                              n_pro=[4, 3], num_prompts=2, weights="random", backbone_kwargs=dict(TINY)),
                "optim": dict(epochs=1, min_steps=0, batch_size=2, amp="none"),
                "data": dict(root=str(self.root(fmt)), format=fmt, num_workers=0, val_fraction=0.0),
                "train": dict(seed=0, log_every=1, max_steps=1),
                "eval": dict(batch_size=4),
            }
            path.write_text(yaml.safe_dump(config))
        return path

    def compare_dir(self, fmt: str) -> Path:
        return self.base / "compare" / fmt

    def run(self, fmt: str, kind: str) -> Path:
        """``ivpt train`` of ``kind`` on ``fmt`` into the folder ``ivpt compare`` uses for it (trained once)."""
        key = (fmt, kind)
        if key not in self.runs:
            out = self.compare_dir(fmt) / "runs" / f"{kind}-seed0"
            try:
                code = main(["train", "--config", str(self.config(fmt)), "--out", str(out), "--no-progress",
                             f"model.kind={kind}", "train.seed=0"])
                self.runs[key] = out if code == 0 else AssertionError(f"ivpt train exited with {code}")
            except Exception as exc:  # noqa: BLE001 - kept, and raised by every test that needs the run
                self.runs[key] = exc
        found = self.runs[key]
        if isinstance(found, BaseException):
            raise found
        return found


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> _Cache:
    return _Cache(tmp_path_factory.mktemp("matrix"))


@pytest.mark.parametrize("fmt,kind", COMBINATIONS)
def test_train(cache, fmt, kind):
    run = cache.run(fmt, kind)
    for name in ("config.yaml", "log.csv", "last.pt", "metrics.json", "best/config.json", "best/model.safetensors"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 1 and metrics["num_classes"] == NUM_CLASSES[fmt]
    assert 0 <= metrics["test_top1"] <= 1


@pytest.mark.parametrize("fmt,kind", COMBINATIONS)
def test_eval(cache, fmt, kind, capsys):
    run = cache.run(fmt, kind)
    capsys.readouterr()
    code = main(["eval", str(run / "best"), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads((run / "eval.json").read_text())
    assert 0 <= result["top1"] <= 100 and result["data"]["format"] == fmt
    assert result["data"]["images"] == result["data"]["images_listed"] > 0
    if kind == "linear":  # no part maps nor part head: every interpretability metric is skipped, with the reason
        assert set(result["skipped"]) == {"consistency", "stability", "nmi_ari", "kpr", "fg_iou", "decision"}
    for metric, reason in result.get("skipped", {}).items():
        assert f"skipped {metric}: {reason}" in captured.out


def _images(root: Path, n: int = 3) -> list[Path]:
    """``n`` image files of the dataset (any PIL reads)."""
    found = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in (".jpg", ".jpeg") and path.is_file():
            with Image.open(path) as im:
                if im.mode == "RGB":
                    found.append(path)
        if len(found) == n:
            return found
    raise AssertionError(f"fewer than {n} images under {root}")


@pytest.mark.parametrize("fmt,kind", COMBINATIONS)
def test_explain(cache, fmt, kind, tmp_path, capsys):
    run, images = cache.run(fmt, kind), _images(cache.root(fmt))
    capsys.readouterr()
    chosen = ["--class", "1"] if kind == "prompt_cam" else []  # a class's trait maps beside the predicted one's
    code = main(["explain", str(run / "best"), *map(str, images), "--out", str(tmp_path / "ex"), "--batch-size", "1",
                 "--device", "cpu", *chosen])
    captured = capsys.readouterr()
    if kind not in ("ivpt", "prompt_cam"):  # IVPT's concepts or Prompt-CAM's traits: others are refused in one line
        assert code == 2 and captured.err == (f"error: {run / 'best'} holds a {kind!r} model; explanations need "
                                              "model.kind=ivpt or prompt_cam\n")
        assert not (tmp_path / "ex" / "index.html").exists()
        return
    assert code == 0, captured.err
    assert f"written {len(images)} explanation(s)" in captured.out
    figures = ("traits",) if kind == "prompt_cam" else ("regions", "evidence", "hierarchy")
    for i, path in enumerate(images):
        for figure in figures:
            assert (tmp_path / "ex" / f"{i:02d}_{path.stem}_{figure}.png").is_file()


@pytest.mark.parametrize("fmt,kind", COMBINATIONS)
def test_report(cache, fmt, kind, tmp_path, capsys):
    run = cache.run(fmt, kind)
    code = main(["report", str(run / "best"), "--out", str(tmp_path / "rep"), "--samples", "2", "--gallery-topk", "2",
                 "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    html = (tmp_path / "rep" / "index.html").read_text()
    assert html.count('class="card sample"') == 2 and 'id="hierarchy"' in html
    assert ('id="gallery-' in html) == (kind != "linear")
    assert (html.count('alt="trait maps"') == 2) == (kind == "prompt_cam")


@pytest.mark.parametrize("fmt,kind", COMBINATIONS)
def test_compare(cache, fmt, kind, capsys):
    """``ivpt compare`` over the trained run: no training again (the run is finished), one row for the kind."""
    cache.run(fmt, kind)
    out = cache.compare_dir(fmt)
    capsys.readouterr()
    code = main(["compare", "--config", str(cache.config(fmt)), "--kinds", kind, "--seeds", "0", "--out", str(out),
                 "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "training" not in captured.out.replace("trained earlier", "")
    result = json.loads((out / "compare.json").read_text())
    assert [(r["kind"], r["seed"]) for r in result["runs"]] == [(kind, 0)]
    assert 0 <= result["summary"][kind]["top1"]["mean"] <= 100
    assert f"| {kind} | 1 |" in (out / "compare.md").read_text()
