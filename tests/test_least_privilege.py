"""Least privilege: an app runs as an ACL user limited to its namespace's keys and
channels and to the commands the README's ACL line lists (read from the README, so the
two cannot drift apart); one permission fewer gives a clear error line. And TLS, with a
throwaway CA and client certificates, in the URL forms the README documents.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from aiotasks import App, TaskRevoked, TaskState, chord
from aiotasks.scripts import LIBRARIES
from aiotasks.testing.server import OwnServer, server_binary
from tests.conftest import ROOT
from tests.helpers import wait_consuming, wait_state

PASSWORD = "acl-pw-7d1e"
ADMIN_PASSWORD = "admin-pw-2c9a"


def readme_acl_line() -> str:
    """The `ACL SETUSER` line of the README's least-privilege section."""
    found = re.findall(r"^ACL SETUSER .+$", (ROOT / "README.md").read_text(), re.MULTILINE)
    assert len(found) == 1, f"the README should hold one ACL SETUSER line, found {found}"
    return found[0]


def acl_rules(namespace: str) -> list[str]:
    """The README's rules for `namespace`, without the user name and password."""
    words = readme_acl_line().split()
    assert words[:3] == ["ACL", "SETUSER", "myapp"], words
    rules = [w.replace("{myapp}", "{" + namespace + "}") for w in words[3:]]
    assert ">password" in rules
    return [r for r in rules if r != ">password"]


def admin(server: OwnServer) -> redis.Redis:
    """The default user, password-protected once the app's user exists (so that the app's
    connections start unauthenticated, as in production)."""
    return redis.Redis(host="127.0.0.1", port=server.port, password=ADMIN_PASSWORD)


def add_user(server: OwnServer, rules: list[str]) -> str:
    with redis.Redis.from_url(server.url) as r:
        r.execute_command("ACL", "SETUSER", "app", "reset", ">" + PASSWORD, *rules)
        r.execute_command("ACL", "SETUSER", "default", "resetpass", ">" + ADMIN_PASSWORD)
    with admin(server) as r:
        r.execute_command("ACL", "LOG", "RESET")
    return server.url.replace("redis://", f"redis://app:{PASSWORD}@")


def denied(server: OwnServer) -> list[str]:
    """What the ACL refused since the user was made: 'reason object' per entry."""
    with admin(server) as r:
        entries = r.acl_log()
    return sorted({f"{e['reason']} {e['object']}" for e in entries})


def ops(*args: str, url: str, namespace: str) -> subprocess.CompletedProcess[str]:
    """`aiotasks ARGS...` on `url`: `run` finds the namespace in the environment (its App
    reads it), the operations commands take --namespace."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIOTASKS_")}
    env["AIOTASKS_TEST_NAMESPACE"] = namespace
    where = ["--redis-url", url] + ([] if args[0] == "run" else ["--namespace", namespace])
    return subprocess.run(
        [sys.executable, "-m", "aiotasks", *args, *where],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


def stand_ins(app: App) -> dict[str, Any]:
    """Client-side tasks named like the worker's (tests/apps/acl.py)."""

    async def never(*args: Any) -> Any:
        raise AssertionError("runs on the worker only")

    return {name: app.task(name=f"acl.{name}")(never) for name in ("add", "tsum", "sleep", "steps")}


async def everything(app: App, url: str, namespace: str) -> None:
    """Send, wait, a chord, retries with progress and a rate limit, revoke (queued and
    running), and the operations commands, all as the app's user."""
    t = stand_ins(app)
    assert await (await t["add"].send(1, 2)).result(timeout=10) == 3
    body = await chord([t["add"].s(1, 2), t["add"].s(3, 4)], t["tsum"].s()).send()
    assert await body.result(timeout=10) == 10
    steps = await t["steps"].send(3)
    progress = [i.progress async for i in steps.updates() if i.progress]
    assert await steps.result(timeout=10) == 3 and progress, progress
    queued = await t["add"].options(countdown=60).send(5, 5)
    await queued.revoke()
    running = await t["sleep"].send(30)
    await wait_state(running, TaskState.STARTED)
    await running.revoke(terminate=True)
    for h in (queued, running):
        with pytest.raises(TaskRevoked):
            await h.result(timeout=10)
    waiting = await t["add"].options(queue="idle").send(1, 1)
    await app.send_task("acl.nobody-knows-this", queue="default")  # a dead letter
    for command in (
        ["status"],
        ["status", "--json"],
        ["inspect", waiting.id],
        ["revoke", waiting.id],
        ["purge", "idle", "--yes"],
        ["dead-letters", "list", "default"],
        ["dead-letters", "requeue", "default"],
    ):
        proc = await asyncio.to_thread(ops, *command, url=url, namespace=namespace)
        assert proc.returncode == 0, (command, proc.stdout, proc.stderr)


@pytest.mark.parametrize(
    ("loaded", "without", "refused"),
    [
        (True, [], []),
        (False, [], ["command function|load"]),
        (False, ["-fcall"], ["command fcall"]),
    ],
    ids=["library-loaded", "library-not-loaded", "no-fcall"],
)
async def test_the_readme_acl_line_is_enough(
    own_server: OwnServer,
    namespace: str,
    spawn_worker: Any,
    loaded: bool,
    without: list[str],
    refused: list[str],
) -> None:
    """The README's line with the function library loaded by an admin (`aiotasks scripts
    load`); without it (each process tries to load it, may not, and runs each script by
    EVALSHA); and without `fcall`, as an ACL written for Redis 6.2 has it."""
    url = add_user(own_server, [*acl_rules(namespace), *without])
    if loaded:
        admin_url = f"redis://:{ADMIN_PASSWORD}@127.0.0.1:{own_server.port}"
        proc = await asyncio.to_thread(ops, "scripts", "load", url=admin_url, namespace=namespace)
        assert proc.returncode == 0 and proc.stdout.startswith("loaded aiotasks_"), proc.stderr
        assert ADMIN_PASSWORD not in proc.stdout + proc.stderr
    app = App(redis_url=url, namespace=namespace)
    w = spawn_worker(module="acl", url=url)
    try:
        await wait_consuming(app, w)
        await everything(app, url, namespace)
        w.signal(signal.SIGTERM)
        assert await asyncio.to_thread(w.wait, 20) == 0
    finally:
        await app.close()
    out = w.output()
    assert "Traceback" not in out and "refused" not in out and "NOPERM" not in out, out
    # The worker's startup check tries CONFIG GET, then reads INFO; without the library,
    # each process's first script call tries to load it (or to FCALL), then uses EVALSHA.
    assert denied(own_server) == sorted(["command config|get", *refused])


@pytest.mark.parametrize(
    ("rule", "command", "words"),
    [
        ("-xgroup", ["run", "tests.apps.acl:app", "--connect-timeout", "1"], "consumer group"),
        ("-fcall -evalsha", ["send", "acl.add", "--args", "[1, 2]"], "refused the command"),
        ("-smembers", ["status"], "refused the command"),
    ],
)
def test_a_missing_permission_is_one_clear_error_line(
    own_server: OwnServer, namespace: str, rule: str, command: list[str], words: str
) -> None:
    url = add_user(own_server, [*acl_rules(namespace), *rule.split()])
    proc = ops(*command, url=url, namespace=namespace)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and words in last and "NOPERM" in last, proc.stderr
    assert "Traceback" not in proc.stderr and PASSWORD not in proc.stderr + proc.stdout


async def refused_worker_runs(
    own_server: OwnServer, namespace: str, spawn_worker: Any, rule: str
) -> list[str]:
    """A worker whose ACL user lacks `rule` (and the command it names) runs three tasks a
    second apart, past a few retries of what is refused, and stops cleanly on SIGTERM,
    without a traceback or the password: the lines it logged."""
    url = add_user(own_server, [*acl_rules(namespace), rule])
    admin_url = f"redis://:{ADMIN_PASSWORD}@127.0.0.1:{own_server.port}"
    app = App(redis_url=admin_url, namespace=namespace)
    w = spawn_worker(module="acl", url=url)
    try:
        await wait_consuming(app, w)
        t = stand_ins(app)
        for i in range(3):
            assert await (await t["add"].send(i, 1)).result(timeout=10) == i + 1
            await asyncio.sleep(1)
        assert w.proc.poll() is None, w.output()
        assert any(rule[1:] in d for d in denied(own_server)), denied(own_server)
        w.signal(signal.SIGTERM)
        assert await asyncio.to_thread(w.wait, 20) == 0
    finally:
        await app.close()
    out = w.output()
    assert "Traceback" not in out and PASSWORD not in out, out
    return out.splitlines()


async def test_a_worker_refused_its_control_channel_runs_tasks_and_says_so_once(
    own_server: OwnServer, namespace: str, spawn_worker: Any
) -> None:
    """An ACL without SUBSCRIBE: the worker cannot hear `revoke` and `pause` broadcasts.
    It says so in one line, keeps running tasks and retrying, and stops cleanly; it used
    to end with a traceback."""
    lines = await refused_worker_runs(own_server, namespace, spawn_worker, "-subscribe")
    said = [line for line in lines if "refused a subscription" in line]
    assert len(said) == 1, lines
    assert "ERROR" in said[0] and "NOPERM" in said[0] and "revoke" in said[0], lines


async def test_a_worker_refused_the_paused_queues_keeps_running_tasks(
    own_server: OwnServer, namespace: str, spawn_worker: Any
) -> None:
    """An ACL without SMEMBERS: the worker's once-a-second read of the paused queues is
    refused. It keeps running tasks (that read used to end the worker with a traceback)
    and says so once, at ERROR, naming what it cannot do (not a line a second)."""
    lines = await refused_worker_runs(own_server, namespace, spawn_worker, "-smembers")
    said = [line for line in lines if "read of the paused queues" in line]
    assert len(said) == 1, lines
    assert "ERROR" in said[0] and "NOPERM" in said[0] and "served" in said[0], lines


async def test_a_worker_says_when_it_reads_the_paused_queues_again(
    own_server: OwnServer, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Told at ERROR that paused queues are served, an operator is told when pauses hold
    again: the permission given back, the next read says so, once."""
    caplog.set_level(logging.INFO, logger="aiotasks")
    url = add_user(own_server, [*acl_rules(namespace), "-smembers"])
    app = App(redis_url=url, namespace=namespace)
    w = app.worker()
    run = asyncio.create_task(w.run())
    try:

        def said(words: str) -> list[str]:
            return [r.getMessage() for r in caplog.records if words in r.getMessage()]

        deadline = time.monotonic() + 10
        while not said("read of the paused queues"):
            assert time.monotonic() < deadline, "the refusal was never said"
            await asyncio.sleep(0.1)
        with admin(own_server) as r:
            r.execute_command("ACL", "SETUSER", "app", "+smembers")
        while not said("reads the paused queues again"):
            assert time.monotonic() < deadline + 10, "the all-clear was never said"
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)  # past another read
        assert len(said("reads the paused queues again")) == 1
    finally:
        w.stop()
        await run
        await app.close()


async def test_an_idle_fetch_falls_back_to_evalsha_when_fcall_is_taken_away(
    own_server: OwnServer, namespace: str
) -> None:
    """A process that ran the library by FCALL, then lost the right (an ACL edit, or a
    failover to Redis 6.2): its next idle fetch, the pipelined wait, runs by EVALSHA
    instead of failing, and so does every call after it."""
    url = add_user(own_server, acl_rules(namespace))
    with admin(own_server) as r:
        r.function_load(LIBRARIES[False].source, replace=True)
    app = App(redis_url=url, namespace=namespace)
    try:
        streams = app.client.keys.streams("default")
        await app.client.ensure_groups(streams)
        fetch = functools.partial(
            app.client.scripts.fetch,
            streams=streams,
            consumer="c1",
            count=10,
            worker="w1",
            promote_limit=100,
            default_ttl=60,
        )
        idle = await fetch(now_ms=int(time.time() * 1000))
        assert app.client.scripts.functions is True and idle[b"entries"] == []
        with admin(own_server) as r:
            r.execute_command("ACL", "SETUSER", "app", "-fcall")
        woken = await fetch(now_ms=int(time.time() * 1000), wait=(50, idle[b"tips"]))
        assert woken[b"entries"] == [] and app.client.scripts.functions is False
        sent = await app.send_task("acl.add", args=(1, 2))
        assert await sent.state() == TaskState.PENDING
    finally:
        await app.close()
    assert denied(own_server) == ["command fcall"]


# -- TLS ----------------------------------------------------------------------------------


def tls_supported() -> str | None:
    """Why TLS cannot be tested here, or None."""
    if shutil.which("openssl") is None:
        return "no openssl binary to make a throwaway CA"
    try:
        binary = server_binary()
    except RuntimeError as exc:
        return str(exc)
    probe = subprocess.run(
        [binary, "--port", "0", "--tls-port", "1", "--tls-cert-file", "/nonexistent"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    if "not supported" in probe.stdout + probe.stderr or "Bad directive" in probe.stdout:
        return f"{binary} was built without TLS"
    return None


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(d: Path) -> None:
    """A throwaway CA, a server certificate for 127.0.0.1, and a client certificate."""
    key = ["-newkey", "rsa:2048", "-nodes"]
    # Python 3.13 verifies strictly (VERIFY_X509_STRICT): a CA needs basicConstraints and
    # keyUsage, a leaf its authorityKeyIdentifier.
    openssl("req", "-x509", *key, "-days", "1", "-keyout", "ca.key", "-out", "ca.crt",
            "-subj", "/CN=aiotasks-test-ca",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)  # fmt: skip
    (d / "san.cnf").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "authorityKeyIdentifier=keyid,issuer\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
    )
    for name in ("server", "client"):
        openssl("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}", cwd=d)  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "1", "-out", f"{name}.crt",
                "-extfile", "san.cnf", cwd=d)  # fmt: skip


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[OwnServer, int, Path]]:
    reason = tls_supported()
    if reason:
        pytest.skip(f"TLS not tested: {reason}")
    make_pki(tmp_path)
    with socket.socket() as s:  # a free port, closed again before the server binds it
        s.bind(("127.0.0.1", 0))
        tls_port = int(s.getsockname()[1])
    config = {
        "tls-port": str(tls_port),
        "tls-cert-file": str(tmp_path / "server.crt"),
        "tls-key-file": str(tmp_path / "server.key"),
        "tls-ca-cert-file": str(tmp_path / "ca.crt"),
        "tls-auth-clients": "yes",  # a client certificate is required
    }
    with OwnServer(config=config) as server:  # the plain port stays, for setup only
        yield server, tls_port, tmp_path


async def test_tls_with_a_client_certificate(
    tls_server: tuple[OwnServer, int, Path], namespace: str, spawn_worker: Any
) -> None:
    server, port, pki = tls_server
    url = (
        f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={pki / 'ca.crt'}"
        f"&ssl_certfile={pki / 'client.crt'}&ssl_keyfile={pki / 'client.key'}"
    )
    app = App(redis_url=url, namespace=namespace)
    t = stand_ins(app)
    w = spawn_worker(module="acl", url=url)
    try:
        await wait_consuming(app, w)
        assert await (await t["add"].send(20, 22)).result(timeout=10) == 42
        body = await chord([t["add"].s(1, 1), t["add"].s(2, 2)], t["tsum"].s()).send()
        assert await body.result(timeout=10) == 6
        status = await asyncio.to_thread(ops, "status", url=url, namespace=namespace)
        assert status.returncode == 0, status.stderr
    finally:
        await app.close()
    with redis.Redis.from_url(server.url) as r:
        clients = r.client_list()  # (no ACL user here: the default user is open)
    assert "Traceback" not in w.output()
    assert any(c["laddr"].endswith(f":{port}") for c in clients), clients  # they used TLS


def test_tls_without_a_client_certificate_is_one_clear_error_line(
    tls_server: tuple[OwnServer, int, Path], namespace: str
) -> None:
    _, port, pki = tls_server
    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={pki / 'ca.crt'}"
    proc = ops("status", url=url, namespace=namespace)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr


def test_the_wrong_scheme_for_a_server_says_which_one_it_may_need(
    tls_server: tuple[OwnServer, int, Path], namespace: str
) -> None:
    """redis:// to a server that speaks only TLS (it resets the connection), and rediss://
    to one without TLS (it never answers the handshake): one line, naming the other
    scheme. The CLI said "no answer in 5 s" for the second, and nothing for the first."""
    server, port, pki = tls_server
    plain = ops("status", url=f"redis://127.0.0.1:{port}/0", namespace=namespace)
    assert plain.returncode == 1
    assert plain.stderr.count("\n") == 1 and "rediss://?" in plain.stderr, plain.stderr
    tls = f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={pki / 'ca.crt'}"
    wrong = ops("status", url=tls, namespace=namespace)
    assert wrong.returncode == 1
    assert wrong.stderr.count("\n") == 1 and "is it redis://?" in wrong.stderr, wrong.stderr


def test_a_worker_given_the_wrong_ca_fails_at_once(
    tls_server: tuple[OwnServer, int, Path], namespace: str, spawn_worker: Any
) -> None:
    """A certificate the URL's CA does not vouch for is refused at every try: the worker
    says so in one line and exits, as for a wrong password, instead of retrying it for
    --connect-timeout."""
    _, port, pki = tls_server
    other = pki / "other"
    other.mkdir()
    make_pki(other)
    url = (
        f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={other / 'ca.crt'}"
        f"&ssl_certfile={pki / 'client.crt'}&ssl_keyfile={pki / 'client.key'}"
    )
    w = spawn_worker("--connect-timeout", "60", module="acl", url=url)
    assert w.wait(20) == 1, w.output()  # within 20 s of a 60 s --connect-timeout
    errors = [line for line in w.output().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "CERTIFICATE_VERIFY_FAILED" in errors[0], w.output()
    assert "Traceback" not in w.output() and "retrying" not in w.output(), w.output()
