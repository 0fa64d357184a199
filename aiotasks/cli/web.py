"""`aiotasks web`: serve the dashboard alone (`tasks.dashboard()` is the mountable one)."""

from __future__ import annotations

import contextlib
import importlib
import socket
from collections.abc import AsyncIterator
from typing import Annotated, Any

import typer

from ..app import App
from ..config import redact_url
from .common import (
    AppOption,
    NamespaceOption,
    RedisOption,
    host_address,
    open_app,
    run_admin,
)
from .group import fail


def web(
    host: Annotated[
        str, typer.Option(help="Address to listen on.", callback=host_address)
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8080,
    read_only: Annotated[
        bool, typer.Option("--read-only", help="Show everything, change nothing.")
    ] = False,
    app_spec: AppOption = None,
    redis_url: RedisOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """Serve the dashboard: queues, workers, periodic tasks and tasks, live."""
    uvicorn = _web_modules()
    app = open_app(app_spec, redis_url, namespace)
    # Redis must answer before we listen: one error line rather than a page of errors.
    probe = App(redis_url=app.settings.redis_url, namespace=app.settings.namespace)
    run_admin(probe, lambda admin: admin.known_queues())
    if probe.settings.shards != app.settings.shards:
        app.configure(shards=probe.settings.shards)  # as the namespace's workers spread it
    _check_port(host, port)
    asgi = app.dashboard(read_only=read_only)
    shown = f"[{host}]" if ":" in host else host
    typer.echo(
        f"aiotasks dashboard on http://{shown}:{port}/ (namespace {app.settings.namespace!r} "
        f"at {redact_url(app.settings.redis_url)}{', read-only' if read_only else ''})",
        err=True,
    )
    uvicorn.run(_standalone(app, asgi), host=host, port=port, log_level="warning")


def _web_modules() -> Any:
    """uvicorn, after checking that the dashboard's extra is installed."""
    try:
        importlib.import_module("aiotasks.web")  # its error names the extra
    except ImportError as exc:
        raise fail(str(exc)) from None
    try:
        return importlib.import_module("uvicorn")
    except ImportError:
        raise fail(
            "the dashboard needs the 'web' extra: "
            "pip install 'aiotasks-streams[web]' (missing uvicorn)"
        ) from None


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _standalone(app: App, asgi: Any) -> Any:
    """The dashboard served alone: it owns the App's connection and its hub."""
    from starlette.applications import Starlette
    from starlette.routing import Mount

    @contextlib.asynccontextmanager
    async def lifespan(_web: Any) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await asgi.state.dashboard.hub.close()
            await app.close()

    return Starlette(routes=[Mount("/", app=asgi)], lifespan=lifespan)


__all__ = ["web"]
