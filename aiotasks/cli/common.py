"""What every command shares: finding the App, checking its URL, talking to Redis, asking.

Every operations command finds Redis and the namespace from `--app module:attr`
(default $AIOTASKS_APP), or from `--redis-url` (default $AIOTASKS_REDIS_URL, then
$REDIS_URL) and `--namespace` (default "aiotasks"); `--redis-url` and `--namespace` given
with `--app` win over the App's own.
"""

from __future__ import annotations

import asyncio
import difflib
import importlib
import json
import math
import os
import ssl
import sys
import traceback
from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import Annotated, Any, TypeVar

import typer
from redis.exceptions import ResponseError

from ..admin import Admin
from ..app import App
from ..config import (
    SHARDS_ENV,
    InvalidRedisURL,
    ShardsEnvError,
    check_redis_url,
    env_redis_source,
    redact_url,
    resolve_shards,
)
from ..errors import CONNECTION_ERRORS, AiotasksError, BrokerConnectionError
from ..keys import NAMESPACE_RULE, is_namespace
from ..message import QUEUE_NAME_RULE, is_queue_name
from ..refusals import refusal
from .group import CliError, fail

T = TypeVar("T")

#: The environment variable that names the App when --app (or run's MODULE:APP) is not given.
APP_ENV = "AIOTASKS_APP"
#: Seconds a command waits for Redis to answer before it gives up.
CONNECT_TIMEOUT = 5.0

AppOption = Annotated[
    str | None,
    typer.Option(
        "--app",
        metavar="MODULE:APP",
        envvar=APP_ENV,
        help="The App (gives Redis URL and namespace).",
    ),
]


def given_url(value: str | None) -> str | None:
    """Typer callback: a --redis-url given empty (`--redis-url "$URL"`, URL unset) is
    refused, not read as absent: that would reach another server (exit 2)."""
    if value is not None and not value.strip():
        raise typer.BadParameter("it is empty: give a Redis URL, or leave the option out")
    return value


RedisOption = Annotated[
    str | None,
    typer.Option(
        help="Redis URL (wins over the App's; default $AIOTASKS_REDIS_URL, then $REDIS_URL).",
        callback=given_url,
    ),
]
NamespaceOption = Annotated[
    str | None, typer.Option(help="Key namespace (default: the App's, else 'aiotasks').")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]
YesOption = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]


# -- the App ------------------------------------------------------------------------------


def load_app(spec: str) -> App:
    """Import `module:attribute` (the current directory is importable) and check it is an
    App; an error names $AIOTASKS_APP when the spec came from it."""
    try:
        return _load_app(spec)
    except CliError as exc:
        if not _spec_from_environment(spec) or str(exc).startswith("$"):  # says its own
            raise
        raise CliError(f"{exc} (MODULE:APP from ${APP_ENV})", exc.code, exc.detail) from None


def _spec_from_environment(spec: str) -> bool:
    args = sys.argv[1:]
    return os.environ.get(APP_ENV) == spec and spec not in args and f"--app={spec}" not in args


def _load_app(spec: str) -> App:
    """Import `module:attribute` (the current directory is importable) and check it is an App.

    An exception raised by the user's module shows its traceback, then the error line.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise fail(f"expected module:attribute (e.g. myproject.tasks:app), got {spec!r}", 2)
    not_dotted = _not_a_module_name(module_name)
    if not_dotted:
        raise fail(f"{module_name!r} is {not_dotted}, as in {_as_module(module_name, attr)}", 2)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    obj: Any = _import(module_name)
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise fail(f"module {module_name!r} has no attribute {attr!r}", 2) from None
    if not isinstance(obj, App):
        raise fail(f"{spec} is a {type(obj).__name__}, not an aiotasks.App", 2)
    return obj


def check_env_shards() -> None:
    """Refuse a $AIOTASKS_SHARDS no App can take (exit 2), naming it, before a bare
    App() reads it (it read as a bug of aiotasks)."""
    if os.environ.get(SHARDS_ENV, "").strip():
        try:
            resolve_shards(None)
        except ShardsEnvError as exc:
            raise fail(str(exc), 2) from None


def _not_a_module_name(name: str) -> str:
    """What is wrong with a MODULE that importlib would misread ('' when nothing)."""
    if "/" in name or "\\" in name or name.endswith(".py"):
        return "a file path, not a module: give its dotted module name"
    if name.startswith("."):
        return "a relative module name: give the module's full dotted name"
    return ""


def _as_module(name: str, attr: str) -> str:
    """`name`, a file path or a relative module name, as the MODULE:APP to give instead,
    for the error's example: dotted from the current directory when that names a module
    (a relative name without its dots), else the file's own name from its directory."""
    if _not_a_module_name(name).startswith("a relative"):  # not a path: dots, a name
        return f"{name.lstrip('.') or 'module'}:{attr} (the current directory is importable)"
    path = os.path.abspath(name.replace("\\", "/").removesuffix(".py"))
    parts = os.path.relpath(path, os.getcwd()).split(os.sep)
    if all(p.isidentifier() for p in parts):
        return f"{'.'.join(parts)}:{attr} (the current directory is importable)"
    stem = os.path.basename(path)
    return f"{stem}:{attr}, run from {os.path.dirname(path) or '/'}"


def _import(name: str) -> ModuleType:
    error: Exception
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if name == missing or name.startswith(missing + "."):  # the spec names no module
            raise fail(f"cannot import module {name!r}: {exc}", 2) from None
        error = exc
    except Exception as exc:  # the user's module raised while importing: show where
        error = exc
        if isinstance(exc, ShardsEnvError):
            # Its App() read a bad $AIOTASKS_SHARDS: the environment's error, not the
            # module's (an App given shards= never reads it, so it is not checked first).
            raise fail(str(exc), 2) from None
    message = f"importing {name!r} raised {type(error).__name__}: {error}"
    raise fail(message, 2, detail=_user_traceback(error)) from None


def _user_traceback(exc: BaseException) -> str:
    """The traceback of an import, without importlib's and this module's frames."""
    tb = traceback.TracebackException.from_exception(exc)
    importlib_dir = os.path.dirname(importlib.__file__ or "")
    tb.stack = traceback.StackSummary.from_list(
        [
            frame
            for frame in tb.stack
            if frame.filename != __file__
            and not frame.filename.startswith("<frozen importlib")
            and os.path.dirname(frame.filename) != importlib_dir
        ]
    )
    return "".join(tb.format())


def open_app(app_spec: str | None, redis_url: str | None, namespace: str | None) -> App:
    """The App to operate on: imported from `app_spec`, or a bare one for URL + namespace."""
    if namespace is not None and not is_namespace(namespace):
        # Before anything is imported: `--namespace "$NS"` with NS unset must not reach
        # the default namespace (a purge there would empty the wrong queues).
        raise fail(f"--namespace must be {NAMESPACE_RULE}, got {namespace!r:.60}", 2)
    if not app_spec:
        check_env_shards()  # the bare App reads it
    app = load_app(app_spec) if app_spec else App(namespace=namespace or "aiotasks")
    changes: dict[str, str] = {}
    if redis_url:
        changes["redis_url"] = redis_url
    if namespace and app_spec:
        changes["namespace"] = namespace
    if changes:
        app.configure(**changes)
    check_url(app.settings.redis_url, from_option=bool(redis_url))
    return app


def queue_name(value: str) -> str:
    """Typer callback: a queue argument must be a queue name (exit 2 otherwise)."""
    if not is_queue_name(value):
        raise typer.BadParameter(f"{value!r:.60} is not {QUEUE_NAME_RULE}")
    return value


def host_address(value: str) -> str:
    """Typer callback: an address to listen on; an empty one would mean every interface."""
    if not value.strip():
        raise typer.BadParameter("it is empty: give an address (0.0.0.0 for every interface)")
    return value


def not_empty(value: str) -> str:
    """Typer callback: an id or name argument must not be empty (exit 2 otherwise)."""
    if not value.strip():
        raise typer.BadParameter("it is empty")
    return value


def unknown_task_note(app: App, app_spec: str | None, name: str) -> None:
    """Warn (on stderr; not an error: another service's workers may run it) when the
    App given with --app has tasks but none of this name: a typo would send tasks that
    every worker of this App dead-letters as UnknownTask."""
    known = sorted(n for n in app.tasks if not n.startswith("aiotasks."))
    if not app_spec or not known or name in app.tasks:
        return
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"its tasks: {', '.join(known[:8])}"
    if not close and len(known) > 8:
        hint += f" and {len(known) - 8} more"
    typer.echo(
        f"warning: {app_spec} has no task {name!r} ({hint}); its workers would "
        "dead-letter it as UnknownTask",
        err=True,
    )


def check_url(url: str, from_option: bool) -> None:
    """Refuse a Redis URL that cannot work, before connecting, naming where it came from."""
    try:
        check_redis_url(url)
    except InvalidRedisURL as exc:
        raise fail(f"{exc} ({url_source(url, from_option)})", 2) from None


def url_source(url: str, from_option: bool) -> str:
    """Where a URL came from, for error messages."""
    if from_option:
        return "from --redis-url"
    env = env_redis_source()
    if env is not None and env[1] == url:
        return f"from ${env[0]}"
    return "the App's redis_url"


# -- talking to Redis ---------------------------------------------------------------------


def run_admin(app: App, fn: Callable[[Admin], Awaitable[T]]) -> T:
    """Connect, run `fn(Admin(app))`, close; turn known failures into one error line."""
    url = redact_url(app.settings.redis_url)
    try:
        return asyncio.run(_with_admin(app, fn))
    except AiotasksError as exc:  # before CONNECTION_ERRORS: ResultTimeout is a TimeoutError
        raise fail(str(exc)) from None
    except BrokenPipeError:
        # Our stdout's reader went away (`status --watch | head`); redis-py reports a
        # broken connection as its own ConnectionError. The CLI exits without a word.
        raise
    except CONNECTION_ERRORS as exc:
        raise fail(f"lost Redis at {url}: {exc}") from None
    except ResponseError as exc:
        raise fail(str(refusal(url, exc))) from None


async def _with_admin(app: App, fn: Callable[[Admin], Awaitable[T]]) -> T:
    asyncio.get_running_loop().set_exception_handler(_quiet_broken_connections)
    try:
        await _connect(app)
        recorded = await app.client.recorded_shards()
        if recorded is not None and recorded != app.settings.shards:
            # Operate on the namespace as its workers spread it, whatever this App says.
            await app.close()
            app.configure(shards=recorded)
        return await fn(Admin(app))
    finally:
        await app.close()


def _quiet_broken_connections(
    loop: asyncio.AbstractEventLoop, context: dict[str, Any], _future: type = asyncio.Future
) -> None:
    """Let asyncio report everything but a broken connection's error left in a future.

    A stream that breaks keeps its error in a future of its own, marked seen only when the
    stream is collected; if the collector frees the future first, asyncio prints it as a
    traceback ("Future exception was never retrieved"), after the command has already
    said, in one line, that Redis could not be reached (seen with a TLS server that
    refuses a client without a certificate). aiotasks' own connections mark it seen when
    they disconnect (transport.py); this covers the ones redis-py makes for itself (a
    Sentinel's connections to the Sentinels). (`_future` is bound here: the report may
    come at interpreter exit, when this module's globals are gone.)
    """
    if (
        type(context.get("future")) is _future  # a plain future, not a task
        and isinstance(context.get("exception"), (ConnectionError, ssl.SSLError))
        and context.get("message") == "Future exception was never retrieved"
    ):
        return
    loop.default_exception_handler(context)


async def _connect(app: App) -> None:
    url = redact_url(app.settings.redis_url)
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            await app.connect()
    except TimeoutError:
        hint = ""
        if url.lower().startswith("rediss"):
            hint = " (a server without TLS never answers a TLS handshake: is it redis://?)"
        raise BrokerConnectionError(
            f"cannot reach Redis at {url}: no answer in {CONNECT_TIMEOUT:g} s{hint}"
        ) from None


# -- asking and checking ------------------------------------------------------------------


def confirm(question: str, yes: bool) -> None:
    """Ask unless --yes; the answer may come from a terminal or a pipe (`echo y | ...`).

    The question goes to stderr, so that stdout holds only the command's result.
    """
    if yes:
        return
    typer.echo(f"{question} [y/N]: ", nl=False, err=True)
    answer = sys.stdin.readline()
    if not sys.stdin.isatty():
        typer.echo(answer.strip(), err=True)  # show what the pipe answered, end the line
    if not answer:
        raise fail("no answer to the confirmation (standard input ended): pass --yes to skip it")
    if answer.strip().lower() not in ("y", "yes"):
        raise fail("aborted: nothing was changed")


def finite(option: str, value: float | None) -> float | None:
    """Refuse nan and inf, which the float parser accepts."""
    if value is not None and not math.isfinite(value):
        raise fail(f"{option} must be a finite number of seconds, got {value}", 2)
    return value


def json_arg(option: str, raw: str | None, kind: type) -> Any:
    """An option holding JSON, parsed and checked to be a `kind` (list or dict)."""
    if raw is None:
        return kind()
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise fail(f"{option} is not valid JSON ({exc}): {raw!r}", 2) from None
    except RecursionError:
        raise fail(f"{option} is nested too deeply", 2) from None
    if not isinstance(value, kind):
        want = "a JSON array, e.g. '[1, 2]'" if kind is list else "a JSON object, e.g. '{\"x\": 1}'"
        raise fail(f"{option} must be {want}, got {raw!r}", 2)
    return value
