"""Model kinds: one registration each (a toy kind defined in this file trains and evaluates through ``ivpt train`` /
``ivpt eval`` without touching another module), the run folders of an earlier version (tests/fixtures/runs) resume
and evaluate as they were trained, a checkpoint keeps its input normalisation, and ONE rule —
:func:`ivpt.config.config_changes`, following each kind's config class — decides for ``ivpt compare``, the demo and
``ivpt train --resume`` which config changes matter to a run."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import ivpt.compare as C
from ivpt.cli import main
from ivpt.config import (IMAGENET_MEAN, IMAGENET_STD, MODEL_KINDS, Config, ConfigError, IVPTConfig, ModelConfig,
                         VPTConfig, config_changes, load_config, model_config, saved_config)
from ivpt.data.synth import make_partworld
from ivpt.models import MODELS, FrozenViT, ModelOutput, register_model, unregister_model
from ivpt.runs import RunConflict, load_run, reuse_state, run_config

from .test_engine import tiny_config

FIXTURES = Path(__file__).parent / "fixtures" / "runs"
KINDS = ("ivpt", "linear", "vpt_shallow", "vpt_deep", "last_layer_parts", "vpt_deep_proto")

# Per kind: overrides it does not read (a run differing only in them is reused and resumed), and one it reads.
UNREAD = {
    "ivpt": [],  # with global_part and deep_prompts on (the fixture), IVPT reads every model and loss field
    "linear": ["model.n_pro=6,4,3", "model.train_tokens=false", "model.num_prompts=4", "loss.consistency=0.5"],
    "vpt_shallow": ["model.n_pro=6,4,3", "model.global_part=false", "loss.tv=0.5", "loss.eq_scale=0.9,1.1"],
    "vpt_deep": ["model.gumbel_tau=2.0", "model.prototype_init=feature_mean", "loss.presence=0.0"],
    "last_layer_parts": ["model.num_prompts=4", "model.deep_prompts=false", "model.eval_gumbel=true"],
    "vpt_deep_proto": ["model.gumbel_tau=2.0", "model.train_gumbel=false"],
}
READ = {"ivpt": "model.gumbel_tau=2.0", "linear": "model.num_classes=4", "vpt_shallow": "model.num_prompts=3",
        "vpt_deep": "model.train_tokens=false", "last_layer_parts": "loss.consistency=0.5",
        "vpt_deep_proto": "model.n_pro=6,4,3"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The part-world the fixtures were trained on (tests/fixtures/make_runs.py), made again."""
    root = tmp_path_factory.mktemp("world")
    make_partworld(root, classes=3, per_class=8, size=56, seed=0, test_fraction=0.25)
    return root


def test_each_kind_is_registered_once_with_its_config_class():
    assert tuple(MODEL_KINDS) == tuple(MODELS) == (*KINDS, "prompt_cam")  # prompt_cam: newer than the fixtures
    for kind, entry in MODEL_KINDS.items():
        cls = MODELS[kind]
        assert (cls.kind, cls.config_class, entry.concept_maps) == (kind, entry.config, cls.has_concept_maps)
        assert type(model_config(kind=kind)) is entry.config
    with pytest.raises(ValueError, match="already registered"):
        register_model("vpt_deep", config=VPTConfig)(type("Other", (FrozenViT,), {}))


def test_a_model_section_is_its_kinds_class_and_ignores_what_other_kinds_read():
    cfg = Config.from_dict({"model": {"kind": "vpt_deep", "n_pro": [5, 4, 3], "num_prompts": "3"}})
    assert type(cfg.model) is VPTConfig and cfg.model.num_prompts == 3 and not hasattr(cfg.model, "n_pro")
    assert "n_pro" not in cfg.to_dict()["model"]
    assert Config().with_overrides(["model.kind=linear", "model.gumbel_tau=2"]).model == model_config(kind="linear")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['n_proo'\] in section 'model'; valid keys: .*n_pro"):
        Config.from_dict({"model": {"n_proo": [5, 4, 3]}})
    with pytest.raises(ConfigError, match="model has no field 'bogus'"):
        Config().with_overrides(["model.bogus=1"])
    with pytest.raises(ConfigError, match=r"model.n_pro=\['a'\]|model.n_pro\[0\]='a'"):  # still read by its type
        Config.from_dict({"model": {"kind": "linear", "n_pro": ["a"]}})
    with pytest.raises(ConfigError, match="model.kind='vpt_deep' is configured by VPTConfig, not IVPTConfig"):
        IVPTConfig(kind="vpt_deep")
    with pytest.raises(ConfigError, match="model.kind='vpt_medium' is unknown; choose one of ivpt, linear"):
        Config.from_dict({"model": {"kind": "vpt_medium"}})
    for path in sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")):
        for kind in KINDS:
            assert load_config(path, [f"model.kind={kind}"]).model.kind == kind


def test_config_changes_follow_the_config_class():
    ivpt = Config.from_dict({"model": {"global_part": False, "deep_prompts": False}})
    vpt = ivpt.with_overrides(["model.kind=vpt_deep"])

    def changes(cfg, *overrides):
        return config_changes(cfg, cfg.with_overrides(list(overrides)))

    assert changes(vpt, "model.n_pro=5,4,3", "model.gumbel_tau=3", "loss.tv=0", "loss.eq_rotation_deg=10") == []
    assert changes(vpt, "model.num_prompts=3", "loss.classification=0.5", "optim.base_lr=0.1") == [
        "model.num_prompts", "loss.classification", "optim.base_lr"]
    assert changes(ivpt, "model.global_share=0.5", "model.num_prompts=3") == []  # unread with these values
    assert changes(ivpt, "model.global_part=true", "model.global_share=0.5") == ["model.global_part",
                                                                                  "model.global_share"]
    assert changes(ivpt, "loss.tv=0") == ["loss.tv"]
    assert config_changes(ivpt, vpt)[:1] == ["model.kind"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_run_of_an_earlier_version_resumes_evaluates_and_is_reused_as_trained(kind, world, tmp_path, monkeypatch,
                                                                               capsys):
    out = tmp_path / "cmp"
    run = out / "runs" / f"{kind}-seed3"
    shutil.copytree(FIXTURES / kind, run)
    old = yaml.safe_load((run / "config.yaml").read_text())
    assert set(old["model"]) >= {"n_pro", "gumbel_tau", "num_prompts"}  # one flat section for every kind

    # Read as trained: every field of the kind's config as saved, the defaults' normalisation (none was kept).
    cfg, meta = run_config(run / "best")
    assert type(cfg.model) is MODEL_KINDS[kind].config
    fields = dataclasses.asdict(cfg.model)
    assert {k: fields[k] for k in old["model"] if k in fields} == {
        k: v for k, v in old["model"].items() if hasattr(cfg.model, k)}
    newer = {k: v for k, v in fields.items() if k not in old["model"]}  # fields added after the fixture was saved
    added = {"global_share_end": None, "prototype_init_spread": 1.0}  # off / the centres themselves: as it trained
    assert newer == {k: v for k, v in added.items() if k in fields}
    assert "data" not in meta and (cfg.data.mean, cfg.data.std) == (list(IMAGENET_MEAN), list(IMAGENET_STD))
    model, _, _ = load_run(run / "best")
    assert type(model) is MODELS[kind]

    # A change the kind does not read: resumed (one more step) and, finished, reused by compare without training.
    assert main(["train", "--resume", str(run), f"data.root={world}", "train.max_steps=2", *UNREAD[kind],
                 "--no-progress"]) == 0
    assert json.loads((run / "metrics.json").read_text())["steps"] == 2
    assert main(["eval", str(run / "best"), "--data", str(world), "--no-progress"]) == 0
    capsys.readouterr()
    # The config it was trained with: the fields it predates as they were then (train.selection=best_top1).
    base = Config.from_dict(saved_config(old)).with_overrides([f"data.root={world}", "train.max_steps=2"])
    assert base.train.selection == "best_top1" and reuse_state(run, base) == "finished"
    monkeypatch.setattr(C, "train", lambda *a, **k: pytest.fail("a reusable run was trained again"))
    lines: list[str] = []
    result = C.compare(base, out, kinds=[kind], seeds=[3], progress=False, say=lines.append)
    assert "finished earlier, reusing" in lines[0] and result["runs"][0]["kind"] == kind

    # Today's defaults choose best/ otherwise: refused, naming the key. A change it reads: refused by compare and by
    # --resume alike, naming the key.
    with pytest.raises(C.CompareError, match=r"holds a run with another config \(train.selection\)"):
        C.compare(base.with_overrides(["train.selection=latest_within_se"]), out, kinds=[kind], seeds=[3],
                  progress=False, say=lines.append)
    key = READ[kind].split("=")[0]
    with pytest.raises(C.CompareError, match=rf"holds a run with another config \({key}\)"):
        C.compare(base.with_overrides([READ[kind]]), out, kinds=[kind], seeds=[3], progress=False, say=lines.append)
    assert main(["train", "--resume", str(run), READ[kind], "--no-progress"]) == 2
    assert f"differs from the checkpoint's in {key}" in capsys.readouterr().err


def test_a_checkpoint_keeps_the_normalisation_it_was_trained_with(world, tmp_path):
    cfg = tiny_config(world, model=dict(kind="linear"), train=dict(max_steps=1),
                      data=dict(mean=[0.5, 0.4, 0.3], std=[0.25, 0.2, 0.15]))
    run = tmp_path / "run"
    assert main(["train", "--config", str(_write(tmp_path, cfg)), "--out", str(run), "--no-progress"]) == 0
    alone = tmp_path / "copied" / "best"
    shutil.copytree(run / "best", alone)  # without the run's config.yaml beside it
    ckpt_cfg, meta = run_config(alone)
    assert meta["data"] == {"mean": [0.5, 0.4, 0.3], "std": [0.25, 0.2, 0.15]}
    assert (ckpt_cfg.data.mean, ckpt_cfg.data.std) == ([0.5, 0.4, 0.3], [0.25, 0.2, 0.15])
    older = tmp_path / "older" / "best"
    shutil.copytree(FIXTURES / "linear" / "best", older)  # saved before the normalisation was kept: the defaults
    assert run_config(older)[0].data.mean == list(IMAGENET_MEAN)


# ------------------------------------------------------------------------------------------- a kind of our own
@pytest.fixture
def mean_patch_probe():
    """A new model kind in one class and one registration line: a linear probe on the mean final-normed patch
    token. Its config is the base ModelConfig: it reads nothing more."""

    @register_model("mean_patch_probe", config=ModelConfig)
    class MeanPatchProbe(FrozenViT):
        def __init__(self, cfg: ModelConfig, backbone: nn.Module | None = None) -> None:
            super().__init__(cfg, backbone)
            self.classifier = nn.Linear(self.dim, cfg.num_classes)
            self.set_trainable()

        def groups(self, head_lr, concept_lr):
            return [("classifier", list(self.classifier.parameters()), head_lr)]

        def forward(self, x: torch.Tensor) -> ModelOutput:
            with torch.no_grad():
                tokens, _ = self.embed(x)
                normed = self.backbone.norm(self.backbone.blocks(tokens))
            logits = self.classifier(normed[:, self.num_prefix:].mean(dim=1))
            return ModelOutput(logits=logits, part_logits=logits[:, None], maps=[], grouped_maps=[], assignments=[],
                               region_counts=[], modulated=None, tokens=normed)

    try:
        yield MeanPatchProbe
    finally:
        unregister_model("mean_patch_probe")


def test_a_kind_defined_elsewhere_trains_and_evaluates_through_the_cli(mean_patch_probe, world, tmp_path, capsys):
    cfg_file = _write(tmp_path, tiny_config(world, train=dict(max_steps=1)))
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg_file), "--out", str(run), "model.kind=mean_patch_probe",
                 "--no-progress"]) == 0
    assert main(["eval", str(run / "best"), "--data", str(world), "--no-progress"]) == 0
    evaluation = json.loads((run / "eval.json").read_text())
    assert 0 <= evaluation["top1"] <= 100 and evaluation["data"]["images"] > 0
    saved = yaml.safe_load((run / "config.yaml").read_text())["model"]
    assert set(saved) == {f.name for f in dataclasses.fields(ModelConfig)} and saved["kind"] == "mean_patch_probe"
    model, cfg, _ = load_run(run / "best")
    assert isinstance(model, mean_patch_probe) and [n for n, p in model.named_parameters() if p.requires_grad] == [
        "classifier.weight", "classifier.bias"]
    # What matters to it follows from its config class: n_pro, prompts and the map losses do not.
    assert reuse_state(run, cfg.with_overrides(["model.n_pro=9,3", "model.num_prompts=2", "loss.tv=0"])) == "finished"
    with pytest.raises(RunConflict, match=r"another config \(model.img_size\)"):
        reuse_state(run, cfg.with_overrides(["model.img_size=70"]))
    capsys.readouterr()


def test_an_unregistered_kind_is_unknown_again(mean_patch_probe):
    unregister_model("mean_patch_probe")
    try:
        with pytest.raises(ConfigError, match="model.kind='mean_patch_probe' is unknown"):
            Config.from_dict({"model": {"kind": "mean_patch_probe"}})
        assert "mean_patch_probe" not in MODELS
    finally:
        register_model("mean_patch_probe", config=ModelConfig)(mean_patch_probe)  # for the fixture's unregister


def _write(tmp_path: Path, cfg: Config) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path
