"""A password in the Redis URL is never printed: not by a running worker that loses its
server, finds its data lost or is refused, not in any error `send` or `ping` raises, not
by `status`, and not in the settings' repr. Both URL forms: userinfo and `?password=`.

The server (its own) reads the user "app" from an ACL file, so the user survives restarts
that lose the data.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from aiotasks import AiotasksError, App, BrokerConnectionError, BrokerRefusedError
from aiotasks.testing.server import OwnServer
from tests.conftest import ROOT
from tests.helpers import wait_consuming

SECRET = "pw-9f3b7c1e"
ADD = "tests.apps.basic.add"
FORMS = {
    "userinfo": "redis://app:{pw}@127.0.0.1:{port}/0",
    "query": "redis://127.0.0.1:{port}/0?username=app&password={pw}",
}


@pytest.fixture
def locked_server(tmp_path: Path) -> Iterator[OwnServer]:
    acl = tmp_path / "users.acl"
    acl.write_text(f"user default on nopass ~* &* +@all\nuser app on >{SECRET} ~* &* +@all\n")
    with OwnServer(config={"aclfile": str(acl)}) as server:
        yield server


def url_of(server: OwnServer, form: str) -> str:
    return FORMS[form].format(pw=SECRET, port=server.port)


def admin(server: OwnServer) -> redis.Redis:
    return redis.Redis.from_url(server.url)


def cli(*args: str, url: str) -> str:
    env = {**os.environ, "AIOTASKS_REDIS_URL": url}
    proc = subprocess.run(
        [sys.executable, "-m", "aiotasks", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    return proc.stdout + proc.stderr


async def error_of(call: Any) -> AiotasksError:
    with pytest.raises(AiotasksError) as err:
        await call()
    return err.value


@pytest.mark.parametrize("form", list(FORMS))
async def test_a_running_worker_never_prints_the_password(
    locked_server: OwnServer, namespace: str, spawn_worker: Any, form: str
) -> None:
    url = url_of(locked_server, form)
    app = App(redis_url=url, namespace=namespace, retry_policy={"max_retries": 0})

    @app.task(name=ADD)
    async def add(x: int, y: int) -> int:
        return x + y

    w = spawn_worker(url=url)
    try:
        await wait_consuming(app, w)
        assert await (await add.send(1, 2)).result(timeout=10) == 3
        # Data lost: the worker reports it, naming the server.
        await asyncio.to_thread(locked_server.restart)
        await asyncio.to_thread(w.wait_for_output, "LOST DATA", 15)
        # Gone for a while: the worker logs that it lost Redis; send and ping raise.
        await asyncio.to_thread(locked_server.stop)
        await asyncio.to_thread(w.wait_for_output, "lost Redis at", 15)
        errors = [await error_of(lambda: add.send(1, 1)), await error_of(app.connect)]
        assert all(isinstance(e, BrokerConnectionError) for e in errors)
        await asyncio.to_thread(locked_server.start)
        # Out of memory: send is refused.
        with admin(locked_server) as r:
            r.config_set("maxmemory", 1)
        errors.append(await error_of(lambda: add.send(1, 1)))
        assert isinstance(errors[-1], BrokerRefusedError)
        with admin(locked_server) as r:
            r.config_set("maxmemory", 0)
        status = await asyncio.to_thread(cli, "status", "--namespace", namespace, url=url)
    finally:
        await app.close()
    printed = [w.output(), status, repr(app.settings), app.client.url, *map(str, errors)]
    for text in printed:
        assert SECRET not in text, text
    assert "***" in w.output() and "***" in repr(app.settings) and "***" in app.client.url
    assert all("***" in str(e) for e in errors), errors
    assert "aiotasks worker" in w.output()  # it did start: the banner was checked too


@pytest.mark.parametrize("form", list(FORMS))
def test_the_ops_commands_never_print_the_password(locked_server: OwnServer, form: str) -> None:
    url = url_of(locked_server, form)
    locked_server.stop()
    down = cli("status", url=url)
    assert "error: cannot reach Redis at" in down
    # The URL, hidden, then the reason after its colon (a hidden query password took the
    # colon along).
    assert re.search(r"cannot reach Redis at \S+\*\*\*\S*: ", down), down
    wrong = url.replace(SECRET, "not-the-" + SECRET[::-1])
    locked_server.start()
    refused = cli("status", url=wrong)
    assert "refused the credentials" in refused
    for text in (down, refused):
        assert SECRET not in text and SECRET[::-1] not in text, text
