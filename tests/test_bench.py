"""``ivpt bench`` end to end on the tiny ViT: it runs in seconds and writes the promised report."""
import json

from ivpt.bench import BenchOptions, Entry, Group, _probe_subprocess, plan
from ivpt.cli import main

from .conftest import TINY

TINY_ARGS = ["--img-size", "56", "--batch", "2", "--repeats", "1", "--n-pro", "5,4,3", "--num-classes", "7",
             "--backbone", "vit_small_patch14_reg4_dinov2", "--backbone-kwargs", json.dumps(TINY)]
KINDS = ["ivpt", "linear", "vpt_shallow", "vpt_deep", "last_layer_parts"]


def test_quick_bench_writes_report(tmp_path, capsys):
    assert main(["bench", "--quick", "--out", str(tmp_path), *TINY_ARGS]) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    for key in ("ivpt_forward_vs_backbone", "ivpt_train_step_vs_vpt_deep"):
        assert report["ratios"][key] > 0 and report["ratios_median"][key] > 0
        assert report["targets"][key]["measured"] == report["ratios"][key]
    assert report["machine"]["device"] == "cpu" and report["machine"]["threads"] >= 1
    assert report["machine"]["torch"] and report["settings"]["train_tokens"] is True
    assert "paper" in report["settings"]["trainable_set"]
    (main_group,) = report["groups"]  # --quick: the main comparison only
    models = main_group["models"]
    assert set(models) == {"backbone", *KINDS}
    assert models["backbone"]["train_median_s"] is None and models["backbone"]["trainable_params"] == 0
    for kind in KINDS:
        m = models[kind]
        assert m["forward_median_s"] > 0 and m["train_median_s"] > 0 and m["trainable_params"] > 0
        assert m["forward_min_s"] == min(m["forward_s"]) and m["train_ms_per_image"] > 0
        assert len(m["forward_s"]) == len(m["train_s"]) == 1
        assert m["forward_peak_mb"] >= 0 and m["train_peak_mb"] >= 0
    md = (tmp_path / "bench.md").read_text()
    assert "| ivpt |" in md and "ivpt_train_step_vs_vpt_deep" in md
    assert md in capsys.readouterr().out


def test_full_plan_has_growth_groups():
    opts = BenchOptions(out=None, n_pro=[17, 14, 11, 8, 5])  # type: ignore[arg-type]
    names = [g.name for g in plan(opts)]
    assert names == ["main", "img_size=224", "img_size=336", "img_size=448", "img_size=518",
                     "stages=1", "stages=2", "stages=3", "stages=4"]
    assert [g.n_pro for g in plan(opts)[5:]] == [[8, 5], [11, 8, 5], [14, 11, 8, 5], [17, 14, 11, 8, 5]]
    assert [g.name for g in plan(BenchOptions(out=None, quick=True))] == ["main"]  # type: ignore[arg-type]


def test_growth_tables_and_variants(tmp_path):
    assert main(["bench", "--out", str(tmp_path), *TINY_ARGS, "--sizes", "56,70", "--stages", "2",
                 "--variants", "--no-memory", "--threads", "1"]) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert [g["name"] for g in report["groups"]] == ["main", "img_size=56", "img_size=70", "stages=1"]
    assert "ivpt[1 view]_train_step_vs_vpt_deep" in report["ratios"]
    assert report["groups"][3]["n_pro"] == [4, 3]
    assert report["machine"]["threads"] == 1
    assert "## Growth" in (tmp_path / "bench.md").read_text()


def test_memory_probe_subprocess_fallback(tmp_path):
    opts = BenchOptions(out=tmp_path, backbone="vit_small_patch14_reg4_dinov2", backbone_kwargs=dict(TINY),
                        batch=2, img_size=56, n_pro=[5, 4, 3], num_classes=7)
    group = Group("main", 56, [5, 4, 3], [])
    assert _probe_subprocess(opts, group, Entry("ivpt", "ivpt"), "train") >= 0
