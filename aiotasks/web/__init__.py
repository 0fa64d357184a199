"""The dashboard: an ASGI app to mount behind your own auth (`tasks.dashboard()`).

Imported only by `App.dashboard()` and `aiotasks web`, so that workers never load it;
it needs the `web` extra (`pip install 'aiotasks-streams[web]'`: Starlette and Jinja2, plus
uvicorn for `aiotasks web`).
"""

from __future__ import annotations

try:
    import jinja2  # noqa: F401
    import starlette  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "the dashboard needs the 'web' extra: "
        f"pip install 'aiotasks-streams[web]' (missing {exc.name})"
    ) from exc

from .routes import Dashboard, create

__all__ = ["Dashboard", "create"]
