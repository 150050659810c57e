"""The gradio page of the app: three tabs (Image, Concept, Model) laid out over an :class:`~.session.AppSession`.

Every callback is a module-level function taking the session first, bound with :func:`functools.partial`; each
turns a view of :mod:`.views` into the components' values, so nothing here computes or draws. Imported only by
:func:`.serve.serve` (gradio is an optional extra: ``pip install -e '.[app]'``).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Iterator

import gradio as gr

from ..data import DatasetError
from .inputs import AppInputError
from .results import ImageResult
from .session import AppSession
from .views import ImagePage, concept_page, contrast_view, error_page, image_page, model_page, region_images

__all__ = ["build_app", "RUNNER_UP"]

RUNNER_UP = -1  # the "why not" picker's default: the second most probable class
EMPTY = "Upload an image, or pick one of the dataset."  # the image tab before an image
SENT_FIRST = 5  # key, status, input, top classes and regions: the first step of an answer (:func:`_answer`)


def _image_values(page: ImagePage) -> tuple[Any, ...]:
    """The image tab's output values: key, status, input, top classes, regions, hierarchy, evidence, its text."""
    return (page.key, page.status, page.image, page.top or None, page.regions, page.hierarchy, page.evidence,
            page.evidence_text)


def _versus(value: Any) -> int | None:
    return None if value in (None, RUNNER_UP) else int(value)


def on_clear() -> tuple[Any, ...]:
    """The upload cleared → the image tab emptied."""
    return _image_values(ImagePage(None, EMPTY))


def _answer(session: AppSession, result: ImageResult, alpha: float, versus: Any) -> Iterator[tuple[Any, ...]]:
    """The image tab in two steps: the prediction and regions first, then the evidence and the hierarchy (the
    outputs sent already are left as they are)."""
    first = _image_values(image_page(session, result, alpha=alpha, details=False))
    yield first
    whole = _image_values(image_page(session, result, alpha=alpha, versus=_versus(versus)))
    yield (gr.update(),) * SENT_FIRST + whole[SENT_FIRST:]


def on_upload(session: AppSession, path: str | None, alpha: float, versus: Any) -> Iterator[tuple[Any, ...]]:
    """An uploaded file → the image tab (or the reason it cannot be used)."""
    if not path:
        yield on_clear()
        return
    try:
        result = session.upload(path)
    except AppInputError as exc:
        yield _image_values(error_page(str(exc)))
        return
    yield from _answer(session, result, alpha, versus)


def on_pick(session: AppSession, index: Any, alpha: float, versus: Any) -> Iterator[tuple[Any, ...]]:
    """A dataset image picked by index → the image tab."""
    if index is None:
        yield on_clear()
        return
    try:
        result = session.dataset_image(int(index))
    except DatasetError as exc:
        yield _image_values(error_page(str(exc)))
        return
    yield from _answer(session, result, alpha, versus)


def on_alpha(session: AppSession, key: str | None, alpha: float) -> list:
    """The opacity slider → the region overlays of the current image, redrawn from the cache."""
    result = session.cached(key)
    return region_images(result, alpha) if result is not None else []


def on_versus(session: AppSession, key: str | None, versus: Any) -> tuple[Any, str]:
    """The "why not" class → the evidence drawing and its explanation for the current image."""
    result = session.cached(key)
    return contrast_view(session, result, _versus(versus)) if result is not None else (None, "")


def on_concept(session: AppSession, position: Any, concept: Any, progress: gr.Progress = gr.Progress()
               ) -> tuple[str, list, Any]:
    """A stage and concept → the concept tab (indexing the dataset on first use, with a progress bar)."""
    if not session.stages:
        return f"This {session.kind} model has no part maps, so it has no concepts to show.", [], None
    if position is None or concept is None:
        return "Pick a stage and a concept.", [], None
    try:
        page = concept_page(session, int(position), int(concept),
                            lambda done, total: progress(done / max(total, 1), desc="indexing the dataset"))
    except (DatasetError, ValueError) as exc:
        return f"**Cannot show this concept.** {exc}", [], None
    return page.text, page.patches, page.hierarchy


def on_stage(session: AppSession, position: Any, progress: gr.Progress = gr.Progress()) -> tuple[Any, ...]:
    """A new stage → its concepts in the concept picker (the first one chosen) and that concept's view."""
    choices = _concept_choices(session, position)
    return (gr.update(choices=choices, value=choices[0][1] if choices else None),
            *on_concept(session, position, 0 if choices else None, progress))


def _concept_choices(session: AppSession, position: Any) -> list[tuple[str, int]]:
    if position is None or not session.stages:
        return []
    return [(f"concept {k}", k) for k in range(session.stages[int(position)][1] - 1)]


def build_app(session: AppSession) -> gr.Blocks:
    """The page: an Image tab, a Concept tab and a Model tab over ``session``."""
    with gr.Blocks(title=f"ivpt app · {session.kind}", analytics_enabled=False) as app:
        gr.Markdown(f"## ivpt app · {session.kind} · `{session.checkpoint}`")
        with gr.Tab("Image"):
            _image_tab(session)
        with gr.Tab("Concept", elem_id="concept-tab") as tab:
            _concept_tab(session, tab)
        with gr.Tab("Model"):
            _model_tab(session)
    return app


def _image_tab(session: AppSession) -> None:
    key = gr.State(None)
    with gr.Row():
        with gr.Column(scale=1):
            upload = gr.File(label="Upload an image", type="filepath", elem_id="upload")
            pick = gr.Dropdown(session.dataset_choices(), value=None, label="…or pick a dataset image",
                               info=session.dataset_note or None, elem_id="pick")
            alpha = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Region opacity", elem_id="alpha")
            versus = gr.Dropdown([("the runner-up", RUNNER_UP)] + [(n, c) for c, n in enumerate(session.class_names)],
                                 value=RUNNER_UP, label="Why the prediction and not…", elem_id="versus")
            image = gr.Image(label="Input as the model sees it", interactive=False, height=240, format="jpeg",
                             elem_id="input-image")
        with gr.Column(scale=3):
            status = gr.Markdown(EMPTY, elem_id="status")
            top = gr.Label(num_top_classes=session.topk, label="Top classes", elem_id="top-classes")
            regions = gr.Gallery(label="Concept regions per stage (fine → coarse)", columns=max(len(session.stages), 1),
                                 height=320, object_fit="contain", interactive=False, format="jpeg",
                                 elem_id="regions")
    gr.Markdown("#### Evidence per concept: the prediction against another class")
    evidence_text = gr.Markdown(elem_id="evidence-text")
    evidence = gr.Image(show_label=False, interactive=False, format="png", elem_id="evidence")
    gr.Markdown("#### Fine → coarse hierarchy of this image")
    hierarchy = gr.Image(show_label=False, interactive=False, format="png", elem_id="hierarchy")
    outputs = [key, status, image, top, regions, hierarchy, evidence, evidence_text]
    upload.upload(partial(on_upload, session), [upload, alpha, versus], outputs)
    upload.clear(on_clear, None, outputs)
    pick.input(partial(on_pick, session), [pick, alpha, versus], outputs)
    alpha.release(partial(on_alpha, session), [key, alpha], regions)
    versus.input(partial(on_versus, session), [key, versus], [evidence, evidence_text])


def _concept_tab(session: AppSession, tab: gr.Tab) -> None:
    stages = [(session.stage_caption(s, n), j) for j, (s, n) in enumerate(session.stages)]
    with gr.Row():
        stage = gr.Dropdown(stages, value=stages[-1][1] if stages else None, label="Stage", elem_id="stage")
        concept = gr.Dropdown(_concept_choices(session, stages[-1][1] if stages else None),
                              value=0 if stages else None, label="Concept", elem_id="concept")
    info = gr.Markdown("Open this tab to index the dataset (once) and show the concept.", elem_id="concept-info")
    patches = gr.Gallery(label="Top patches over the dataset", columns=8, height=210, object_fit="contain",
                         interactive=False, format="jpeg", elem_id="concept-gallery")
    gr.Markdown("#### Fine → coarse hierarchy over the dataset")
    hierarchy = gr.Image(show_label=False, interactive=False, format="png", elem_id="dataset-hierarchy")
    tab.select(partial(on_concept, session), [stage, concept], [info, patches, hierarchy])
    stage.input(partial(on_stage, session), [stage], [concept, info, patches, hierarchy])
    concept.input(partial(on_concept, session), [stage, concept], [info, patches, hierarchy])


def _model_tab(session: AppSession) -> None:
    page = model_page(session)
    gr.Markdown(page.summary, elem_id="model-summary")
    gr.Dataframe(value=page.metrics[1] or None, headers=page.metrics[0], label="Metrics", interactive=False,
                 elem_id="metrics")
    if page.per_stage[1]:
        gr.Dataframe(value=page.per_stage[1], headers=page.per_stage[0], label="Per stage", interactive=False)
    if page.health[1]:
        gr.Dataframe(value=page.health[1], headers=page.health[0], label="Concept health", interactive=False)
    if page.curves is not None:
        gr.Markdown("#### Training curves and concept health (log.csv)")
        gr.Image(page.curves, show_label=False, interactive=False, format="png", elem_id="curves")
    else:
        gr.Markdown("No log.csv beside the checkpoint: no training curves.")
