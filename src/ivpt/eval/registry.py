"""The one table of evaluation metrics: ``--metrics`` name → what it scores, on which pass, for which models.

Everything that shows a metric reads this table: :func:`ivpt.eval.evaluate` (which consumers to build, which
metrics a model kind or dataset format cannot give, the "skipped" reasons), the ``ivpt eval`` table
(:func:`ivpt.eval.format_table`), ``ivpt compare`` (``compare.TABLE_COLUMNS``: :func:`compare_columns`) and the
report's metrics table (:mod:`ivpt.explain.report`: :func:`scores`).

Adding a metric is one file (its meter under :mod:`ivpt.metrics`, or the whole metric in one module) plus one
registration, e.g. a whole-model score on the evaluated split::

    from ivpt.eval.registry import Score, register_metric

    @register_metric("mean_logit", scores=[Score("mean_logit", "mean top logit", "", "↑",
                                                  "mean over images of the highest class score")])
    class MeanLogit:                 # the consumer, built once per evaluation from the EvalContext
        def __init__(self, ctx):
            self.meter = MeanMeter()     # an ivpt.metrics.SumState subclass: summed over torchrun processes
        def update(self, batch, forward):               # every readable batch of the pass
            self.meter.update(forward(batch["image"]).logits.float().max(dim=1).values.cpu())
        def meters(self):                               # what the pass sums over the processes
            return [self.meter]
        def scores(self, stage):                        # eval.json keys; stage is None for whole-model metrics
            return self.meter.compute()

(tests/test_registry.py registers exactly this one.) The built-in metrics are registered in
:mod:`ivpt.eval.builtin` (imported with :mod:`ivpt.eval`).

A consumer (see :class:`MetricConsumer`) receives each batch of its pass with a shared
:class:`~ivpt.eval.runner.Forward`; metrics whose ``consumer`` is the same factory share one instance (NMI/ARI,
KPR and foreground IoU are one :class:`~ivpt.eval.protocols.Discovery`). Passes: ``full`` — the evaluated split
with the deterministic eval transform (accuracy runs on it in every evaluation, it counts the scored images);
``crop`` — bounding-box crops of the split, resized whole to the model input.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from ..config import Config
    from ..metrics import SumState

__all__ = ["PASSES", "BETTER", "Score", "Metric", "EvalContext", "MetricConsumer", "LiveView", "METRICS",
           "ALL_METRICS", "DEFAULT_METRICS", "register_metric", "unregister_metric", "get_metric", "metric_names",
           "default_metrics", "scores", "score_of", "metric_of", "no_data_reasons", "unsupported",
           "compare_columns"]

PASSES = ("full", "crop")
BETTER = ("↑", "↓")

T = TypeVar("T")


@dataclass(frozen=True)
class Score:
    """One ``eval.json`` key a metric produces.

    Args:
        key: the eval.json key (and the per-stage row key for a per-stage metric).
        label: short human name (the ``ivpt eval`` table and the report; e.g. "top-1", "keypoint error").
        unit: "%" (percent), "×100" (a fraction times 100), "fraction" (in [0, 1]), "% of box", ...
        better: "↑" (higher is better) or "↓" (lower is better; the table, compare.md and the report say so).
        description: one line: what it measures.
        column: the compare.md column title when not ``label`` (e.g. "KPR").
        compare: the column's place in compare.md (columns sorted by it, then by registration); None: no column.
        digits: decimals in compare.md and the report (the ``ivpt eval`` table always prints two).
        source: the key its meter reports when it differs from ``key`` (KPR's meter says "kp_error"), for the
            "skipped" reasons of scores without data.
    """

    key: str
    label: str
    unit: str
    better: str
    description: str
    column: str | None = None
    compare: float | None = math.inf
    digits: int = 1
    source: str | None = None

    def __post_init__(self) -> None:
        if self.better not in BETTER:
            raise ValueError(f"Score {self.key!r}: better={self.better!r} must be one of {' '.join(BETTER)}")

    @property
    def lower_is_better(self) -> bool:
        return self.better == "↓"

    @property
    def table_label(self) -> str:
        """The ``ivpt eval`` table's row label."""
        return self.label + (" (lower better)" if self.lower_is_better else "")

    @property
    def report_label(self) -> str:
        return self.label + (" ↓" if self.lower_is_better else "")

    @property
    def title(self) -> str:
        """The compare.md column title."""
        return (self.column or self.label) + (" ↓" if self.lower_is_better else "")


def _always(model_class: type, dataset_class: type) -> str | None:
    return None


@dataclass(frozen=True)
class Metric:
    """One ``--metrics`` name.

    Args:
        name: the ``--metrics`` name (also the key of ``eval.json``'s "skipped").
        scores: the eval.json keys it produces, in table order.
        consumer: ``consumer(ctx: EvalContext) -> MetricConsumer``, called once per evaluation (after its pass's
            dataset is open); metrics naming the same callable share the instance it returns.
        per_stage: an interpretability score of each part-map stage (rows of ``per_stage``, the chosen stage's
            value at the top level, measured per ``eval.protocol``); needs a model with part maps. False: one
            whole-model value.
        on: the pass it consumes, "full" or "crop" (see the module docstring).
        supports: ``supports(model_class, dataset_class) -> reason | None``: why this model kind or dataset format
            cannot give the metric (None: it can). Per-stage metrics are also refused for models without part maps.
        available: ``available(ctx) -> reason | None``, after the pass's dataset is open: why the files on disk
            cannot give it (e.g. foreground IoU without a mask for every image).
        needs_parts: the pass's items must carry the dataset's annotations (keypoints, boxes, masks); default:
            ``per_stage``.
        default: computed when ``--metrics`` is not given (and by ``ivpt compare``).
        description: one line about the metric as a whole.
    """

    name: str
    scores: tuple[Score, ...]
    consumer: Callable[[EvalContext], Any]
    per_stage: bool = False
    on: str = "full"
    supports: Callable[[type, type], str | None] = _always
    available: Callable[[EvalContext], str | None] | None = None
    needs_parts: bool | None = None
    default: bool = True
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "scores", tuple(self.scores))
        if not self.scores:
            raise ValueError(f"metric {self.name!r} produces no score")
        if self.on not in PASSES:
            raise ValueError(f"metric {self.name!r}: on={self.on!r} must be one of {', '.join(PASSES)}")
        if self.needs_parts is None:
            object.__setattr__(self, "needs_parts", self.per_stage)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(s.key for s in self.scores)


@dataclass
class EvalContext:
    """What a consumer factory may read: the evaluation's model, config and process; the part-map stages
    (:class:`~ivpt.eval.protocols.StageMaps`); the dataset of its pass; the metrics being computed (``active``);
    ``open(split, transform, **kwargs)`` to open another split (checked like the evaluated one) and
    ``run(dataset, consumers, desc)`` to run an extra pass of its own (e.g. KPR's fit on the training split)."""

    model: Any
    cfg: Config
    info: Any
    stages: Any
    dataset: Any
    active: frozenset[str]
    split: str
    transform: Any
    open: Callable[..., Any]
    run: Callable[..., None]


class MetricConsumer(Protocol):
    """What a metric's consumer does (``scored_meters`` is optional)."""

    def update(self, batch: dict, forward: Any) -> None:
        """Take one readable batch of the pass (``forward(images)`` is the model's output, shared)."""

    def meters(self) -> list[SumState]:
        """Every meter, summed over the processes at the end of the pass."""

    def scores(self, stage: int | None) -> dict[str, float]:
        """eval.json keys → values; ``stage`` is a stage index for per-stage metrics, None for whole-model ones.
        A score without data is left out (``scored_meters``' ``no_data`` says why)."""

    def scored_meters(self, stage: int | None) -> list[SumState]:
        """The meters behind ``scores(stage)``, whose ``no_data()`` names the scores they could not give."""


# name -> Metric, in registration order (the order of every table).
METRICS: dict[str, Metric] = {}


def register_metric(metric_or_name: Metric | str, /, **fields: Any) -> Any:
    """Add a metric to the table. ``register_metric(Metric(...))`` returns it; ``@register_metric(name, scores=...,
    per_stage=..., ...)`` on a consumer class (or factory function) registers ``Metric(name, consumer=it, ...)``.

    A name already registered, or a score key another metric already produces, is a ValueError."""
    if isinstance(metric_or_name, Metric):
        if fields:
            raise TypeError("register_metric(Metric(...)) takes no other arguments")
        return _add(metric_or_name)

    def decorate(consumer: T) -> T:
        _add(Metric(metric_or_name, consumer=consumer, **fields))  # type: ignore[arg-type]
        return consumer

    return decorate


def _add(metric: Metric) -> Metric:
    if metric.name in METRICS:
        raise ValueError(f"a metric named {metric.name!r} is already registered")
    taken = {s.key: m.name for m in METRICS.values() for s in m.scores}
    clash = [f"{k} ({taken[k]})" for k in metric.keys if k in taken]
    if clash or len(set(metric.keys)) != len(metric.keys):
        raise ValueError(f"metric {metric.name!r}: score keys already produced: {', '.join(clash) or 'twice'}")
    METRICS[metric.name] = metric
    return metric


def unregister_metric(name: str) -> Metric:
    """Remove a registered metric (e.g. one a test added); returns it."""
    return METRICS.pop(name)


def get_metric(name: str) -> Metric:
    return METRICS[name]


def metric_names() -> tuple[str, ...]:
    """Every registered ``--metrics`` name, in registration order."""
    return tuple(METRICS)


def default_metrics() -> tuple[str, ...]:
    """The names computed when ``--metrics`` is not given."""
    return tuple(n for n, m in METRICS.items() if m.default)


def scores() -> list[tuple[Metric, Score]]:
    """Every (metric, score) pair, in table order."""
    return [(m, s) for m in METRICS.values() for s in m.scores]


def score_of(key: str) -> Score | None:
    """The :class:`Score` of eval.json key ``key``, or None for a key no metric produces."""
    return next((s for _, s in scores() if s.key == key), None)


def metric_of(key: str) -> str | None:
    """The ``--metrics`` name whose score is eval.json key — or meter key (:attr:`Score.source`) — ``key``."""
    return next((m.name for m, s in scores() if key in (s.key, s.source)), None)


def no_data_reasons(meters: Iterable[SumState]) -> dict[str, str]:
    """{metric name: reason} for every metric one of ``meters`` could not score (the meters' ``no_data``)."""
    reasons: dict[str, str] = {}
    for meter in meters:
        for key, reason in meter.no_data().items():
            name = metric_of(key)
            if name is not None:
                reasons.setdefault(name, reason)
    return reasons


def unsupported(model_class: type, dataset_class: type, names: Iterable[str]) -> dict[str, str]:
    """{name: reason} for the metrics of ``names`` that this model kind or dataset format cannot give."""
    reasons = {}
    for name in names:
        metric = METRICS[name]
        if metric.per_stage and not getattr(model_class, "has_part_maps", False):
            reason = f"model.kind={getattr(model_class, 'kind', model_class.__name__)} has no part maps"
        else:
            reason = metric.supports(model_class, dataset_class)
        if reason:
            reasons[name] = reason
    return reasons


def compare_columns() -> tuple[tuple[str, str], ...]:
    """(eval.json key, column title) of compare.md, in column order."""
    placed = [s for _, s in scores() if s.compare is not None]
    return tuple((s.key, s.title) for s in sorted(placed, key=lambda s: s.compare))  # stable: registration order


class LiveView(Sequence[T]):
    """A read-only sequence computed from the registry whenever it is read, so a constant such as
    ``compare.TABLE_COLUMNS`` follows metrics registered after import."""

    def __init__(self, build: Callable[[], tuple[T, ...]]) -> None:
        self._build = build

    def __getitem__(self, index):  # type: ignore[override]
        return self._build()[index]

    def __len__(self) -> int:
        return len(self._build())

    def __iter__(self) -> Iterator[T]:
        return iter(self._build())

    def __contains__(self, item: object) -> bool:
        return item in self._build()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (tuple, list, LiveView)):
            return tuple(self) == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return repr(self._build())


ALL_METRICS: LiveView[str] = LiveView(metric_names)
DEFAULT_METRICS: LiveView[str] = LiveView(default_metrics)
