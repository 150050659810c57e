"""``ivpt bench`` end to end on the tiny ViT: it runs in seconds and writes the promised report."""
import json

import pytest
import torch

from ivpt.bench import BenchOptions, Entry, Group, _probe_subprocess, plan, project
from ivpt.bench.phases import OTHER, PHASES, phase_of
from ivpt.cli import main

from .conftest import TINY

TINY_ARGS = ["--img-size", "56", "--batch", "2", "--repeats", "1", "--n-pro", "5,4,3", "--num-classes", "7",
             "--backbone", "vit_small_patch14_reg4_dinov2", "--backbone-kwargs", json.dumps(TINY),
             "--loader-images", "8", "--loader-image-size", "64", "--workers", "1"]
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
    # one run, side by side: eval forward / backbone forward, train step / backbone forward and / vpt_deep's
    assert report["ratios"]["ivpt_train_step_vs_backbone_forward"] == pytest.approx(
        models["ivpt"]["train_min_s"] / models["backbone"]["forward_min_s"])
    assert report["settings"]["amp"] == "none" and report["machine"]["device_memory_gb"] is None
    loader = report["loader"]
    assert loader["settings"] == {"workers": 1, "batch": 2, "img_size": 56, "images": 8, "image_size": 64,
                                  "epochs": 2}
    for path in ("cpu", "gpu_augment"):
        assert loader[path]["images"] == 16 and loader[path]["images_per_s"] > 0  # 2 timed epochs of 8
    p = report["projection"]
    best = max(("cpu", "gpu_augment"), key=lambda k: loader[k]["images_per_s"])
    assert p["loader_path"] == best and p["loader_ms_per_image"] == pytest.approx(1000 / loader[best]["images_per_s"])
    assert p["train_ms_per_image"] == models["ivpt"]["train_ms_per_image"]
    assert p["eval_ms_per_image"] == models["ivpt"]["forward_ms_per_image"]
    assert p["formula"] in md and "## Training DataLoader" in md


def test_projection_is_the_product_of_the_measured_numbers():
    # loader-bound: 50 images/s = 20 ms per image > the 10 ms step
    p = project(10.0, 2.0, 50.0)
    assert p["bound_by"] == "loader" and p["train_images_per_s"] == pytest.approx(50.0)
    assert p["epoch_s"] == pytest.approx(5994 * 0.020)  # 119.88 s
    assert p["eval_s"] == pytest.approx(5794 * 0.002)  # 11.588 s
    assert p["full_recipe_s"] == pytest.approx(25 * 119.88 + 11.588)  # 3008.588 s
    assert p["formula"].endswith("= 25 x 119.9 s + 11.6 s = 3009 s (50.1 min)")
    # step-bound: 200 images/s = 5 ms per image < the 10 ms step
    p = project(10.0, 2.0, 200.0)
    assert p["bound_by"] == "step" and p["full_recipe_s"] == pytest.approx(25 * 59.94 + 11.588)  # 1510.088 s
    assert project(10.0, 2.0, None)["full_recipe_s"] == pytest.approx(1510.088)  # no loader: the step alone


def test_phases_attribute_operators_to_the_code_that_ran_them():
    assert phase_of(["aten::addmm", "timm/layers/mlp.py(40): forward", "ivpt/models/ivpt.py(61): trunk"]) == \
        "backbone (timm blocks, embedding)"
    assert phase_of(["aten::bmm", "ivpt/models/prototypes.py(20): region_pool",
                     "ivpt/models/base.py(216): classify"]) == "region pooling"
    assert phase_of(["aten::mm", "autograd::engine::evaluate_function: MmBackward0"]) == "backward"
    assert phase_of(["aten::grid_sampler_2d", "ivpt/losses.py(150): warp", "ivpt/losses.py(160): warp_back",
                     "ivpt/losses.py(190): ivpt_losses"]) == "losses (8 terms)"
    assert phase_of(["aten::grid_sampler_2d", "ivpt/losses.py(150): warp",
                     "ivpt/engine/trainer.py(500): compute_loss"]) == "warp of the second view"
    assert phase_of(["aten::cat", "ivpt/models/ivpt.py(75): trunk"]) == OTHER
    assert len({name for name, _ in PHASES}) == len(PHASES)


def test_compiled_bench_times_the_compiled_backbone_ivpt_and_vpt_deep(tmp_path, monkeypatch):
    # torch.compile itself takes minutes on CPU; what is checked is that every timed model goes through it.
    compiled = []

    def fake_compile(fn):
        compiled.append(getattr(fn, "__name__", type(fn).__name__))
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    assert main(["bench", "--quick", "--compile", "--no-loader", "--no-memory", "--out", str(tmp_path),
                 *TINY_ARGS]) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert set(report["groups"][0]["models"]) == {"backbone", "ivpt", "vpt_deep"}
    assert sorted(compiled) == ["IVPT", "VPTDeep", "forward_features"]
    assert report["settings"]["compile"] is True
    assert "every model under torch.compile" in (tmp_path / "bench.md").read_text()


def test_full_plan_has_growth_groups():
    opts = BenchOptions(out=None, n_pro=[17, 14, 11, 8, 5])  # type: ignore[arg-type]
    names = [g.name for g in plan(opts)]
    assert names == ["main", "img_size=224", "img_size=336", "img_size=448", "img_size=518",
                     "stages=1", "stages=2", "stages=3", "stages=4"]
    assert [g.n_pro for g in plan(opts)[5:]] == [[8, 5], [11, 8, 5], [14, 11, 8, 5], [17, 14, 11, 8, 5]]
    assert [g.name for g in plan(BenchOptions(out=None, quick=True))] == ["main"]  # type: ignore[arg-type]


def test_growth_tables_and_variants(tmp_path):
    assert main(["bench", "--out", str(tmp_path), *TINY_ARGS, "--sizes", "56,70", "--stages", "2",
                 "--variants", "--no-memory", "--threads", "1", "--no-loader", "--profile"]) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["loader"] is None and report["projection"]["loader_path"] is None
    phases = report["groups"][0]["models"]["ivpt"]["train_phases"]
    names = {r["phase"] for r in phases}
    for phase in ("backward", "backbone (timm blocks, embedding)", "concept maps", "region pooling",
                  "losses (8 terms)", "optimiser (Adam)"):
        assert phase in names, phase
    assert sum(r["share"] for r in phases) == pytest.approx(1.0)
    assert (tmp_path / "profile_ivpt_train.txt").is_file() and "## Where an ivpt train step" in (
        tmp_path / "bench.md").read_text()
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


def test_targets_per_device_and_precision():
    from ivpt.bench import _targets, targets

    assert targets("cuda", "bf16")["ivpt_forward_vs_backbone"] == {"max": 1.05}
    assert targets("cuda", "none")["ivpt_forward_vs_backbone"] == {"max": 1.03}
    assert targets("cpu", "none") == {"ivpt_forward_vs_backbone": {"max": 1.10},
                                      "ivpt_train_step_vs_vpt_deep": {"max": 1.5}}
    ratios = {"ivpt_forward_vs_backbone": 1.04, "ivpt_train_step_vs_backbone_forward": 3.2}
    got = _targets("cuda", "bf16", ratios, {}, project(0.5, 0.4, 1600.0))
    assert got["ivpt_forward_vs_backbone"]["met"] and not got["ivpt_train_step_vs_backbone_forward"]["met"]
    assert got["train_images_per_s"] == {"min": 1500.0, "measured": pytest.approx(1600.0), "measured_median": None,
                                         "met": True}
    assert got["full_recipe_s"]["measured"] == pytest.approx(25 * 5994 * 0.000625 + 5794 * 0.0004)
    assert got["full_recipe_s"]["met"]
