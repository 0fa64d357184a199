"""`aiotasks run MODULE:APP`: a worker (or a supervisor of several) until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import ssl
import sys
import time
from collections.abc import Coroutine
from contextlib import suppress
from enum import StrEnum
from typing import Annotated, Any

import typer

from .. import logs
from ..app import App
from ..backoff import Backoff
from ..config import redact_url
from ..errors import BrokerConnectionError, BrokerRefusedError, ConfigurationError, describe
from ..slots import MAX_CONCURRENCY
from ..worker import Worker
from .common import APP_ENV, check_url, finite, given_url, host_address, load_app
from .group import fail

#: A typo's guard: each process is a whole worker with its own connections.
MAX_PROCESSES = 1024

log = logging.getLogger("aiotasks.cli")


class Loop(StrEnum):
    """Event loop implementations."""

    uvloop = "uvloop"
    asyncio = "asyncio"


class LogLevel(StrEnum):
    """Logging levels."""

    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


class LogFormat(StrEnum):
    """Log line formats."""

    text = "text"
    json = "json"


def run(
    app_spec: Annotated[
        str,
        typer.Argument(metavar="MODULE:APP", envvar=APP_ENV, help="The App to run."),
    ],
    queues: Annotated[
        str | None, typer.Option(help="Queues, most important first: high,default.")
    ] = None,
    concurrency: Annotated[
        int, typer.Option(min=1, max=MAX_CONCURRENCY, help="Tasks running at once.")
    ] = 100,
    processes: Annotated[
        int,
        typer.Option(
            min=1, max=MAX_PROCESSES, help="Worker processes (a supervisor restarts any that die)."
        ),
    ] = 1,
    loop: Annotated[Loop, typer.Option(case_sensitive=False, help="Event loop.")] = Loop.uvloop,
    burst: Annotated[bool, typer.Option(help="Exit once the queues are empty.")] = False,
    redis_url: Annotated[
        str | None, typer.Option(help="Redis URL (wins over the App's).", callback=given_url)
    ] = None,
    shutdown_timeout: Annotated[
        float, typer.Option(min=0, help="Seconds running tasks get on SIGTERM.")
    ] = 30.0,
    connect_timeout: Annotated[
        float, typer.Option(min=0, help="Seconds to keep retrying Redis at startup.")
    ] = 10.0,
    max_deliveries: Annotated[
        int, typer.Option(min=1, help="Deliveries before dead-lettering.")
    ] = 5,
    log_level: Annotated[
        LogLevel, typer.Option(case_sensitive=False, help="Log level (info shows every task).")
    ] = LogLevel.warning,
    log_format: Annotated[
        LogFormat, typer.Option(case_sensitive=False, help="text, or json: one object per line.")
    ] = LogFormat.text,
    metrics_port: Annotated[
        int | None,
        typer.Option(min=1, max=65535, help="Serve Prometheus metrics on this port."),
    ] = None,
    metrics_host: Annotated[
        str, typer.Option(help="Address the metrics server listens on.", callback=host_address)
    ] = "0.0.0.0",
    reload: Annotated[
        bool,
        typer.Option(
            "--reload",
            help="Restart the worker (gracefully) when a .py file under the current "
            "directory changes. Needs the reload extra (watchfiles).",
        ),
    ] = False,
) -> None:
    """Run a worker for MODULE:APP (default $AIOTASKS_APP)."""
    finite("--shutdown-timeout", shutdown_timeout)
    finite("--connect-timeout", connect_timeout)
    if metrics_port is not None and metrics_port + processes - 1 > 65535:
        raise fail(f"--metrics-port {metrics_port} + {processes} processes passes port 65535", 2)
    logs.setup(log_level.value, log_format.value)
    if reload:
        raise typer.Exit(_reload(app_spec, shutdown_timeout))
    app = load_app(app_spec)
    if redis_url:
        app.configure(redis_url=redis_url)
    check_url(app.settings.redis_url, from_option=bool(redis_url))
    if processes > 1:
        from ..supervisor import supervise

        # The children re-run this command line without --processes (see supervisor.py).
        raise typer.Exit(supervise(processes, sys.argv))
    if metrics_port is not None:
        _serve_metrics(app, metrics_port, metrics_host)
    names = [q.strip() for q in queues.split(",")] if queues is not None else None
    if names is not None and not any(names):
        raise fail(f"--queues {queues!r} names no queue: give names separated by commas", 2)
    if names is not None and not all(names):  # `a,,b`, `a,`: a name left out by mistake?
        raise fail(f"--queues {queues!r} has an empty name: give names separated by commas", 2)
    opts: dict[str, Any] = {
        "queues": names,
        "concurrency": concurrency,
        "burst": burst,
        "shutdown_timeout": shutdown_timeout,
        "max_deliveries": max_deliveries,
    }
    _run_loop(serve(app, app_spec, opts, connect_timeout), loop)


def _reload(app_spec: str, shutdown_timeout: float) -> int:
    """Run this command line under the reloader. The app is imported by each child only,
    so an edit that breaks the import is reported there and fixed by the next edit."""
    try:
        import watchfiles  # noqa: F401
    except ImportError:
        raise fail("--reload needs watchfiles: pip install 'aiotasks-streams[reload]'", 2) from None
    module, _, attr = app_spec.partition(":")
    if not module or not attr:
        raise fail(f"expected module:attribute (e.g. myproject.tasks:app), got {app_spec!r}", 2)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    if not _module_exists(module):
        raise fail(f"cannot import {module!r}: no such module", 2)
    from ..reloader import reload

    return reload(sys.argv, app_spec, shutdown_timeout)


def _module_exists(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _serve_metrics(app: App, port: int, host: str) -> None:
    try:
        from .. import metrics
    except ImportError as exc:
        raise fail(f"--metrics-port needs prometheus-client ({exc})") from None
    try:
        metrics.install(app, port, host)
    except (OSError, OverflowError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise fail(f"cannot serve metrics on {host} port {port}: {reason}") from None


async def wait_for_redis(app: App, timeout: float, worker: Worker) -> None:
    """Ping (and prepare the worker: its consumer groups) until Redis answers and agrees,
    one log line per failed try, for up to `timeout` seconds.

    A refusal that no retry can fix (a wrong password, a database out of range) fails at
    once; one a retry may fix (NOPERM on a group while an admin fixes the ACL, out of
    memory, a read-only replica, loading) is retried like an unreachable server.
    """
    deadline = time.monotonic() + timeout
    backoff = Backoff(start=0.5, cap=2.0)
    url = redact_url(app.settings.redis_url)
    attempt = 1
    while True:
        try:
            await worker.unless_stopped(_ready(app, worker))
            return
        except BrokerConnectionError as exc:
            problem = f"cannot reach Redis at {url}"
            underlying = exc.__cause__ or exc
            cause = describe(underlying) or type(underlying).__name__
            if _certificate_refused(exc):  # the URL's CA or the server's certificate
                raise fail(f"{problem}: {cause}") from None
        except BrokerRefusedError as exc:
            problem, cause = str(exc), ""
        left = deadline - time.monotonic()
        if worker.is_stopping:
            return  # a signal came while waiting: run() sees the stop and ends at once
        if left <= 0:
            if cause:
                raise fail(f"{problem} after {timeout:g} s: {cause}") from None
            raise fail(f"{problem} (still refused after {timeout:g} s)") from None
        delay = min(backoff.next(), left)
        log.warning(
            "%s (attempt %d%s); retrying in %.1f s",
            problem,
            attempt,
            f": {cause}" if cause else "",
            delay,
            extra={"redis_url": url, "attempt": attempt, "retry_in": round(delay, 3)},
        )
        attempt += 1
        with suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await worker.wait_stopping()
                return  # a signal came while waiting: run() sees the stop


def _certificate_refused(exc: BaseException) -> bool:
    """Whether a TLS handshake refused the server's certificate somewhere in the chain of
    `exc`: a refusal that no retry changes, as a wrong password is."""
    seen: BaseException | None = exc
    for _ in range(10):  # a chain of causes and contexts, bounded
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


async def _ready(app: App, worker: Worker) -> None:
    try:
        await app.connect()
    except BrokerRefusedError as exc:
        if not exc.is_transient:
            raise fail(str(exc)) from None
        raise
    try:
        await worker.prepare()
    except ConfigurationError as exc:
        raise fail(str(exc)) from None


def banner(app: App, worker: Worker, spec: str) -> str:
    """The startup banner: app, queues, concurrency, Redis URL (password hidden), tasks."""
    tasks = _user_tasks(app)
    lines = [
        f"aiotasks worker {worker.name}",
        f"  app:         {spec} (namespace {app.settings.namespace!r})",
        f"  redis:       {redact_url(app.settings.redis_url)}",
        f"  queues:      {', '.join(worker.queues)}",
        f"  concurrency: {worker.concurrency}",
        f"  tasks ({len(tasks)}):",
        *(f"    - {n}" for n in tasks),
    ]
    return "\n".join(lines)


def _user_tasks(app: App) -> list[str]:
    return sorted(n for n in app.tasks if not n.startswith("aiotasks."))


def _announce(app: App, worker: Worker, spec: str) -> None:
    """The banner on stderr: text, or one JSON record (whatever the log level) with --log-format
    json, so that every line on stderr is then a JSON object."""
    if not logs.json_enabled():
        typer.echo(banner(app, worker, spec), err=True)
        return
    logs.emit(
        log,
        logging.INFO,
        f"aiotasks worker {worker.name} started",
        event="worker_started",
        worker=worker.name,
        app=spec,
        namespace=app.settings.namespace,
        redis_url=redact_url(app.settings.redis_url),
        queues=list(worker.queues),
        concurrency=worker.concurrency,
        pid=os.getpid(),
        tasks=_user_tasks(app),
    )


async def serve(app: App, spec: str, worker_opts: dict[str, Any], connect_timeout: float) -> None:
    """Connect, run one worker until SIGTERM/SIGINT (a second signal exits at once)."""
    worker = app.worker(**worker_opts)
    # Handlers first: preparing registers the worker, and from then on a SIGTERM must
    # stop it gracefully (exit 0), not kill it with the default action.
    _handle_signals(worker)
    await wait_for_redis(app, connect_timeout, worker)
    if not worker.is_stopping:  # a signal while connecting: run() only ends it
        _announce(app, worker, spec)
    _tune_gc()
    try:
        await worker.run()
    except Exception as exc:  # a bug, not bad input: keep the traceback for the operator
        log.critical("worker %s stopped on an unexpected error", worker.name, exc_info=True)
        raise fail(f"the worker stopped on an unexpected {type(exc).__name__}: {exc}") from None
    finally:
        try:
            # Closing sends nothing that must be answered, but a hung server can still
            # hold a connection's close: the worker is done with them.
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await app.close()
        except TimeoutError:
            log.warning("closing the connections to Redis timed out; exiting anyway")
    threads = worker.threads_running
    if worker.abandoned or threads:
        # A task that swallows cancellation would keep asyncio's shutdown waiting forever,
        # and a `def` task past its timeout the interpreter's exit (it joins its thread).
        # Their entries were given up: they are redelivered.
        log.warning(
            "exiting with %d abandoned task(s) still running",
            worker.abandoned + threads,
            extra={"worker": worker.name, "abandoned": worker.abandoned + threads},
        )
        logging.shutdown()
        os._exit(0)


# A young-generation collection every 10,000 allocations instead of 700: each one walks
# the containers allocated since the last, in a busy worker mostly those of the tasks in
# flight, which at the default cost a no-op task ~6 us of its ~31 (Python 3.11). Cyclic
# garbage waits a little longer; refcounting frees the rest.
GC_THRESHOLD = (10_000, 10, 10)


def _tune_gc() -> None:
    """Tune the cyclic collector for a worker process (not for an embedded worker, whose
    process is the user's): what was loaded at startup stays out of every collection, and
    young collections run less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


#: Seconds `aiotasks run` waits for the App's connections to close once its worker stopped.
CLOSE_TIMEOUT = 2.0


def _handle_signals(worker: Worker) -> None:
    """SIGTERM/SIGINT stop the worker gracefully; a second one exits at once."""
    signals = 0

    def on_signal(sig: signal.Signals) -> None:
        nonlocal signals
        signals += 1
        fields = {"worker": worker.name, "signal": sig.name}
        if signals > 1:
            log.warning(
                "second %s: exiting now; unfinished tasks will be redelivered",
                sig.name,
                extra=fields,
            )
            os._exit(1)
        log.warning(
            "%s: stopping; running tasks get up to %s s to finish (again to force)",
            sig.name,
            worker.shutdown_timeout,
            extra=fields,
        )
        worker.stop()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)


def _run_loop(coro: Coroutine[Any, Any, None], loop: Loop) -> None:
    if loop == Loop.uvloop and sys.platform != "win32":
        try:
            import uvloop
        except ImportError:
            log.warning("uvloop is not installed; using asyncio")
        else:
            uvloop.run(coro)
            return
    asyncio.run(coro)
