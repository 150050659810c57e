"""Starting the app's web server offline: gradio's analytics and version check off, no share link, no server-side
rendering, nothing fetched at run time (gradio 6 bundles its fonts and scripts)."""
from __future__ import annotations

import importlib.util
import os
from typing import Any

from .session import AppSession
from .views import warm_up

__all__ = ["INSTALL_HINT", "OFFLINE_ENV", "MAX_UPLOAD", "gradio_missing", "serve"]

INSTALL_HINT = "pip install -e '.[app]'"
# Read by gradio when it is imported and launched; the app sets them before importing it.
OFFLINE_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1"}
MAX_UPLOAD = "50mb"  # larger uploads are refused by the server before they reach the app


def gradio_missing() -> str | None:
    """Why the app cannot start (gradio is not installed, with the command that installs it), or None."""
    if importlib.util.find_spec("gradio") is None:
        return f"the app needs gradio, which is not installed: {INSTALL_HINT}"
    return None


def serve(session: AppSession, *, host: str = "127.0.0.1", port: int = 7860, block: bool = True,
          quiet: bool = False) -> Any:
    """Serve the app of ``session`` on ``host``:``port`` (after one warm-up drawing); with ``block`` until Ctrl-C,
    else in the background (close it with the returned app's ``close()``). A port in use is an OSError."""
    os.environ.update(OFFLINE_ENV)
    from .ui import build_app

    warm_up(session)
    app = build_app(session)
    app.queue(default_concurrency_limit=1)
    app.launch(server_name=host, server_port=port, share=False, inbrowser=False, show_error=True, footer_links=[],
               ssr_mode=False, pwa=False, mcp_server=False, max_file_size=MAX_UPLOAD, prevent_thread_lock=not block,
               quiet=quiet)
    return app
