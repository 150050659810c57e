"""Fault injection for configuration values and command-line numbers: every out-of-range, non-finite or impossible
number is refused before any work starts, with ONE line naming the field (or flag), the value and the allowed range;
the ``ivpt`` command turns it into exit status 2, and ``--debug`` shows the traceback instead.

The systematic tests are generated from the config dataclasses, so a numeric field added later is covered (and
must declare its bounds) without touching this file."""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path

import pytest
import torch
import yaml

from ivpt import runtime
from ivpt.checkpoint import OutputError
from ivpt.cli import main
from ivpt.config import MODEL_KINDS, SECTIONS, Config, ConfigError, load_config

from .test_bench import TINY_ARGS
from .test_engine import tiny_config
from .test_faults import _one_line_error

ROOT = Path(__file__).resolve().parents[1]
NAN = float("nan")


def _numeric(hint) -> tuple[type, bool, bool] | None:
    """(int or float, is a list, may be None) for a numeric field's type hint; None for any other field."""
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional, hint = len(args) < len(typing.get_args(hint)), args[0]
    if typing.get_origin(hint) is list:
        (inner,) = typing.get_args(hint)
        return (inner, True, optional) if inner in (int, float) else None
    return (hint, False, optional) if hint in (int, float) else None


# Every section's class; for the model section, each registered kind's config class, with the kind (the first
# kind that reads a field checks it).
CLASSES = [(section, cls, {}) for section, cls in SECTIONS.items() if section != "model"]
CLASSES += [("model", k.config, {"kind": k.name}) for k in MODEL_KINDS.values()]
NUMERIC, CLASS_OF = [], {}
for section, cls, extra in CLASSES:
    for f in dataclasses.fields(cls):
        if (kind := _numeric(typing.get_type_hints(cls)[f.name])) is not None and (section, f.name) not in CLASS_OF:
            NUMERIC.append((section, f, *kind))
            CLASS_OF[section, f.name] = (cls, extra)
IDS = [f"{section}.{f.name}" for section, f, *_ in NUMERIC]


def _default(cls, f):
    return getattr(cls(), f.name)


def test_the_numeric_fields_are_found():
    names = set(IDS)
    assert {"optim.base_lr", "train.seed", "data.std", "optim.betas", "model.global_share", "model.n_pro"} <= names
    assert len(NUMERIC) >= 50 and "train.device" not in names and "model.backbone_kwargs" not in names


@pytest.mark.parametrize("section,f,kind,is_list,optional", NUMERIC, ids=IDS)
def test_every_numeric_field_declares_its_bounds(section, f, kind, is_list, optional):
    assert "limits" in f.metadata, f"{section}.{f.name} declares no bounds: field(metadata=...) in ivpt.config"


@pytest.mark.parametrize("section,f,kind,is_list,optional", NUMERIC, ids=IDS)
def test_nan_is_refused_for_every_numeric_field(section, f, kind, is_list, optional):
    """nan through a dataclass, a config mapping (YAML's .nan) and a dotted override: refused, the field named."""
    cls, extra = CLASS_OF[section, f.name]
    key = f"{section}.{f.name}"
    value = [NAN] * len(_default(cls, f)) if is_list else NAN
    with pytest.raises(ConfigError, match=rf"^(override ')?{key}\b") as direct:
        cls(**{f.name: value})
    assert "\n" not in str(direct.value)
    with pytest.raises(ConfigError, match=rf"^(override ')?{key}\b"):
        Config.from_dict({section: {**extra, f.name: value}})
    raw = ",".join(["nan"] * len(value)) if is_list else "nan"
    with pytest.raises(ConfigError, match=rf"^(override ')?{key}\b"):
        Config().with_overrides([f"{section}.{k}={v}" for k, v in extra.items()] + [f"{key}={raw}"])


FLOATS = [p for p in NUMERIC if p[2] is float]


@pytest.mark.parametrize("section,f,kind,is_list,optional", FLOATS, ids=[f"{s}.{f.name}" for s, f, *_ in FLOATS])
@pytest.mark.parametrize("bad", [math.inf, -math.inf])
def test_infinity_is_refused_for_every_float_field(section, f, kind, is_list, optional, bad):
    cls, extra = CLASS_OF[section, f.name]
    value = [bad] * len(_default(cls, f)) if is_list else bad
    with pytest.raises(ConfigError, match=rf"^{section}\.{f.name}(\[0\])?={bad} (is .* and )?must be a finite number"):
        Config.from_dict({section: {**extra, f.name: value}})


def test_a_none_able_field_still_takes_null():
    assert Config().with_overrides(["model.global_share=null"]).model.global_share is None
    assert Config.from_dict({"model": {"global_share": None}}).model.global_share is None


def test_the_message_names_field_value_and_range():
    def error(*overrides: str) -> str:
        with pytest.raises(ConfigError) as info:
            Config().with_overrides(list(overrides))
        return str(info.value)

    assert error("optim.base_lr=nan") == "optim.base_lr=nan must be a finite number > 0"
    assert error("optim.base_lr=-0.1") == "optim.base_lr=-0.1 must be > 0"
    assert error("train.seed=-1") == "train.seed=-1 must be a whole number from 0 to 2147483647"
    assert error("optim.betas=0.9,1.0") == "optim.betas[1]=1.0 must be in [0, 1)"
    assert error("data.color_jitter=0.2,0.2,0.2,0.7") == (
        "data.color_jitter[3]=0.7 must be in [0, 0.5] (brightness, contrast, saturation, hue)")


# Every value below ran (or crashed with a traceback deep inside torch, timm or numpy) before it was validated.
BAD = [
    ("optim.base_lr=nan", "optim.base_lr=nan", "a finite number > 0"),
    ("optim.base_lr=inf", "optim.base_lr=inf", "a finite number > 0"),
    ("train.seed=-1", "train.seed=-1", "from 0 to 2147483647"),
    ("train.seed=4294967296", "train.seed=4294967296", "from 0 to 2147483647"),
    ("data.num_workers=-1", "data.num_workers=-1", ">= 0"),
    ("optim.weight_decay=-0.01", "optim.weight_decay=-0.01", ">= 0"),
    ("optim.betas=0.9,1.0", "optim.betas[1]=1.0", "in [0, 1)"),
    ("optim.betas=1.5,0.999", "optim.betas[0]=1.5", "in [0, 1)"),
    ("optim.betas=-0.1,0.999", "optim.betas[0]=-0.1", "in [0, 1)"),
    ("optim.betas=0.9", "optim.betas=[0.9]", "2 numbers"),
    ("optim.grad_clip=nan", "optim.grad_clip=nan", "a finite number"),
    ("optim.head_lr_mult=0", "optim.head_lr_mult=0.0", "> 0"),
    ("optim.concept_lr_mult=-1", "optim.concept_lr_mult=-1.0", "> 0"),
    ("data.std=0,0.224,0.225", "data.std[0]=0.0", "> 0"),
    ("data.std=0.229,-0.224,0.225", "data.std[1]=-0.224", "> 0"),
    ("data.mean=nan,0.456,0.406", "data.mean[0]=nan", "a finite number in [0, 1]"),
    ("data.color_jitter=-0.1,0.2,0.2,0.05", "data.color_jitter[0]=-0.1", ">= 0"),
    ("data.color_jitter=0.2,0.2,0.2,0.6", "data.color_jitter[3]=0.6", "in [0, 0.5]"),
    ("data.color_jitter=0.2,0.2", "data.color_jitter=[0.2, 0.2]", "4 numbers"),
    ("data.affine_scale=0,1.2", "data.affine_scale[0]=0.0", "> 0"),
    ("data.affine_scale=1.2,0.8", "data.affine_scale=[1.2, 0.8]", "low <= high"),
    ("data.affine_scale=1.0", "data.affine_scale=[1.0]", "2 numbers"),
    ("data.affine_degrees=-10", "data.affine_degrees=-10.0", "in [0, 180]"),
    ("data.affine_translate=1.5", "data.affine_translate=1.5", "in [0, 1]"),
    ("data.resize=-5", "data.resize=-5", ">= 0"),
    ("loss.eq_scale=0,1.4", "loss.eq_scale[0]=0.0", "> 0"),
    ("loss.eq_rotation_deg=nan", "loss.eq_rotation_deg=nan", "a finite number in [0, 180]"),
    ("loss.eq_translate=-0.1", "loss.eq_translate=-0.1", "in [0, 1]"),
    ("loss.tv=inf", "loss.tv=inf", "a finite number >= 0"),
    ("model.gumbel_tau=nan", "model.gumbel_tau=nan", "a finite number > 0"),
    ("model.prototype_init_std=0", "model.prototype_init_std=0.0", "> 0"),
    ("model.prototype_init_spread=1.5", "model.prototype_init_spread=1.5", "in (0, 1]"),
    ("eval.noise_std=-1", "eval.noise_std=-1.0", ">= 0"),
    ("eval.noise_clip=nan", "eval.noise_clip=nan", "a finite number >= 0"),
    ("eval.active_threshold=nan", "eval.active_threshold=nan", "a finite number in [0, 1)"),
    ("eval.half_size=0", "eval.half_size=0", "at least 1"),
    ("model.backbone_kwargs={embed_dim: 30, num_heads: 4}", "model.backbone_kwargs", "num_heads=4"),
    ("model.backbone_kwargs={drop_rate: .nan}", "model.backbone_kwargs.drop_rate=nan", "a finite number"),
    ("model.backbone_kwargs={depth: 0}", "model.backbone_kwargs.depth=0", "at least 1"),
    ("train.device=gpu", "train.device='gpu'", "auto, cpu, cuda, cuda:N"),
]


@pytest.mark.parametrize("override,named,allowed", BAD, ids=[b[0] for b in BAD])
def test_bad_value_is_refused_with_field_value_and_range(override, named, allowed):
    with pytest.raises(ConfigError) as info:
        Config().with_overrides([override])
    message = str(info.value)
    assert message.startswith(named) and allowed in message and "\n" not in message, message


def test_bounds_and_defaults_of_bundled_and_test_configs_still_validate(tmp_path):
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(path)
    cfg = tiny_config(tmp_path)
    Config.from_dict(cfg.to_dict())
    Config.from_json(Config().to_json())


# --------------------------------------------------------------------------------------------- the device


def test_cuda_without_a_gpu_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for requested in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError) as info:
            runtime.resolve_device(requested)
        message = str(info.value)
        assert "no CUDA device is visible" in message and "cpu" in message and "auto" in message, message
        assert requested in message
    assert runtime.resolve_device("auto") == torch.device("cpu")
    assert runtime.resolve_device("cpu") == torch.device("cpu")


def test_a_cuda_index_beyond_the_visible_gpus_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"'cuda:2'.* 2 CUDA device"):
        runtime.resolve_device("cuda:2")
    assert runtime.resolve_device("cuda:1") == torch.device("cuda", 1)


def test_an_unknown_device_string_is_one_line():
    with pytest.raises(ConfigError, match="'tpu'"):
        runtime.resolve_device("tpu")


def test_train_on_cuda_without_a_gpu_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = _write(tmp_path, tiny_config(tmp_path / "nowhere"))
    err = _one_line_error(capsys, main(["train", "--config", str(cfg), "--out", str(tmp_path / "r"),
                                        "train.device=cuda"]))
    assert err.startswith("error: train.device='cuda'") and "no CUDA device is visible" in err, err
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------------------------- the CLI


def _write(tmp_path: Path, cfg: Config, **replace) -> Path:
    data = cfg.to_dict()
    for key, value in replace.items():
        section, name = key.split("__")
        data[section][name] = value
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("override,named", [
    ("optim.base_lr=nan", "optim.base_lr=nan"),
    ("train.seed=-3", "train.seed=-3"),
    ("data.num_workers=-2", "data.num_workers=-2"),
    ("data.std=0,1,1", "data.std[0]=0.0"),
])
def test_train_refuses_a_bad_number_in_one_line_before_any_work(tmp_path, capsys, override, named):
    cfg = _write(tmp_path, tiny_config(tmp_path / "nowhere"))
    err = _one_line_error(capsys, main(["train", "--config", str(cfg), "--out", str(tmp_path / "r"), override]))
    assert err.startswith(f"error: {named} must be") and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()


def test_debug_reraises_the_config_error_with_its_traceback(tmp_path):
    cfg = _write(tmp_path, tiny_config(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"^optim.base_lr=nan must be a finite number > 0$"):
        main(["--debug", "train", "--config", str(cfg), "--out", str(tmp_path / "r"), "optim.base_lr=nan"])


def test_yaml_nan_and_inf_in_a_config_file_are_refused_by_info(tmp_path, capsys):
    cfg = _write(tmp_path, tiny_config(tmp_path), optim__base_lr=NAN)
    assert ".nan" in cfg.read_text()
    err = _one_line_error(capsys, main(["info", "--config", str(cfg), "--weights", "random"]))
    assert err == "error: optim.base_lr=nan must be a finite number > 0\n"
    cfg = _write(tmp_path, tiny_config(tmp_path), data__std=[0.2, math.inf, 0.2])
    err = _one_line_error(capsys, main(["info", "--config", str(cfg), "--weights", "random"]))
    assert err.startswith("error: data.std[1]=inf must be a finite number > 0")


def test_info_refuses_adam_betas_of_one(tmp_path, capsys):
    cfg = _write(tmp_path, tiny_config(tmp_path))
    err = _one_line_error(capsys, main(["info", "--config", str(cfg), "--weights", "random", "optim.betas=1,1"]))
    assert err.startswith("error: optim.betas[0]=1.0 must be in [0, 1)")


def test_info_refuses_an_image_smaller_than_one_patch(tmp_path, capsys):
    cfg = _write(tmp_path, tiny_config(tmp_path))
    err = _one_line_error(capsys, main(["info", "--config", str(cfg), "--weights", "random", "model.img_size=7"]))
    assert err.startswith("error: model.img_size=7") and "patch size 14" in err and "model.img_size=14" in err


def test_a_concept_model_refuses_a_patch_grid_below_3x3(tmp_path, capsys):
    """At 28 px (a 2x2 grid) the presence loss's 3x3 pooling crashed the first training step with a traceback from
    avg_pool2d; a baseline without concept maps still builds there."""
    cfg = _write(tmp_path, tiny_config(tmp_path))
    err = _one_line_error(capsys, main(["info", "--config", str(cfg), "--weights", "random", "model.img_size=28"]))
    assert err.startswith("error: model.img_size=28 gives a 2x2 patch grid") and "model.img_size=42" in err, err
    assert main(["info", "--config", str(cfg), "--weights", "random", "model.img_size=28",
                 "model.kind=vpt_deep"]) == 0


def test_info_refuses_heads_that_do_not_divide_the_width(tmp_path, capsys):
    """The tiny test ViT's width and heads come from model.backbone_kwargs; with only num_heads given the width is
    the named backbone's (384 for ViT-S), which timm checks: both are one line naming model.backbone_kwargs."""
    cfg = _write(tmp_path, tiny_config(tmp_path))
    err = _one_line_error(capsys, main(["info", "--config", str(cfg), "--weights", "random",
                                        "model.backbone_kwargs={depth: 4, embed_dim: 32, num_heads: 3}"]))
    assert err.startswith("error: model.backbone_kwargs") and "embed_dim=32" in err and "num_heads=3" in err, err
    err = _one_line_error(capsys, main(["info", "--config", str(cfg), "--weights", "random",
                                        "model.backbone=vit_small_patch14_dinov2",
                                        "model.backbone_kwargs={depth: 2, num_heads: 5}"]))
    assert err.startswith("error: model.backbone='vit_small_patch14_dinov2'") and "backbone_kwargs" in err, err


# --------------------------------------------------------------------------------------------- ivpt synth / bench
# A flag's number is checked by its argparse type, as the other commands' (ivpt.cli.common.positive_int): exit 2 with
# one error line naming the flag (the usage is one --help away), before anything is written.


def _usage_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1 and err.count("\n") == 1, err
    return err.strip()


@pytest.mark.parametrize("flags,expected", [
    (["--seed", "-1"], "argument --seed: -1 is not a whole number >= 0"),
    (["--classes", "1"], "argument --classes: 1 is not a whole number from 2 to 300"),
    (["--per-class", "0"], "argument --per-class: 0 is not a positive whole number"),
    (["--size", "8"], "argument --size: 8 is not a whole number >= 16"),
    (["--test-fraction", "nan"], "argument --test-fraction: nan is not a number in [0, 1]"),
    (["--workers", "0"], "argument --workers: 0 is not a positive whole number"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_synth_refuses_bad_numbers_in_one_line(tmp_path, capsys, flags, expected):
    out = tmp_path / "w"
    line = _usage_error(capsys, ["synth", str(out), "--per-class", "1", "--size", "16", "--no-progress", *flags])
    assert line.startswith(f"ivpt synth: error: {expected}"), line
    assert not out.exists()


def test_synth_existing_dataset_is_one_line_on_stderr_and_debug_raises(tmp_path, capsys):
    out = tmp_path / "w"
    argv = ["synth", str(out), "--classes", "2", "--per-class", "1", "--size", "16", "--no-progress"]
    assert main(argv) == 0
    capsys.readouterr()
    err = _one_line_error(capsys, main(argv))
    assert "already holds a dataset" in err and "--overwrite" in err
    with pytest.raises(OutputError, match="already holds a dataset"):
        main(["--debug", *argv])


@pytest.mark.parametrize("flags,expected", [
    (["--batch", "0"], "argument --batch: 0 is not a positive whole number"),
    (["--repeats", "0"], "argument --repeats: 0 is not a positive whole number"),
    (["--img-size", "0"], "argument --img-size: 0 is not a positive whole number"),
    (["--threads", "0"], "argument --threads: 0 is not a positive whole number"),
    (["--workers", "-1"], "argument --workers: -1 is not a whole number >= 0"),
    (["--loader-images", "0"], "argument --loader-images: 0 is not a positive whole number"),
    (["--loader-image-size", "0"], "argument --loader-image-size: 0 is not a positive whole number"),
    (["--num-classes", "1"], "argument --num-classes: 1 is not a whole number >= 2"),
    (["--n-pro", "5"], "argument --n-pro: '5' needs at least 2 comma-separated whole numbers"),
    (["--n-pro", "5,1"], "argument --n-pro: in '5,1': 1 is not a whole number >= 2"),
    (["--sizes", "56,0"], "argument --sizes: in '56,0': 0 is not a whole number >= 1"),
    (["--stages", "1"], "argument --stages: in '1': 1 is not a whole number >= 2"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_bench_refuses_bad_numbers_before_measuring(tmp_path, capsys, flags, expected):
    out = tmp_path / "b"
    line = _usage_error(capsys, ["bench", "--out", str(out), "--quick", "--no-loader", "--no-memory", *TINY_ARGS,
                                 *flags])
    assert line.startswith(f"ivpt bench: error: {expected}"), line
    assert not out.exists()


def test_bench_on_cuda_without_a_gpu_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "b"
    err = _one_line_error(capsys, main(["bench", "--out", str(out), "--quick", "--device", "cuda", *TINY_ARGS]))
    assert err.startswith("error: --device='cuda'") and "no CUDA device is visible" in err, err
    assert not out.exists()
