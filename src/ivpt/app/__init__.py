"""``ivpt app``: a local web app to explore a trained checkpoint of any model kind (see docs/app.md).

- :mod:`.session` — :class:`AppSession`: the model, results per image (cached by hash) and the dataset index;
  :mod:`.results` — what they hold (:class:`ImageResult`, the A-vs-B contrast, a concept's view).
- :mod:`.index` — the one pass over the dataset: top patches, presence and hierarchy per concept.
- :mod:`.inputs` — uploaded files checked and read (:class:`AppInputError`).
- :mod:`.views`, :mod:`.figures` — what each view shows, as text, tables and RGB arrays.
- :mod:`.ui`, :mod:`.serve` — the gradio page and its offline server; gradio (``pip install -e '.[app]'``) is
  imported only when the app is served.
"""
from .inputs import AppInputError, read_image
from .serve import INSTALL_HINT, gradio_missing, serve
from .results import ImageResult
from .session import AppSession, find_checkpoint

__all__ = ["AppSession", "ImageResult", "AppInputError", "read_image", "find_checkpoint", "serve",
           "gradio_missing", "INSTALL_HINT"]
