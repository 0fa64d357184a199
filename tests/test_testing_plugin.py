"""aiotasks.testing, the pytest plugin: a user's test of their own tasks is three lines.

The first tests use the plugin's `aiotasks_worker` fixture here, on a module-level App as a
user would write it. The last runs a user's test file in a separate pytest process, where
the plugin arrives through its entry point alone, and checks it cleaned up after itself.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import redis

from aiotasks import App, TaskFailed
from aiotasks.testing.server import LOCAL_URL, ping

# What a user's project holds: an App at module level, with its tasks.
tasks = App(namespace="myproject")


@tasks.task
async def add(x: int, y: int) -> int:
    return x + y


@tasks.task
async def fail() -> None:
    raise ValueError("nope")


@pytest.fixture
def aiotasks_redis_url(redis_url: str) -> str:
    """The suite's server, also when it came from $AIOTASKS_TEST_REDIS_URL."""
    return redis_url


async def test_add(aiotasks_worker: Any) -> None:
    await aiotasks_worker(tasks)
    assert await (await add.send(2, 3)).result(timeout=5) == 5


async def test_binds_a_throwaway_namespace_and_real_protocol(aiotasks_worker: Any) -> None:
    worker = await aiotasks_worker(tasks, concurrency=2)
    assert tasks.settings.namespace.startswith("test-")  # never the user's "myproject"
    assert worker.concurrency == 2
    with pytest.raises(TaskFailed) as err:
        await (await fail.send()).result(timeout=5)
    assert err.value.exc_type == "ValueError"
    results = await asyncio.gather(*[(await add.send(i, i)).result(timeout=5) for i in range(10)])
    assert results == [2 * i for i in range(10)]


def test_the_app_is_restored_after_each_test() -> None:
    assert tasks.settings.namespace == "myproject"


USER_TEST = """
import os
from aiotasks import App

tasks = App(namespace="userproject")

@tasks.task
async def mul(x: int, y: int) -> int:
    return x * y

async def test_mul(aiotasks_worker):
    await aiotasks_worker(tasks)
    assert await (await mul.send(6, 7)).result(timeout=5) == 42
    with open(os.environ["NAMESPACE_FILE"], "w") as f:
        f.write(tasks.settings.namespace)

def test_restored():
    assert tasks.settings.namespace == "userproject"
"""


def test_a_users_test_file_in_its_own_pytest(redis_url: str, tmp_path: Path) -> None:
    (tmp_path / "test_user.py").write_text(textwrap.dedent(USER_TEST))
    (tmp_path / "pytest.ini").write_text("[pytest]\nasyncio_mode = auto\n")
    ns_file = tmp_path / "namespace.txt"
    env = {**os.environ, "AIOTASKS_REDIS_URL": redis_url, "NAMESPACE_FILE": str(ns_file)}
    env.pop("AIOTASKS_TEST_REDIS_URL", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_user.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 passed" in proc.stdout
    namespace = ns_file.read_text()
    assert namespace.startswith("test-")
    with redis.Redis.from_url(redis_url) as r:
        assert list(r.scan_iter(match="{" + namespace + "}*")) == []  # deleted afterwards


URL_PROBE = """
import os

def test_url(aiotasks_redis_url):
    with open(os.environ["URL_FILE"], "w") as f:
        f.write(aiotasks_redis_url)
"""


def test_without_a_url_the_plugin_finds_the_server_as_make_test_does(tmp_path: Path) -> None:
    (tmp_path / "test_probe.py").write_text(URL_PROBE)
    url_file = tmp_path / "url.txt"
    env = {k: v for k, v in os.environ.items() if not k.endswith("REDIS_URL")}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_probe.py"],
        cwd=tmp_path,
        env={**env, "URL_FILE": str(url_file)},
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if ping(LOCAL_URL):
        assert url_file.read_text() == LOCAL_URL  # a local Redis answers: no embedded server
    else:
        assert url_file.read_text().startswith("redis://127.0.0.1:")  # an embedded one
        assert url_file.read_text() != LOCAL_URL
