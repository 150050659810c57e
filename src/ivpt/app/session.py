"""The app's state without any web framework (the page is :mod:`.ui`): one loaded checkpoint of any model kind,
what it says about an image (computed once per image, cached by the image's hash) and about its dataset (one pass,
on first use, cached).

What each kind shows follows from the model's class flags: part maps per stage (``has_part_maps``:
:meth:`~ivpt.models.FrozenViT.map_stages` names them), evidence per concept (``has_part_head``: the logits split
over the coarse concepts by :func:`ivpt.explain.explain`) and the fine→coarse hierarchy (outputs with
assignments: IVPT). A linear probe has only its prediction.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor, nn

from ..checkpoint import CONFIG_NAME, CheckpointError
from ..config import Config
from ..data import DatasetError, Sample, build_eval_transform, check_num_classes
from ..data.transforms import apply_transform
from ..eval.classes import align_classes
from ..explain.charts import read_log
from ..explain.core import Hierarchy, denormalise, explain, prototype_count, run_batches, stage_title
from ..explain.report import read_metrics
from ..models.prototypes import present_concepts
from ..runs import class_names_of, load_run, open_split
from .index import DatasetIndex, Progress, build_index
from .inputs import read_image
from .results import ConceptInfo, ImageResult, StageMaps

__all__ = ["AppSession", "find_checkpoint", "image_key"]


def find_checkpoint(path: str | Path) -> Path:
    """The pretrained folder ``path`` names: itself when it holds ``config.json`` (``RUN/best``), else ``best/`` of
    the run folder ``path``. Anything else is a :class:`~ivpt.checkpoint.CheckpointError` saying what was found."""
    path = Path(path)
    if (path / CONFIG_NAME).is_file():
        return path
    if (path / "best" / CONFIG_NAME).is_file():
        return path / "best"
    if (path / "config.yaml").is_file():
        raise CheckpointError(f"{path} is a run folder without a checkpoint yet (no best/{CONFIG_NAME}); wait for "
                              "its first epoch to finish, or pass another run")
    what = "does not exist" if not path.exists() else f"holds no {CONFIG_NAME} and no best/{CONFIG_NAME}"
    raise CheckpointError(f"{path} is not a run: it {what}; pass a run folder written by `ivpt train` (or its "
                          "best/ checkpoint)")


def image_key(x: Tensor) -> str:
    """Hash of a normalised image tensor: equal pixels, equal key."""
    data = x.detach().float().cpu().contiguous().numpy()
    return hashlib.sha1(data.tobytes() + str(data.shape).encode()).hexdigest()


def _open_dataset(cfg: Config, names: list[str] | None, root: str | None, split: str) -> Any:
    """The ``split`` of the run's dataset at ``root`` (default ``data.root``), labelled as the checkpoint."""
    dataset = open_split(cfg, split, root=root)
    check_num_classes(dataset, cfg.model.num_classes, "the model")
    return align_classes(dataset, names)


class AppSession:
    """One checkpoint and its caches; thread-safe (the web server calls it from several threads).

    Args:
        model: any model kind, on its device.
        cfg, meta: the run config and the checkpoint's config.json content (:func:`ivpt.runs.load_run`).
        checkpoint: where the model came from (shown on the model page).
        dataset: the split the app picks images from and indexes (eval transform), or None.
        dataset_note: why there is no dataset, when there is none.
        metrics: ``eval.json`` content (or ``metrics.json`` converted, :func:`ivpt.explain.report.read_metrics`).
        metrics_file: the file they came from. log: ``log.csv`` columns (:func:`ivpt.explain.read_log`).
        topk: classes in the prediction. cache_size: images kept. gallery_topk: patches per concept.
        limit: index only the first ``limit`` dataset images. batch_size: images per pass when indexing.
    """

    def __init__(self, model: nn.Module, cfg: Config, meta: dict, *, checkpoint: str | Path, dataset: Any = None,
                 dataset_note: str = "", metrics: dict | None = None, metrics_file: str | Path | None = None,
                 log: dict[str, np.ndarray] | None = None, topk: int = 5, cache_size: int = 64,
                 gallery_topk: int = 8, limit: int | None = None, batch_size: int = 16) -> None:
        self.model, self.cfg, self.checkpoint = model, cfg, Path(checkpoint)
        self.dataset, self.dataset_note = dataset, dataset_note
        self.metrics, self.metrics_file, self.log = metrics or {}, metrics_file, log or {}
        self.topk, self.cache_size, self.gallery_topk = topk, cache_size, gallery_topk
        self.limit, self.batch_size = limit, batch_size
        num_classes = cfg.model.num_classes
        self.class_names = (class_names_of(meta, num_classes) or
                            [str(n) for n in (getattr(dataset, "class_names", None) or [])] or
                            [f"class {c}" for c in range(num_classes)])
        self.transform = build_eval_transform(cfg.data, cfg.model.img_size)
        self.stages: list[tuple[int, int]] = model.map_stages() if model.has_part_maps else []
        self.depth = len(model.backbone.blocks)
        self._cache: OrderedDict[str, ImageResult] = OrderedDict()
        self._lock = threading.RLock()
        self._index: DatasetIndex | None = None
        self.renders: dict[str, Any] = {}  # drawings of the dataset index, kept for the next request

    @classmethod
    def open(cls, path: str | Path, *, data: str | None = None, split: str = "test", weights: str | None = None,
             device: str = "auto", **options: Any) -> "AppSession":
        """The session of the run folder or checkpoint ``path`` (:func:`find_checkpoint`): its model, the
        ``split`` of its dataset (``data`` or the run's ``data.root``), its eval.json (else metrics.json) and
        log.csv. A dataset given as ``data`` that cannot be read is a :class:`~ivpt.data.DatasetError`; the run's
        own, when missing, only leaves the app without dataset images (``dataset_note`` says why)."""
        checkpoint = find_checkpoint(path)
        model, cfg, meta = load_run(checkpoint, weights=weights, device=device)
        names = class_names_of(meta, cfg.model.num_classes)
        dataset, note = None, ""
        try:
            dataset = _open_dataset(cfg, names, data, split)
        except DatasetError as exc:
            if data is not None:
                raise
            reason = str(exc).splitlines()[0]  # the layout tree that follows is for `ivpt train`/`eval` users
            note = f"the run's dataset cannot be read ({reason}); start the app with --data ROOT to pick its images"
        run_dir = checkpoint.resolve().parent
        metrics_file = next((f for f in (run_dir / "eval.json", run_dir / "metrics.json") if f.is_file()), None)
        log_file = run_dir / "log.csv"
        return cls(model, cfg, meta, checkpoint=checkpoint, dataset=dataset, dataset_note=note,
                   metrics=read_metrics(metrics_file), metrics_file=metrics_file,
                   log=read_log(log_file) if log_file.is_file() else None, **options)

    # ---------------------------------------------------------------------------------------------- what it has
    @property
    def kind(self) -> str:
        return self.cfg.model.kind

    @property
    def has_evidence(self) -> bool:
        """A part-pooled head whose logits split over concepts (``has_part_head``)."""
        return bool(getattr(self.model, "has_part_head", False))

    def class_name(self, c: int) -> str:
        return self.class_names[c] if 0 <= c < len(self.class_names) else f"class {c}"

    def stage_caption(self, stage: int, n: int) -> str:
        """e.g. 'stage 1 · input of block 10 · 6 foreground + background'."""
        n_pro = getattr(self.cfg.model, "n_pro", None)
        where = (stage_title(stage, n_pro, self.depth) if self.model.has_concept_maps and n_pro
                 else f"{self.kind} part map")
        return f"stage {stage} · {where} · {prototype_count(n)}"

    # ------------------------------------------------------------------------------------------------- images
    def upload(self, path: str | Path) -> ImageResult:
        """The result for the image file at ``path``; :class:`~.inputs.AppInputError` when it cannot be used."""
        return self.explain_tensor(self.prepare(read_image(path)))

    def prepare(self, image: Any) -> Tensor:
        """An RGB PIL image → the normalised (3, S, S) input, exactly as evaluation transforms it."""
        return apply_transform(Sample(image=image), self.transform).image

    def dataset_choices(self) -> list[tuple[str, int]]:
        """(label, index) of every dataset image for a picker: '#12 · class name'."""
        labels = list(getattr(self.dataset, "labels", []) or [])
        count = len(self.dataset) if self.dataset is not None else 0
        return [(f"#{i} · {self.class_name(int(labels[i]))}" if i < len(labels) else f"#{i}", i)
                for i in range(count)]

    def dataset_image(self, index: int) -> ImageResult:
        """The result for dataset image ``index`` (with its true class)."""
        if self.dataset is None:
            raise DatasetError(self.dataset_note or "no dataset was opened")
        if not 0 <= index < len(self.dataset):
            raise DatasetError(f"image #{index} is not in the dataset (it has {len(self.dataset)} images)")
        item = self.dataset[index]
        if item is None:
            raise DatasetError(f"image #{index} of the dataset cannot be read (a corrupt file)")
        return self.explain_tensor(item["image"], label=int(item["label"]))

    def explain_tensor(self, x: Tensor, *, label: int | None = None) -> ImageResult:
        """The result for a normalised image (3, H, W): computed once, then served from the cache."""
        key = f"{image_key(x)}-{label}"
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            result = self._compute(x, key, label)
            self._cache[key] = result
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return result

    def cached(self, key: str | None) -> ImageResult | None:
        """The cached result of ``key`` (None when it was never computed or has been evicted)."""
        with self._lock:
            return self._cache.get(key) if key is not None else None

    def _compute(self, x: Tensor, key: str, label: int | None) -> ImageResult:
        mean, std = self.cfg.data.mean, self.cfg.data.std
        if self.has_evidence:  # the concept models: the library's explanation, hierarchy and evidence included
            e = explain(self.model, x[None], topk=1, mean=mean, std=std)
            stages = [StageMaps(s, self.stage_caption(s, n), e.maps[j][0], e.present[j][0])
                      for j, (s, n) in enumerate(self.stages)]
            return ImageResult(key, e.images[0], e.logits[0], e.probs[0], stages,
                               e.hierarchy(0) if e.assignments else None, e.evidence[0], e.global_evidence[0], label)
        (_, _, out), = run_batches(self.model, [x[None]])
        logits = out.logits[0].float().cpu()
        maps = [m.float().cpu() for m in out.maps[: len(self.stages)]]
        stages = [StageMaps(s, self.stage_caption(s, n), m[0].numpy(), present_concepts(m)[0].numpy())
                  for (s, n), m in zip(self.stages, maps)]
        return ImageResult(key, denormalise(x[None], mean=mean, std=std)[0], logits.numpy(),
                           logits.softmax(dim=-1).numpy(), stages, None, None, None, label)

    # ------------------------------------------------------------------------------------------------ dataset
    def index(self, progress: Progress | None = None) -> DatasetIndex:
        """The dataset pass (:func:`~.index.build_index`), computed on the first call and kept."""
        if self.dataset is None:
            raise DatasetError(self.dataset_note or "no dataset was opened")
        with self._lock:
            if self._index is None:
                self._index = build_index(
                    self.model, self.dataset, len(self.stages), n_pro=getattr(self.cfg.model, "n_pro", ()),
                    depth=self.depth, class_names=self.class_names, topk=self.gallery_topk,
                    batch_size=self.batch_size, limit=self.limit, mean=self.cfg.data.mean, std=self.cfg.data.std,
                    progress=progress)
            return self._index

    def concept(self, position: int, concept: int, progress: Progress | None = None) -> ConceptInfo:
        """The concept view of foreground ``concept`` of the map stage at ``position`` in :attr:`stages`."""
        stage, n = self.stages[position]
        if not 0 <= concept < n - 1:
            raise ValueError(f"stage {stage} has concepts 0 to {n - 2} (and the background)")
        index = self.index(progress)
        patches = [(crop, f"image #{i} · {score:.2f}" + (f" · {cap}" if cap else ""))
                   for (i, crop, score), cap in zip(index.galleries[position].get(concept, []),
                                                    index.captions[position].get(concept, []))]
        presence = float(index.presence[position][concept]) if position < len(index.presence) else 0.0
        parents, children = self._family(index.hierarchy, stage, concept)
        return ConceptInfo(stage, concept, self.stage_caption(stage, n), presence, index.num_images, patches,
                           parents, children, self.stage_scores(stage))

    @staticmethod
    def _family(h: Hierarchy | None, stage: int, concept: int) -> tuple[list[tuple[int, float]],
                                                                        list[tuple[int, int, float]]]:
        """(coarse parents of a fine concept, strongest first; fine children of a coarse concept) in ``h``."""
        if h is None:
            return [], []
        if stage < len(h.assignments):
            row = h.assignments[stage][concept]
            order = np.argsort(-np.nan_to_num(row, nan=-1.0), kind="stable")
            return [(int(n), float(row[n])) for n in order if np.isfinite(row[n])], []
        children = [(i, k, float(q[k, concept])) for i, q in enumerate(h.assignments) for k in range(q.shape[0])
                    if np.isfinite(q[k]).all() and int(np.argmax(q[k])) == concept]
        return [], sorted(children, key=lambda t: (-t[2], t[0], t[1]))

    def stage_scores(self, stage: int) -> dict[str, float]:
        """The numeric scores of ``stage`` in eval.json's ``per_stage`` rows (empty when not evaluated)."""
        rows = self.metrics.get("per_stage")
        for row in rows if isinstance(rows, list) else []:
            if isinstance(row, dict) and row.get("stage") == stage:
                return {k: float(v) for k, v in row.items() if k not in ("stage", "n_pro")
                        and isinstance(v, (int, float)) and not isinstance(v, bool)}
        return {}

