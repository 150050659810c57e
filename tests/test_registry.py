"""The metric registry and the dataset-format registry: a metric or a format defined and registered inside a test
reaches every command without another module changing; the decision metrics through ``evaluate``."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import ivpt.compare as C
from ivpt.cli import main
from ivpt.config import Config, ConfigError
from ivpt.data import AnnotatedDataset, CubDataset, DatasetError, Records, build_eval_transform, dataset_class
from ivpt.data.synth import make_partworld
from ivpt.eval import ALL_METRICS, DEFAULT_METRICS, evaluate, format_table, registry
from ivpt.eval.registry import Metric, Score, register_metric, unregister_metric
from ivpt.formats import DATASET_FORMATS, register_format, unregister_format
from ivpt.metrics import SumState
from ivpt.models import create_model

from .conftest import TINY, tiny_model

DECISION = ("parts_only_top1", "parts_agree", "part_share")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pw")
    make_partworld(root, classes=3, per_class=6, size=56, seed=2, test_fraction=0.34)
    return root


def _cfg(root, kind="ivpt", **model) -> Config:
    return Config.from_dict({
        "model": dict(kind=kind, backbone="vit_small_patch14_reg4_dinov2", img_size=56, num_classes=3,
                      n_pro=[5, 4, 3], weights="random", backbone_kwargs=dict(TINY), **model),
        "optim": dict(epochs=1, min_steps=0, batch_size=4, amp="none"),
        "data": dict(root=str(root), num_workers=0, val_fraction=0.0),
        "train": dict(seed=0, log_every=1, max_steps=1),
        "eval": dict(batch_size=4),
    })


def _images_and_labels(root, cfg):
    ds = CubDataset(root, "test", transform=build_eval_transform(cfg.data, cfg.model.img_size))
    return torch.stack([ds[i]["image"] for i in range(len(ds))]), torch.tensor(ds.labels)


# --------------------------------------------------------------------------------- a toy metric: mean top logit

class MeanMeter(SumState):
    """Sum and count of the values seen: their mean, exact under DDP."""

    def __init__(self) -> None:
        super().__init__()
        self._add_state("total", (1,), torch.float64)
        self._add_state("count", (1,))

    def update(self, values: torch.Tensor) -> None:
        self.total += values.double().sum()
        self.count += values.numel()

    def no_data(self) -> dict[str, str]:
        return {"mean_logit": "no image was scored"} if int(self.count[0]) == 0 else {}

    def compute(self) -> dict[str, float]:
        return {"mean_logit": float(self.total[0]) / int(self.count[0])} if int(self.count[0]) else {}


class MeanLogit:
    """The consumer: the highest logit of every image of the full pass."""

    def __init__(self, ctx) -> None:
        self.meter = MeanMeter()

    def update(self, batch, forward) -> None:
        self.meter.update(forward(batch["image"]).logits.float().max(dim=1).values.cpu())

    def meters(self):
        return [self.meter]

    def scores(self, stage):
        return self.meter.compute()

    def scored_meters(self, stage):
        return [self.meter]


@pytest.fixture
def mean_logit():
    register_metric("mean_logit", scores=[Score("mean_logit", "mean top logit", "", "↑",
                                                "mean over images of the highest class score")])(MeanLogit)
    try:
        yield registry.get_metric("mean_logit")
    finally:
        unregister_metric("mean_logit")
    assert "mean_logit" not in ALL_METRICS and registry.score_of("mean_logit") is None


def test_a_registered_metric_is_evaluated_tabulated_and_compared(world, mean_logit):
    assert "mean_logit" in ALL_METRICS and "mean_logit" in DEFAULT_METRICS
    cfg = _cfg(world)
    model = tiny_model(num_classes=3, seed=1)
    result = evaluate(model, cfg, progress=False)
    images, _ = _images_and_labels(world, cfg)
    with torch.no_grad():
        expected = model.eval()(images).logits.max(dim=1).values.double().mean().item()
    assert result["mean_logit"] == pytest.approx(expected, rel=1e-6)
    assert "mean_logit" in result["metrics_requested"]
    assert next(ln for ln in format_table(result).splitlines() if ln.startswith("mean top logit")).split()[-1] == "-"
    assert ("mean_logit", "mean top logit") in C.TABLE_COLUMNS and C.TABLE_COLUMNS[-1][0] == "mean_logit"
    # asked for other metrics only, it is not computed; a subset without it still works
    assert "mean_logit" not in evaluate(model, cfg, metrics=["acc"], progress=False)


def test_register_metric_refuses_a_taken_name_or_key_and_bad_fields(mean_logit):
    with pytest.raises(ValueError, match="already registered"):
        register_metric(Metric("mean_logit", scores=(Score("x", "x", "", "↑", "x"),), consumer=MeanLogit))
    with pytest.raises(ValueError, match="top1 \\(acc\\)"):
        register_metric(Metric("other", scores=(Score("top1", "x", "", "↑", "x"),), consumer=MeanLogit))
    with pytest.raises(ValueError, match="better"):
        Score("y", "y", "", "up", "y")
    with pytest.raises(ValueError, match="on="):
        Metric("z", scores=(Score("z", "z", "", "↑", "z"),), consumer=MeanLogit, on="train")
    assert "other" not in ALL_METRICS


def test_a_registered_metric_reaches_eval_compare_and_report(world, mean_logit, tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(_cfg(world).to_dict()))
    out = tmp_path / "cmp"
    assert main(["compare", "--config", str(cfg), "--kinds", "ivpt", "--seeds", "0", "--out", str(out),
                 "--no-progress"]) == 0
    run = out / "runs" / "ivpt-seed0"
    evaluation = json.loads((run / "eval.json").read_text())
    assert math.isfinite(evaluation["mean_logit"])
    compared = json.loads((out / "compare.json").read_text())
    assert compared["summary"]["ivpt"]["mean_logit"]["values"] == [evaluation["mean_logit"]]
    table = (out / "compare.md").read_text()
    assert "| mean top logit |" in table and f"| {evaluation['mean_logit']:.1f} |" in table
    capsys.readouterr()

    assert main(["eval", str(run / "best"), "--no-progress", "--out", str(tmp_path / "ev")]) == 0
    printed = capsys.readouterr().out
    assert next(ln for ln in printed.splitlines() if ln.startswith("mean top logit"))

    assert main(["report", str(run / "best"), "--out", str(tmp_path / "rep"), "--samples", "1", "--gallery-topk",
                 "1", "--device", "cpu"]) == 0
    html = (tmp_path / "rep" / "index.html").read_text()
    assert "mean top logit" in html


# ---------------------------------------------------------------------------------------- the decision metrics

def test_decision_without_a_global_part_is_all_parts(world):
    cfg = _cfg(world)
    model = tiny_model(num_classes=3, seed=2)
    assert not model.cfg.global_part and "decision" in DEFAULT_METRICS
    result = evaluate(model, cfg, progress=False)
    assert result["parts_only_top1"] == result["top1"]
    assert result["parts_agree"] == 100.0 and result["part_share"] == 1.0
    assert "decision" not in result.get("skipped", {}) and "decision" in result["metrics_requested"]
    lines = format_table(result).splitlines()
    assert next(ln for ln in lines if ln.startswith("part share")).split()[-2:] == ["1.00", "-"]


def test_decision_with_a_global_part_against_a_loop(world):
    cfg = _cfg(world, global_part=True)
    model = tiny_model(num_classes=3, seed=3, global_part=True)
    result = evaluate(model, cfg, metrics=["acc", "decision"], progress=False)
    assert 0 <= result["parts_only_top1"] <= 100 and 0 <= result["parts_agree"] <= 100
    assert 0.0 <= result["part_share"] <= 1.0
    images, labels = _images_and_labels(world, cfg)
    with torch.no_grad():
        out = model.eval()(images)
    parts_pred = out.part_logits.sum(dim=1).argmax(dim=1)
    assert result["parts_only_top1"] == pytest.approx(100.0 * (parts_pred == labels).double().mean().item())
    assert result["parts_agree"] == pytest.approx(
        100.0 * (parts_pred == out.logits.argmax(dim=1)).double().mean().item())
    assert "consistency" not in result and "stage" in result  # a subset: only what was asked


@pytest.mark.parametrize("kind", ["vpt_deep", "linear"])
def test_decision_is_skipped_without_a_part_head(world, kind):
    cfg = _cfg(world, kind=kind)
    model = create_model(cfg.model, seed=0)
    result = evaluate(model, cfg, metrics=["acc", "decision"], progress=False)
    assert result["skipped"] == {"decision": f"model.kind={kind} has no part-pooled head"}
    assert not set(DECISION) & set(result) and "top1" in result
    assert f"skipped decision: model.kind={kind} has no part-pooled head" in format_table(result)


def test_decision_columns_in_compare_md():
    evaluation = {"top1": 50.0, "parts_only_top1": 40.0, "parts_agree": 75.0, "part_share": 0.8125,
                  "eval_protocol": "corrected", "data": {"root": "/d", "split": "test", "format": "cub", "images": 4}}
    records = [{"kind": "ivpt", "seed": s, "run": f"/r{s}", "metrics": {"steps": 1}, "eval": dict(evaluation)}
               for s in (0, 1)]
    records[1]["eval"]["part_share"] = 0.6875
    table = C.format_markdown({"runs": records, "summary": C.summarise(records)})
    header = next(ln for ln in table.splitlines() if ln.startswith("| method"))
    assert header.endswith("| KPR ↓ | parts-only top-1 | parts agree | part share (0–1) |")
    assert "| 40.0 ± 0.0 | 75.0 ± 0.0 | 0.75 ± 0.09 |" in table and "| 0.81 |" in table


# ----------------------------------------------------------------------------------- a toy format: a CSV list

class CsvListDataset(AnnotatedDataset):
    """``root/list.csv``: rows ``path,class,split`` (path relative to root); classification only."""

    LAYOUT = "root/\n├── list.csv   (path,class,split)\n└── images named in it\n"
    ANNOTATION_FILES = ("list.csv",)

    @classmethod
    def read(cls, root):
        with open(root / "list.csv", newline="") as f:
            rows = list(csv.reader(f))
        names = sorted({r[1] for r in rows})
        return Records(paths=[root / r[0] for r in rows], labels=np.array([names.index(r[1]) for r in rows]),
                       splits=np.array([r[2] for r in rows]), class_names=names)


@pytest.fixture
def csvlist(tmp_path):
    register_format("csvlist")(CsvListDataset)
    root = tmp_path / "csvdata"
    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for c, name in enumerate(("ant", "bee", "cat")):
        for i in range(4):
            path = f"img/{name}{i}.png"
            pixels = (rng.random((40, 40, 3)) * 80 + 60 * c).astype(np.uint8)
            Image.fromarray(pixels).save(root / path)
            rows.append([path, name, "test" if i == 3 else "train"])
    with open(root / "list.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    try:
        yield root
    finally:
        unregister_format("csvlist")
    assert "csvlist" not in DATASET_FORMATS


def test_a_registered_format_trains_and_evaluates(csvlist, tmp_path, capsys):
    assert dataset_class("csvlist") is CsvListDataset and CsvListDataset.FORMAT == "csvlist"
    cfg = _cfg(csvlist).to_dict()
    cfg["data"]["format"] = "csvlist"
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert main(["train", "--config", str(path), "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 1 and metrics["num_classes"] == 3
    capsys.readouterr()
    assert main(["eval", str(out / "best"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "eval.json").read_text())
    assert result["data"]["format"] == "csvlist" and result["data"]["images"] == 3
    assert 0 <= result["top1"] <= 100 and {"parts_only_top1", "parts_agree"} <= set(result)
    assert result["skipped"]["consistency"] == "csvlist has no part keypoints"
    assert result["skipped"]["nmi_ari"] == "csvlist has no part keypoints or part masks"
    assert "skipped fg_iou: csvlist has no foreground masks or part masks" in printed


def test_register_format_refuses_a_taken_name_and_unknown_names_stay_errors():
    with pytest.raises(ValueError, match="already registered"):
        register_format("cub")(CsvListDataset)
    with pytest.raises(ValueError, match="identifier"):
        register_format("no such")
    with pytest.raises(DatasetError, match="unknown"):
        dataset_class("csvlist")
    with pytest.raises(ConfigError, match="data.format='csvlist' is unknown"):
        Config.from_dict({"data": {"format": "csvlist"}})
