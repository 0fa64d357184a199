"""The dashboard in a real headless Chromium (Debian's `chromium`, driven by Playwright).

A worker process runs tests/apps/dash.py; the dashboard is mounted in a FastAPI app
under /ops/tasks and served by uvicorn. Each page is saved as a screenshot at 1280x800
and 390 px wide under tests/artifacts/ (git-ignored), to be looked at.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from aiotasks import App, TaskFailed, TaskHandle, TaskState
from tests.helpers import runs_key, wait_consuming, wait_state
from tests.webserver import serve

CHROMIUM = os.environ.get("AIOTASKS_TEST_CHROMIUM") or shutil.which("chromium") or ""
pytestmark = [
    pytest.mark.skipif(
        not CHROMIUM, reason="no Chromium: install Debian's chromium package to run browser tests"
    ),
    pytest.mark.slow,  # real browser, real worker process: not in `make test-embedded`
]
playwright_api = pytest.importorskip(
    "playwright.async_api", reason="no Playwright for Python (the dev extra installs it)"
)

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
PREFIX = "/ops/tasks"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WIDE = {"width": 1280, "height": 800}
NARROW = {"width": 390, "height": 844}
Page = Any


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Any]:
    """A Chromium with a fresh profile."""
    async with playwright_api.async_playwright() as pw:
        context = await pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=ARGS,
            viewport=WIDE,
        )
        try:
            yield context
        finally:
            await context.close()


async def open_page(browser: Any, url: str) -> Page:
    """A page at `url` that fails the test on any script error."""
    page = await browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.script_errors = errors
    await page.goto(url)
    return page


async def shoot(page: Page, name: str) -> None:
    """Save the page at 1280x800 and at 390 px wide (full height), then restore."""
    ARTIFACTS.mkdir(exist_ok=True)
    await page.set_viewport_size(WIDE)
    await page.screenshot(path=str(ARTIFACTS / f"{name}-1280.png"))
    await page.set_viewport_size(NARROW)
    await page.screenshot(path=str(ARTIFACTS / f"{name}-390.png"), full_page=True)
    await page.set_viewport_size(WIDE)
    assert page.script_errors == []


@pytest.fixture
async def site(app: App, spawn_worker: Callable[..., Any]) -> AsyncIterator[Callable[..., Any]]:
    """Factory: the dashboard (read_only or not) on a real server; a worker process runs."""
    from fastapi import FastAPI

    await wait_consuming(app, spawn_worker(module="dash"))
    stack: list[Any] = []

    async def start(read_only: bool = False) -> str:
        api = FastAPI()
        api.mount(PREFIX, app.dashboard(read_only=read_only))
        server = serve(api)
        base = await server.__aenter__()
        stack.append(server)
        return base + PREFIX + "/"

    yield start
    for server in reversed(stack):
        await server.__aexit__(None, None, None)


async def confirm(page: Page, button: str) -> None:
    """Click an action's button and confirm it in the page's dialog."""
    await page.click(f"button[data-action={button}]")
    dialog = page.locator("dialog#confirm")
    await dialog.wait_for(state="visible")
    await page.click("dialog#confirm [data-confirm-ok]")


async def test_the_overview_shows_a_task_sent_after_the_page_loaded(
    app: App, site: Callable[..., Any], browser: Any
) -> None:
    url = await site()
    await (await app.send_task("dash.add", (1, 1))).result(timeout=10)
    page = await open_page(browser, url)
    await page.evaluate("window.notReloaded = true")
    h = await app.send_task("dash.add", (20, 22))
    sent = time.monotonic()
    row = page.locator(f'table[data-live-tasks] tr[data-id="{h.id}"]')
    await row.wait_for(timeout=2000)
    shown = time.monotonic() - sent
    assert shown < 2.0
    assert await page.evaluate("window.notReloaded") is True
    await row.locator("[data-state]", has_text="SUCCESS").wait_for(timeout=5000)
    assert await row.locator("[data-name]").inner_text() == "dash.add"
    await page.locator(".live.on").wait_for(timeout=5000)
    # The cards follow too: a worker, and the tasks done in the last minute.
    await (
        page.locator(".card", has_text="done / min")
        .locator(".num", has_text="2")
        .wait_for(timeout=5000)
    )
    await shoot(page, "overview")


async def test_search_finds_a_task_by_id_and_by_name(
    app: App, site: Callable[..., Any], browser: Any
) -> None:
    url = await site()
    adds = [await app.send_task("dash.add", (i, i)) for i in range(3)]
    booms = [await app.send_task("dash.boom", (f"r{i}",)) for i in range(2)]
    for h in adds:
        await h.result(timeout=10)
    for h in booms:
        with pytest.raises(TaskFailed):
            await h.result(timeout=10)
    page = await open_page(browser, url + "tasks")
    assert await page.locator("table[data-live-tasks] tbody tr").count() == 5

    await page.fill("input[name=q]", adds[1].id)
    await page.press("input[name=q]", "Enter")
    await page.wait_for_url(f"**/tasks?q={adds[1].id}*")
    rows = page.locator("table[data-live-tasks] tbody tr")
    assert await rows.count() == 1
    assert await rows.first.get_attribute("data-id") == adds[1].id

    await page.fill("input[name=q]", "boom")
    await page.press("input[name=q]", "Enter")
    await page.wait_for_url("**/tasks?q=boom*")
    ids = {await r.get_attribute("data-id") for r in await rows.all()}
    assert ids == {h.id for h in booms}
    await shoot(page, "tasks-search")

    # Any case, and live: a task sent now whose name matches joins the list.
    await page.fill("input[name=q]", "BOOM")
    await page.press("input[name=q]", "Enter")
    await page.wait_for_url("**/tasks?q=BOOM*")
    ids = {await r.get_attribute("data-id") for r in await rows.all()}
    assert ids == {h.id for h in booms}
    late = await app.send_task("dash.boom", ("late",))
    await page.locator(f'tr[data-id="{late.id}"]').wait_for(timeout=5000)
    with pytest.raises(TaskFailed):
        await late.result(timeout=10)
    booms.append(late)

    # The start of an id, as copied from a log line cut short.
    await page.fill("input[name=q]", adds[1].id[:10])
    await page.press("input[name=q]", "Enter")
    await page.wait_for_url(f"**/tasks?q={adds[1].id[:10]}*")
    ids = {await r.get_attribute("data-id") for r in await rows.all()}
    assert ids == {adds[1].id}

    await page.fill("input[name=q]", "dash.*")
    await page.select_option("select[name=state]", "SUCCESS")
    await page.click("form.search button[type=submit]")
    await page.wait_for_url("**state=SUCCESS*")
    ids = {await r.get_attribute("data-id") for r in await rows.all()}
    assert ids == {h.id for h in adds}
    # A task sent now that matches the search joins the list, live.
    h = await app.send_task("dash.add", (9, 9))
    await page.locator(f'tr[data-id="{h.id}"] [data-state]', has_text="SUCCESS").wait_for(
        timeout=5000
    )
    booming = await app.send_task("dash.boom", ("late",))
    with pytest.raises(TaskFailed):
        await booming.result(timeout=10)
    await asyncio.sleep(0.5)
    assert await page.locator(f'tr[data-id="{booming.id}"]').count() == 0  # not SUCCESS
    assert page.script_errors == []


async def test_a_failed_tasks_page_shows_its_traceback(
    app: App, site: Callable[..., Any], browser: Any
) -> None:
    url = await site()
    h = await app.send_task("dash.boom", ("disk full",))
    with pytest.raises(TaskFailed):
        await h.result(timeout=10)
    page = await open_page(browser, url)
    await page.click(f'tr[data-id="{h.id}"] a')
    await page.wait_for_url(f"**/tasks/{h.id}")
    assert await page.inner_text("[data-task-state]") == "FAILURE"
    assert "ValueError: boom: disk full" in await page.inner_text(".exc")
    traceback = await page.inner_text("pre[data-traceback]")
    assert traceback.startswith("Traceback (most recent call last):")
    assert "dash.py" in traceback and 'raise ValueError(f"boom: {reason}")' in traceback
    assert '"disk full"' in await page.inner_text(".args")  # the arguments it failed with
    timeline = await page.inner_text("ol.timeline")
    assert timeline.index("PENDING") < timeline.index("STARTED") < timeline.index("FAILURE")
    await shoot(page, "task-failure")


async def test_revoke_terminate_and_retry_work_end_to_end(
    app: App, site: Callable[..., Any], browser: Any
) -> None:
    url = await site()
    # Revoke a task waiting for its countdown: it never runs.
    later = await app.send_task("dash.add", (1, 2), countdown=60)
    page = await open_page(browser, f"{url}tasks/{later.id}")
    assert await page.inner_text("[data-task-state]") == "SCHEDULED"
    await confirm(page, "revoke")
    await page.locator("[data-task-state]", has_text="REVOKED").wait_for(timeout=5000)
    assert "Revoked task" in await page.inner_text("#toast")
    assert await later.state() == TaskState.REVOKED

    # Terminate a running task on the worker process.
    slow = await app.send_task("dash.slow", (30,))
    await wait_state(slow, TaskState.STARTED)
    await page.goto(f"{url}tasks/{slow.id}")
    # Its progress, live: the page shows each update the task stores.
    await page.locator(".progress-box", has_text="1 of 30").wait_for(timeout=5000)
    await shoot(page, "task-running")
    await page.click("button[data-action=terminate]")
    await page.locator("dialog#confirm").wait_for(state="visible")
    await shoot(page, "confirm-dialog")
    await page.click("dialog#confirm [data-confirm-ok]")
    await page.locator("[data-task-state]", has_text="REVOKED").wait_for(timeout=5000)
    assert await slow.state() == TaskState.REVOKED

    # Retry a failed task: it runs again on the worker and succeeds, live on the page.
    key = runs_key(app, "allowed")
    picky = await app.send_task("dash.picky", (key,))
    with pytest.raises(TaskFailed, match="not allowed yet"):
        await picky.result(timeout=10)
    await page.goto(f"{url}tasks/{picky.id}")
    assert await page.locator("button[data-action=revoke]").count() == 0  # it has ended
    await app.client.redis.set(key, 1)
    await confirm(page, "retry")
    await page.locator("[data-task-state]", has_text="SUCCESS").wait_for(timeout=5000)
    assert "allowed" in await page.inner_text("pre.value")
    assert await TaskHandle(app.client, picky.id).result(timeout=1) == "allowed"
    assert page.script_errors == []


async def test_dead_letters_and_purge_from_the_page(
    app: App, site: Callable[..., Any], browser: Any
) -> None:
    url = await site()
    dead = [await app.send_task("dash.nobody", (i,)) for i in range(2)]
    for h in dead:
        with pytest.raises(TaskFailed):
            await h.result(timeout=10)
    page = await open_page(browser, url + "dead")
    rows = page.locator("table.dead tbody tr")
    assert await rows.count() == 2
    assert "UnknownTask" in await rows.first.inner_text()
    await shoot(page, "dead-letters")
    # A row's Requeue reads as a button that works, as "Requeue all" does (not greyed).
    colour = "el => getComputedStyle(el).color"
    one = rows.first.locator("button[data-action=requeue]")
    every = page.locator(".head .actions button[data-action=requeue]").first
    assert await one.evaluate(colour) == await every.evaluate(colour)
    await rows.first.locator("button[data-action=drop]").click()
    await page.click("dialog#confirm [data-confirm-ok]")
    await page.locator("table.dead tbody tr").nth(1).wait_for(state="detached", timeout=5000)
    assert await app.client.redis.xlen(app.client.keys.dead("default")) == 1

    waiting = [await app.send_task("dash.add", (i, i), countdown=600) for i in range(3)]
    await page.goto(url)
    await page.locator('tr[data-queue-row="default"] button[data-action=purge]').click()
    await page.click("dialog#confirm [data-confirm-ok]")
    await page.locator("#toast", has_text="Purged 3").wait_for(timeout=5000)
    for h in waiting:
        assert await h.state() == TaskState.REVOKED
    assert page.script_errors == []


async def test_read_only_shows_no_action(app: App, site: Callable[..., Any], browser: Any) -> None:
    url = await site(read_only=True)
    failed = await app.send_task("dash.boom", ("x",))
    with pytest.raises(TaskFailed):
        await failed.result(timeout=10)
    await app.send_task("dash.nobody")
    later = await app.send_task("dash.add", (1, 1), countdown=600)
    for path in ("", "tasks", f"tasks/{failed.id}", f"tasks/{later.id}", "dead"):
        page = await open_page(browser, url + path)
        assert await page.locator(".ro", has_text="read-only").count() == 1
        assert await page.locator("form.act, button[data-action], dialog").count() == 0, path
        await page.close()
    page = await open_page(browser, f"{url}tasks/{failed.id}")
    await shoot(page, "read-only-task")
