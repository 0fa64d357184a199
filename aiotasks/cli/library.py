"""`aiotasks scripts load`: put this release's function library on the server."""

from __future__ import annotations

import typer

from ..admin import Admin
from .common import AppOption, NamespaceOption, RedisOption, open_app, run_admin

scripts = typer.Typer(help="aiotasks' Lua scripts on the server.", no_args_is_help=True)


@scripts.command("load")
def load(
    app_spec: AppOption = None,
    redis_url: RedisOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """Load this release's scripts as a function library (FUNCTION LOAD), as a user
    allowed to: apps granted only FCALL then use it (see the README, Least privilege)."""
    app = open_app(app_spec, redis_url, namespace)

    async def load_library(admin: Admin) -> str:
        scripts = admin.app.client.scripts
        await scripts.load()
        return scripts.library_name

    typer.echo(f"loaded {run_admin(app, load_library)}")
