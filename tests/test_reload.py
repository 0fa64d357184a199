"""`aiotasks run --reload` as a real process: an edit restarts the worker gracefully, and
the new worker runs the new code; a broken edit waits for the next one."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from aiotasks import App
from aiotasks.cli import cli

ROOT = Path(__file__).resolve().parent.parent
BANNER = "aiotasks worker "
APP = """\
import os
from aiotasks import App

app = App(namespace=os.environ["AIOTASKS_TEST_NAMESPACE"])


@app.task(name="reload.version")
async def version() -> str:
    return "{version}"
"""


def write_app(directory: Path, version: str) -> None:
    (directory / "reloadapp.py").write_text(APP.format(version=version))


class Reloading:
    """`python -m aiotasks run reloadapp:app --reload` in a temporary directory."""

    def __init__(self, directory: Path, redis_url: str, namespace: str) -> None:
        self.log = directory / "reloader.log"
        env = {
            **os.environ,
            "AIOTASKS_REDIS_URL": redis_url,
            "AIOTASKS_TEST_NAMESPACE": namespace,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "PYTHONUNBUFFERED": "1",
        }
        argv = ["run", "reloadapp:app", "--reload", "--shutdown-timeout", "5"]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aiotasks", *argv, "--log-level", "info"],
            cwd=directory,
            env=env,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def wait_for(self, text: str, count: int = 1, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while self.output().count(text) < count:
            assert self.proc.poll() is None, f"the reloader exited:\n{self.output()}"
            assert time.monotonic() < deadline, f"{text!r} x{count} not seen:\n{self.output()}"
            await asyncio.sleep(0.05)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


async def version_now(app: App) -> str:
    h = await app.send_task("reload.version")
    result: str = await h.result(timeout=15)
    return result


async def test_an_edit_restarts_the_worker_with_the_new_code(
    tmp_path: Path, redis_url: str, namespace: str
) -> None:
    write_app(tmp_path, "v1")
    reloading = Reloading(tmp_path, redis_url, namespace)
    app = App(redis_url=redis_url, namespace=namespace)
    try:
        await reloading.wait_for(BANNER)
        assert await version_now(app) == "v1"

        write_app(tmp_path, "v2")
        await reloading.wait_for("reloadapp.py changed: restarting the worker")
        await reloading.wait_for(BANNER, count=2)
        out = reloading.output()
        assert "SIGTERM: stopping" in out  # the old worker was stopped gracefully
        assert await version_now(app) == "v2"

        (tmp_path / "reloadapp.py").write_text("this is not python\n")
        await reloading.wait_for("waiting for a change to start it again")
        write_app(tmp_path, "v3")
        await reloading.wait_for(BANNER, count=3)
        assert await version_now(app) == "v3"

        os.kill(reloading.proc.pid, signal.SIGTERM)
        assert await asyncio.to_thread(reloading.proc.wait, 20) == 0
        # The last worker stopped gracefully too: it left the worker registry.
        assert await app.client.redis.zcard(app.client.keys.workers) == 0
    finally:
        reloading.close()
        await app.close()


def test_reload_without_watchfiles_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "watchfiles", None)  # import watchfiles -> ImportError
    result = CliRunner().invoke(cli, ["run", "tests.apps.ops:app", "--reload"])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "error: --reload needs watchfiles: pip install 'aiotasks-streams[reload]'"
    )
