"""``ivpt compare``: several model kinds x seeds trained under ONE config (one recipe, one step budget, one
dataset), every run evaluated with ONE protocol, and the paper's Table 1 written from the results.

Layout of the output folder ``OUT``::

    runs/<kind>-seed<k>/   an ``ivpt train`` run folder per kind and seed, with its eval.json (test split)
    compare.json           every run's training metrics, evaluation and config, and the per-kind summary
    compare.md             method | runs | stage | consistency | stability | top-1 | NMI | ARI | KPR | the decision
                           scores | any registered metric's scores (TABLE_COLUMNS): mean ± std over seeds; stage:
                           where each run's interpretability was scored
    compare.png / .svg     top-1 against consistency, one marker per run, one colour per kind

Running again into the same ``OUT`` skips finished runs (``metrics.json``, and an ``eval.json`` made with the
comparison's settings, :func:`eval_settings`; one made otherwise, e.g. by ``ivpt eval --protocol``, is made again),
resumes interrupted ones from their ``last.pt`` and refuses a run folder whose config differs in a way that matters
to its kind (:func:`ivpt.runs.reuse_state`, by :func:`ivpt.config.config_changes`, the rule ``ivpt train --resume``
follows too: a finished vpt_deep run still counts after an IVPT-only switch or a map loss weight changes).
:func:`tabulate` builds the same outputs from existing run folders without training. The device
is ``train.device``; ``jobs`` > 1 trains that many runs at once, each in its own process (small runs leave most of
a GPU idle: benchmarks/recipe.md reports 12-14 runs at once on one H200, each as a separate ``ivpt
compare`` process).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import time
from dataclasses import asdict
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .checkpoint import atomic_write, atomic_write_text
from .config import MODEL_KINDS, Config, ConfigError
from .engine import STARTS_FILE, train
from .eval import DEFAULT_METRICS, evaluate_checkpoint
from .eval.registry import LiveView, compare_columns, score_of
from .runs import RunConflict, reuse_state, run_config
from .runtime import launched_by_torchrun

__all__ = ["CompareError", "TABLE_COLUMNS", "compare", "tabulate", "summarise", "format_markdown", "run_name",
           "eval_settings"]

# (eval.json key, column title) of the table, from the metric registry (ivpt.eval.registry: Score.compare orders
# them, the paper's Table 1 first); read whenever used, so a metric registered later has its column.
TABLE_COLUMNS: LiveView[tuple[str, str]] = LiveView(compare_columns)
# Config keys a finished run may differ in and still belong to the comparison: where it ran, not what it computed.
IGNORED_CHANGES = frozenset({"train.device", "data.num_workers"})
DASH = "–"


class CompareError(ConfigError):
    """The runs to compare do not form one comparison (other config, protocol or dataset); the message says why."""


def run_name(kind: str, seed: int) -> str:
    return f"{kind}-seed{seed}"


def compare(cfg: Config, out: str | Path, *, kinds: Sequence[str], seeds: Sequence[int], progress: bool = True,
            say: Callable[[str], None] = print, jobs: int = 1) -> dict:
    """Train and evaluate every kind x seed of ``cfg`` under ``out/runs/`` (reusing what is done), then write the
    comparison files; returns the content of ``compare.json``. ``say`` gets one line per run start and end.

    ``jobs`` > 1 (not under torchrun): that many runs at once, each in a process of its own with
    ``cpu_count // jobs`` torch threads and no progress bars; the runs' own lines go to standard output. A failed
    run lets the runs already started finish (they are kept), starts no others, and its error is raised."""
    unknown = [k for k in kinds if k not in MODEL_KINDS]
    if unknown or not kinds:
        raise CompareError(f"kinds {unknown or '(none)'}: choose from {', '.join(MODEL_KINDS)}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise CompareError(f"seeds {list(seeds)} must be distinct and at least one, e.g. 0,1,2")
    if jobs < 1:
        raise CompareError(f"--jobs {jobs} must be at least 1")
    if jobs > 1 and launched_by_torchrun():
        raise CompareError("--jobs > 1 starts processes of its own; run ivpt compare without torchrun (or with "
                           "--jobs 1, one run at a time over all of torchrun's processes)")
    out = Path(out)
    plan = [(cfg.with_overrides([f"model.kind={k}", f"train.seed={s}"]), out / "runs" / run_name(k, s))
            for k in kinds for s in seeds]
    for run_cfg, run_dir in plan:  # every folder checked before any training starts
        _check_same_config(run_cfg, run_dir)
    t0 = time.perf_counter()
    tags = [f"[{i}/{len(plan)}]" for i in range(1, len(plan) + 1)]
    if jobs == 1 or len(plan) == 1:
        records = [_run_one(c, d, tag, progress, say) for (c, d), tag in zip(plan, tags)]
    else:
        records = _run_parallel(plan, tags, jobs, say)
    say(f"all {len(plan)} runs ready in {time.perf_counter() - t0:.1f}s")
    return _write(records, out, config=cfg.to_dict())


def _run_parallel(plan: list[tuple[Config, Path]], tags: list[str], jobs: int, say: Callable[[str], None]) -> list:
    """The runs of ``plan`` in ``jobs`` spawned processes, never more submitted than running (so that after a
    failure nothing new starts); their records in plan order."""
    records: list[dict | None] = [None] * len(plan)
    failure: BaseException | None = None
    threads = max(1, (os.cpu_count() or 1) // min(jobs, len(plan)))
    context = multiprocessing.get_context("spawn")  # no forked CUDA or thread-pool state
    pending = list(range(len(plan)))[::-1]  # a stack: plan order
    running: dict = {}
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_worker_init,
                             initargs=(threads,)) as pool:
        while running or (pending and failure is None):
            while pending and failure is None and len(running) < jobs:
                i = pending.pop()
                running[pool.submit(_run_one, *plan[i], tags[i], False, _print_now)] = i
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                i = running.pop(future)
                try:
                    records[i] = future.result()
                except BaseException as exc:  # noqa: BLE001 - re-raised below, once the started runs end
                    if failure is None:
                        failure = exc
                        say(f"{tags[i]} {plan[i][1].name} failed ({exc}); starting no other run, waiting for "
                            f"the {len(running)} already started")
    if failure is not None:
        raise failure
    return records


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _print_now(line: str) -> None:
    print(line, flush=True)


def tabulate(run_dirs: Sequence[str | Path], out: str | Path) -> dict:
    """The comparison files of existing run folders (each with config.yaml and eval.json) in ``out``, without
    training; returns the content of ``compare.json``."""
    if not run_dirs:
        raise CompareError("no run folders to tabulate")
    return _write([_read_run(Path(d)) for d in run_dirs], Path(out), config=None)


def _check_same_config(cfg: Config, run_dir: Path) -> str:
    """:func:`ivpt.runs.reuse_state` of ``run_dir`` for ``cfg`` ("new", "started" or "finished"), where a run may
    differ in :data:`IGNORED_CHANGES` and in whatever its kind does not read."""
    try:
        return reuse_state(run_dir, cfg, may_differ=IGNORED_CHANGES)
    except RunConflict as exc:
        raise CompareError(str(exc)) from None


def eval_settings(cfg: Config, run_dir: Path) -> dict:
    """What the eval.json of ``run_dir`` must have been made with to belong to a comparison under ``cfg``: the
    eval section (but its batch size), the test split of ``cfg``'s dataset, every metric, the run's ``best/``."""
    return {"protocol": {k: v for k, v in asdict(cfg.eval).items() if k != "batch_size"}, "split": "test",
            "root": str(Path(cfg.data.root).resolve()), "format": cfg.data.format,
            "metrics": sorted(DEFAULT_METRICS), "checkpoint": str((run_dir / "best").resolve())}


def _settings_of(evaluation: dict) -> dict:
    """:func:`eval_settings` as recorded in an eval.json (``ivpt eval`` writes all of them)."""
    data = evaluation.get("data") if isinstance(evaluation.get("data"), dict) else {}
    protocol = evaluation.get("protocol") if isinstance(evaluation.get("protocol"), dict) else {}
    checkpoint = evaluation.get("checkpoint") if isinstance(evaluation.get("checkpoint"), dict) else {}
    return {"protocol": {k: v for k, v in protocol.items() if k != "batch_size"}, "split": data.get("split"),
            "root": data.get("root"), "format": data.get("format"), "metrics": evaluation.get("metrics_requested"),
            "checkpoint": checkpoint.get("path")}


def _eval_differences(evaluation: dict, expected: dict) -> list[str]:
    """The settings in which an eval.json differs from ``expected`` (eval.* keys named one by one)."""
    found = _settings_of(evaluation)
    differ = [f"eval.{k}" for k in sorted(set(expected["protocol"]) | set(found["protocol"]))
              if expected["protocol"].get(k) != found["protocol"].get(k)]
    names = {"split": "split", "root": "data.root", "format": "data.format", "metrics": "metrics",
             "checkpoint": "checkpoint"}
    return differ + [label for key, label in names.items() if found[key] != expected[key]]


def _run_one(cfg: Config, run_dir: Path, tag: str, progress: bool, say: Callable[[str], None]) -> dict:
    name, t0 = run_dir.name, time.perf_counter()
    state = _check_same_config(cfg, run_dir)
    if state == "finished" and (run_dir / "eval.json").is_file():
        try:
            differ = _eval_differences(_read_json(run_dir / "eval.json", run_dir), eval_settings(cfg, run_dir))
        except CompareError:
            differ = ["unreadable"]
        if not differ:
            say(f"{tag} {name}: finished earlier, reusing {run_dir}")
            return _read_run(run_dir)
        say(f"{tag} {name}: trained earlier, but its eval.json was made with other settings "
            f"({', '.join(differ)}); evaluating {run_dir / 'best'} again")
    elif state != "finished":
        resume = state == "started"
        say(f"{tag} {name}: {'resuming' if resume else 'training'} {cfg.model.kind}, seed {cfg.train.seed} "
            f"-> {run_dir}")
        train(cfg, run_dir, resume=resume, progress=progress)
    else:
        say(f"{tag} {name}: trained earlier, evaluating {run_dir / 'best'}")
    ckpt_cfg, meta = run_config(run_dir / "best")
    result = evaluate_checkpoint(run_dir / "best", ckpt_cfg, meta, split="test", progress=progress)
    atomic_write_text(run_dir / "eval.json", json.dumps(result, indent=2))
    record = _read_run(run_dir)
    scores = ", ".join(f"{title} {_fmt(record['eval'].get(key), _digits(key))}" for key, title in TABLE_COLUMNS[:3])
    say(f"{tag} {name}: done in {time.perf_counter() - t0:.1f}s: {scores}")
    return record


def _read_run(run_dir: Path) -> dict:
    """One run folder as a compare.json entry: kind, seed, folder, config, metrics.json, eval.json and, for a run
    with ``train.starts``, its ``starts.json`` (each start's seed and validation scores, which was kept)."""
    missing = [n for n in ("config.yaml", "eval.json") if not (run_dir / n).is_file()]
    if missing:
        raise CompareError(f"{run_dir} has no {' or '.join(missing)}; train it (`ivpt train`) and evaluate it "
                           f"(`ivpt eval {run_dir / 'best'}`) first")
    cfg, _ = run_config(run_dir)
    metrics = run_dir / "metrics.json"
    return {"kind": cfg.model.kind, "seed": cfg.train.seed, "run": str(run_dir.resolve()),
            "metrics": _read_json(metrics, run_dir) if metrics.is_file() else None,
            "eval": _read_json(run_dir / "eval.json", run_dir), "config": cfg.to_dict(),
            "starts": _read_json(run_dir / STARTS_FILE, run_dir) if (run_dir / STARTS_FILE).is_file() else None}


def _read_json(path: Path, run_dir: Path) -> dict:
    """A run's eval.json, metrics.json or starts.json as a dict; a file that is not one (truncated, damaged, an
    eval.json without the dataset it measured) is a :class:`CompareError` naming it and how to write it again."""
    fix = (f"evaluate the run again (`ivpt eval {run_dir / 'best'}`)" if path.name == "eval.json"
           else f"train the run again (`ivpt train --resume {run_dir}`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CompareError(f"{path} is unreadable ({type(exc).__name__}: {exc}); {fix}") from None
    if not isinstance(data, dict):
        raise CompareError(f"{path} holds a {type(data).__name__}, not the JSON object ivpt writes; {fix}")
    if path.name == "eval.json":
        measured = data.get("data")
        missing = [k for k in ("root", "split", "format", "images")
                   if not isinstance(measured, dict) or k not in measured]
        if missing:
            raise CompareError(f"{path} does not say what it measured (no data.{', data.'.join(missing)}); {fix}")
    return data


def summarise(records: list[dict]) -> dict[str, dict[str, dict]]:
    """Per kind (in order of appearance) and table column: mean, sample std (ddof=1; None for one run), n and
    the values over the runs that have the score. A kind without the score has no entry for it."""
    summary: dict[str, dict[str, dict]] = {}
    for kind in dict.fromkeys(r["kind"] for r in records):
        summary[kind] = {}
        for key, _ in TABLE_COLUMNS:
            values = [float(r["eval"][key]) for r in records if r["kind"] == kind and r["eval"].get(key) is not None]
            if values:
                summary[kind][key] = {"mean": float(np.mean(values)),
                                      "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
                                      "n": len(values), "values": values}
    return summary


def _digits(key: str) -> int:
    score = score_of(key)
    return 1 if score is None else score.digits


def _fmt(value: float | None, digits: int = 1) -> str:
    return DASH if value is None else f"{value:.{digits}f}"


def _cell(stat: dict | None, digits: int = 1) -> str:
    if stat is None:
        return DASH
    return _fmt(stat["mean"], digits) + (f" ± {stat['std']:.{digits}f}" if stat["std"] is not None else "")


def _stage(evaluation: dict) -> str:
    """The stage a run's interpretability scores come from, e.g. '2 (11 prototypes)'; DASH without part maps.

    Each run has its own: eval.stage picks IVPT's (auto: n_pro[-3]), and a kind with fewer map stages (a VPT's one
    attention map, last_layer_parts' one stage) falls back to its last (:func:`ivpt.eval.evaluate`)."""
    stage = evaluation.get("stage")
    if not isinstance(stage, dict):
        return DASH
    return f"{stage.get('index')} ({stage.get('n_pro')} prototypes)"


def format_markdown(result: dict) -> str:
    """compare.md: the per-kind table (mean ± std over seeds), how it was measured, then every run; each row names
    the stage its interpretability scores come from."""
    runs, summary = result["runs"], result["summary"]
    columns = tuple(TABLE_COLUMNS)
    first = runs[0]["eval"]
    lines = ["# Comparison", "",
             f"Test split of {first['data']['format']} at {first['data']['root']} ({first['data']['images']} images); "
             f"eval.protocol={first.get('eval_protocol')}; interpretability at each run's own stage (column stage: "
             f"its index in model.n_pro and its part maps' channels). Mean ± sample std over seeds, in percent; "
             f"{DASH}: the method has no such score.", "",
             "| method | runs | stage | " + " | ".join(t for _, t in columns) + " |",
             "|---|---:|---|" + "---:|" * len(columns)]
    for kind, stats in summary.items():
        mine = [r for r in runs if r["kind"] == kind]
        stages = ", ".join(dict.fromkeys(_stage(r["eval"]) for r in mine))
        lines.append(f"| {kind} | {len(mine)} | {stages} | "
                     + " | ".join(_cell(stats.get(k), _digits(k)) for k, _ in columns) + " |")
    lines += ["", "| run | steps | stage | " + " | ".join(t for _, t in columns) + " |",
              "|---|---:|---|" + "---:|" * len(columns)]
    for r in runs:
        steps = (r["metrics"] or {}).get("steps", DASH)
        lines.append(f"| {run_name(r['kind'], r['seed'])} | {steps} | {_stage(r['eval'])} | "
                     + " | ".join(_fmt(r["eval"].get(k), _digits(k)) for k, _ in columns) + " |")
    return "\n".join(lines) + "\n"


def _check_one_protocol(records: list[dict]) -> None:
    def distinct(what: Callable[[dict], object]) -> list:
        return list(dict.fromkeys(json.dumps(what(r["eval"]), sort_keys=True) for r in records))

    for label, what in (("evaluation protocols", lambda e: {k: v for k, v in (e.get("protocol") or {}).items()
                                                          if k != "batch_size"}),
                        ("test sets", lambda e: {k: e["data"][k] for k in ("root", "split", "format")})):
        found = distinct(what)
        if len(found) > 1:
            raise CompareError(f"the runs were evaluated with {len(found)} different {label} ({'; '.join(found)}); "
                               "re-evaluate them alike with `ivpt eval` before tabulating")
    names = [run_name(r["kind"], r["seed"]) for r in records]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise CompareError(f"more than one run of {', '.join(twice)}; a comparison holds one run per kind and seed")


def _write(records: list[dict], out: Path, *, config: dict | None) -> dict:
    _check_one_protocol(records)
    result = {"config": config, "kinds": list(dict.fromkeys(r["kind"] for r in records)),
              "seeds": sorted({r["seed"] for r in records}), "summary": summarise(records), "runs": records}
    atomic_write_text(out / "compare.json", json.dumps(result, indent=2))
    atomic_write_text(out / "compare.md", format_markdown(result))
    _plot(result, out)
    return result


def _plot(result: dict, out: Path) -> None:
    """compare.png and compare.svg: top-1 against consistency, one marker per run, one colour per kind (saved as
    the explanation figures are: editable text, no dates, :func:`ivpt.explain.draw.save_figure`)."""
    import matplotlib
    from matplotlib.figure import Figure

    from .explain.draw import save_figure

    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    fig = Figure(figsize=(5.5, 4.0))
    ax = fig.add_subplot()
    for i, kind in enumerate(result["kinds"]):
        points = [(r["eval"]["consistency"], r["eval"]["top1"]) for r in result["runs"]
                  if r["kind"] == kind and r["eval"].get("consistency") is not None and "top1" in r["eval"]]
        ax.scatter([p[0] for p in points], [p[1] for p in points], color=colours[i % len(colours)], s=36,
                   label=kind if points else f"{kind} (no consistency)")
    ax.set_xlabel("consistency (%)")
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    for fmt in ("png", "svg"):
        atomic_write(out / f"compare.{fmt}", lambda p, fmt=fmt: save_figure(fig, p, fmt))
