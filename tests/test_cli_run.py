"""`aiotasks run` as a real process: clear startup errors, banner, logging, burst, --redis-url."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aiotasks import App, TaskFailed

ROOT = Path(__file__).resolve().parent.parent
UNREACHABLE = "redis://127.0.0.1:1/0"
ADD = "tests.apps.basic.add"
BOOM = "tests.apps.basic.boom"

SpawnWorker = Callable[..., Any]


def run_cli(
    *args: str, redis_url: str, namespace: str, timeout: float = 20
) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run `python -m aiotasks ...` to completion; the result and its wall time."""
    env = {
        **os.environ,
        "AIOTASKS_REDIS_URL": redis_url,
        "AIOTASKS_TEST_NAMESPACE": namespace,
        "PYTHONUNBUFFERED": "1",
    }
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "aiotasks", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return proc, time.monotonic() - started


def assert_one_clear_error(proc: subprocess.CompletedProcess[str], *expected: str) -> str:
    """Non-zero exit, exactly one `error:` line naming `expected`, and no traceback."""
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    for text in expected:
        assert text in errors[0], output
    return errors[0]


# -- startup errors ---------------------------------------------------------------------


def test_wrong_module_path(redis_url: str, namespace: str) -> None:
    proc, _ = run_cli(
        "run", "tests.apps.no_such_module:app", redis_url=redis_url, namespace=namespace
    )
    assert_one_clear_error(proc, "tests.apps.no_such_module")


def test_wrong_attribute(redis_url: str, namespace: str) -> None:
    proc, _ = run_cli(
        "run", "tests.apps.basic:no_such_app", redis_url=redis_url, namespace=namespace
    )
    assert_one_clear_error(proc, "no_such_app")


def test_object_that_is_not_an_app(redis_url: str, namespace: str) -> None:
    proc, _ = run_cli("run", "tests.apps.basic:add", redis_url=redis_url, namespace=namespace)
    assert_one_clear_error(proc, "tests.apps.basic:add", "App")


def test_spec_without_attribute(redis_url: str, namespace: str) -> None:
    proc, _ = run_cli("run", "tests.apps.basic", redis_url=redis_url, namespace=namespace)
    assert_one_clear_error(proc)


def test_unreachable_redis_fails_fast_with_one_line_per_attempt(namespace: str) -> None:
    proc, elapsed = run_cli(
        "run",
        "tests.apps.basic:app",
        "--redis-url",
        UNREACHABLE,
        "--connect-timeout",
        "2",
        redis_url=UNREACHABLE,
        namespace=namespace,
    )
    output = proc.stdout + proc.stderr
    assert_one_clear_error(proc, "127.0.0.1:1")
    assert elapsed < 5.5, f"took {elapsed:.1f} s"
    attempts = [line for line in output.splitlines() if re.search(r"\battempt \d+\b", line)]
    assert len(attempts) >= 2, output
    numbers = [int(re.search(r"\battempt (\d+)\b", line).group(1)) for line in attempts]  # type: ignore[union-attr]
    assert numbers == list(range(1, len(numbers) + 1)), output
    assert all("127.0.0.1:1" in line for line in attempts), output


def test_password_never_appears_in_output(namespace: str) -> None:
    url = "redis://:s3cr3tpass@127.0.0.1:1/0"
    proc, _ = run_cli(
        "run",
        "tests.apps.basic:app",
        "--redis-url",
        url,
        "--connect-timeout",
        "1",
        redis_url=url,
        namespace=namespace,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "127.0.0.1:1" in output
    assert "s3cr3tpass" not in output, output


def test_password_with_user_never_appears_in_output(namespace: str) -> None:
    url = "redis://alice:s3cr3tpass@127.0.0.1:1/0"
    proc, _ = run_cli(
        "run",
        "tests.apps.basic:app",
        "--connect-timeout",
        "1",
        redis_url=url,
        namespace=namespace,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "s3cr3tpass" not in output, output


# -- banner and logs --------------------------------------------------------------------


def test_banner_lists_app_queues_concurrency_url_and_tasks(
    spawn_worker: SpawnWorker, redis_url: str
) -> None:
    w = spawn_worker("--queues", "high,default", "--concurrency", "7")
    w.wait_for_output("tests.apps.basic.blocking_sleep")
    output = w.output()
    assert "tests.apps.basic:app" in output
    assert re.search(r"queues:\s+high, ?default", output), output
    assert re.search(r"concurrency:\s+7\b", output), output
    assert redis_url in output
    for name in ("add", "sleep", "count_runs", "blocking_sleep", "suicide", "boom"):
        assert f"tests.apps.basic.{name}" in output
    assert "Traceback" not in output


async def test_info_level_logs_each_finished_task(spawn_worker: SpawnWorker, app: App) -> None:
    w = spawn_worker()  # the fixture passes --log-level info
    h = await app.send_task(ADD, args=(2, 3))
    assert await h.result(timeout=15) == 5
    w.wait_for_output(h.id)
    line = next(line for line in w.output().splitlines() if h.id in line)
    assert ADD in line
    assert "SUCCESS" in line
    assert re.search(r"\d+(\.\d+)?\s*(ms|s)\b", line), line
    assert "INFO" in line


async def test_a_worker_process_tunes_the_collector(spawn_worker: SpawnWorker, app: App) -> None:
    """`aiotasks run` freezes what it loaded and collects young objects less often (see
    GC_THRESHOLD); the process's own defaults are not what it runs with."""
    import gc

    from aiotasks.cli.run import GC_THRESHOLD

    spawn_worker()
    h = await app.send_task("tests.apps.basic.gc_settings")
    *threshold, frozen = await h.result(timeout=15)
    assert tuple(threshold) == GC_THRESHOLD
    assert gc.get_threshold() != GC_THRESHOLD  # what the worker would run with untuned
    assert frozen > 1000  # the interpreter, aiotasks and the app's modules


async def test_failing_task_logs_error_with_traceback_at_default_level(
    spawn_worker: SpawnWorker, app: App
) -> None:
    w = spawn_worker("--log-level", "warning")
    ok = await app.send_task(ADD, args=(1, 1))
    bad = await app.send_task(BOOM)
    assert await ok.result(timeout=15) == 2
    with pytest.raises(TaskFailed):
        await bad.result(timeout=15)
    w.wait_for_output('raise ValueError("boom")')
    output = w.output()
    lines = output.splitlines()
    first = next(i for i, line in enumerate(lines) if bad.id in line)
    assert "ERROR" in lines[first]
    assert BOOM in lines[first]
    assert "FAILURE" in lines[first]
    assert "Traceback" in "\n".join(lines[first:])
    # The default level is quiet about successes.
    assert ok.id not in output


# -- burst and --redis-url --------------------------------------------------------------


async def test_burst_exits_zero_after_draining(spawn_worker: SpawnWorker, app: App) -> None:
    handles = [await app.send_task(ADD, args=(i, i)) for i in range(5)]
    w = spawn_worker("--burst")
    assert w.wait(20) == 0, w.output()
    assert [await h.result(timeout=1) for h in handles] == [2 * i for i in range(5)]
    assert "Traceback" not in w.output()


async def test_redis_url_option_wins_over_the_apps_own(
    spawn_worker: SpawnWorker, app: App, redis_url: str
) -> None:
    # The App in the child reads AIOTASKS_REDIS_URL (unreachable); --redis-url must win.
    w = spawn_worker("--redis-url", redis_url, url=UNREACHABLE)
    h = await app.send_task(ADD, args=(20, 22))
    assert await h.result(timeout=15) == 42
    output = w.output()
    assert redis_url in output
    assert "127.0.0.1:1/" not in output
