"""The dashboard over HTTP: pages, actions and their protection, the hub, `aiotasks web`.

(The browser tests are in test_dashboard_browser.py; the prefix crawl and the read-only
check in test_dashboard_prefix.py.)
"""

from __future__ import annotations

import asyncio
import html
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from aiotasks import App, TaskFailed, TaskState, Worker, chord
from tests.helpers import wait_until
from tests.webserver import free_port, serve

ROOT = Path(__file__).resolve().parent.parent
StartWorker = Callable[..., Awaitable[Worker]]


def register(app: App) -> tuple[object, object, object]:
    @app.task(name="web.add")
    async def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="web.tsum")
    async def tsum(values: list[int]) -> int:
        return sum(values)

    @app.task(name="web.boom")
    async def boom() -> None:
        raise ValueError("boom")

    return add, tsum, boom


@pytest.fixture
async def client(app: App) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the dashboard (in process), with the page's cookie already set."""
    transport = httpx.ASGITransport(app=app.dashboard())
    async with httpx.AsyncClient(transport=transport, base_url="http://dash") as c:
        assert (await c.get("/")).status_code == 200
        yield c


def token(c: httpx.AsyncClient) -> str:
    return str(c.cookies["aiotasks_csrf"])


async def test_actions_refuse_cross_site_requests(app: App, client: httpx.AsyncClient) -> None:
    later = await app.send_task("web.add", (1, 2), countdown=600)
    form = {"task_id": later.id, "csrf": token(client)}
    json_only = {"Accept": "application/json"}
    cases = [
        ({**json_only, "Sec-Fetch-Site": "cross-site"}, form, "cross-site"),
        ({**json_only, "Origin": "https://evil.example"}, form, "another origin"),
        (json_only, {"task_id": later.id}, "token"),
        (json_only, {**form, "csrf": "forged"}, "token"),
    ]
    for headers, data, why in cases:
        r = await client.post("/actions/revoke", headers=headers, data=data)
        assert r.status_code == 403 and why in r.json()["message"], (headers, r.text)
    assert await later.state() == TaskState.SCHEDULED  # nothing was done

    same = {**json_only, "Sec-Fetch-Site": "same-origin", "Origin": "http://dash"}
    r = await client.post("/actions/revoke", headers=same, data=form)
    assert r.status_code == 200 and r.json() == {
        "ok": True,
        "message": f"Revoked task {later.id} (it was SCHEDULED).",
    }
    assert await later.state() == TaskState.REVOKED


async def test_actions_without_script_go_back_to_the_page(
    app: App, client: httpx.AsyncClient
) -> None:
    later = await app.send_task("web.add", (1, 2), countdown=600)
    data = {"task_id": later.id, "csrf": token(client), "next": f"tasks/{later.id}"}
    r = await client.post("/actions/revoke", data=data)
    assert r.status_code == 303 and r.headers["location"] == f"../tasks/{later.id}"
    for bad in ("//evil.example/x", "/absolute", "../../up", "https://evil.example"):
        r = await client.post("/actions/revoke", data={**data, "next": bad})
        assert r.status_code == 200 and "location" not in r.headers, bad


async def test_action_errors_say_what_is_wrong(
    app: App, client: httpx.AsyncClient, worker: StartWorker
) -> None:
    register(app)
    await worker()
    ok = await app.send_task("web.add", (1, 2))
    assert await ok.result(timeout=10) == 3

    async def post(action: str, **data: str) -> httpx.Response:
        headers = {"Accept": "application/json"}
        return await client.post(
            f"/actions/{action}", headers=headers, data={"csrf": token(client), **data}
        )

    r = await post("retry", task_id=ok.id)
    assert r.status_code == 400 and "only a FAILURE or REVOKED task" in r.json()["message"]
    r = await post("revoke", task_id="no-such-task")
    assert r.status_code == 404 and "no task with id 'no-such-task'" in r.json()["message"]
    r = await post("purge", queue="no-such-queue")
    assert r.status_code == 404 and "no queue named" in r.json()["message"]
    r = await post("drop", queue="default", entry_id="not-an-id")
    assert r.status_code == 400 and "malformed entry id" in r.json()["message"]
    r = await post("explode")
    assert r.status_code == 404
    r = await post("revoke")
    assert r.status_code == 400 and "task_id" in r.json()["message"]
    r = await post("revoke", task_id=ok.id)
    assert r.json()["message"] == f"Task {ok.id} had already ended SUCCESS: nothing to revoke."
    # A page behind another's requeue or drop: said, not "Requeued 0".
    r = await post("requeue", queue="default", entry_id="1-0")
    assert r.json()["message"] == (
        "Requeued none: that dead letter of queue default may be gone, or hold no message "
        "to run (reload the page)."
    )
    r = await post("drop", queue="default")
    assert r.json()["message"] == (
        "Dropped none: the dead letters of queue default may be gone (reload the page)."
    ), r.json()


async def test_a_chords_pages_link_its_parts(
    app: App, client: httpx.AsyncClient, worker: StartWorker
) -> None:
    add, tsum, boom = register(app)
    await worker()
    h = await chord([add.s(1, 1), boom.s()], tsum.s()).send()  # type: ignore[attr-defined]
    with pytest.raises(TaskFailed):
        await h.result(timeout=10)
    body = (await client.get(f"/tasks/{h.id}")).text
    failed = re.search(r'Failed header</dt><dd><a class="mono" href="../tasks/(\w+)"', body)
    assert failed is not None, body
    assert "ChordError" in body and "No traceback" in body
    header = (await client.get(f"/tasks/{failed.group(1)}")).text
    assert "ValueError" in header and "this task is header 2" in header
    assert f'href="../tasks/{h.id}">its body</a>' in header
    said = " ".join(re.sub(r"<[^>]+>", "", header).split())  # the page as it reads
    assert "1 of 2 headers done, failed · its body · this task is header 2" in said, said
    r = await client.get("/tasks/never-sent")
    assert r.status_code == 404 and "No task" in r.text


async def test_a_dead_lettered_tasks_page_shows_its_arguments(
    app: App, client: httpx.AsyncClient, worker: StartWorker
) -> None:
    """From its dead letter: the page said "Not kept for this task"."""
    await worker()
    h = await app.send_task("web.nobody", (7, {"a": 2}), kwargs={"k": "v"})
    with pytest.raises(TaskFailed):
        await h.result(timeout=10)
    page = (await client.get(f"/tasks/{h.id}")).text
    said = " ".join(html.unescape(re.sub(r"<[^>]+>", "", page)).split())
    assert 'Arguments args[7, {"a": 2}] kwargs{"k": "v"}' in said, said


async def test_one_feed_reader_serves_every_open_page(app: App) -> None:
    web = app.dashboard()
    hub = web.state.dashboard.hub
    async with (
        serve(web) as base,
        httpx.AsyncClient(base_url=base, timeout=10) as client,
    ):
        streams = [client.stream("GET", f"{base}/events?view=overview") for _ in range(3)]
        responses = [await s.__aenter__() for s in streams]
        lines = [r.aiter_lines() for r in responses]
        for it in lines:
            assert await anext(it) == "retry: 2000"
        h = await app.send_task("web.add", (1, 2))

        async def seen(it: AsyncIterator[str]) -> None:
            async for line in it:
                if line.startswith("data: [") and h.id in line:
                    assert json.loads(line[6:])[0]["state"] == "PENDING"
                    return

        async with asyncio.timeout(5):
            await asyncio.gather(*(seen(it) for it in lines))
        assert len(hub._subs) == 3 and hub._runner is not None  # one runner for all
        for s in streams:
            await s.__aexit__(None, None, None)


def aiotasks(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    full = {k: v for k, v in os.environ.items() if not k.endswith("REDIS_URL")}
    return subprocess.Popen(
        [sys.executable, "-m", "aiotasks", *args],
        cwd=ROOT,
        env={**full, "PYTHONPATH": str(ROOT), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def once_up(client: httpx.AsyncClient, url: str) -> httpx.Response:
    """GET `url` as soon as the server started in a subprocess answers (10 s at most)."""
    for _ in range(100):
        try:
            return await client.get(url)
        except httpx.ConnectError:
            await asyncio.sleep(0.1)
    return await client.get(url)


async def test_aiotasks_web_serves_the_dashboard(app: App, redis_url: str) -> None:
    await app.send_task("web.add", (1, 2))
    port = free_port()
    ns = app.settings.namespace
    proc = aiotasks("web", "--redis-url", redis_url, "--namespace", ns, "--port", str(port))
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            r = await once_up(client, f"http://127.0.0.1:{port}/tasks")
            assert r.status_code == 200 and "web.add" in r.text
            assert "actions/" in (await client.get(f"http://127.0.0.1:{port}/")).text
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert f"aiotasks dashboard on http://127.0.0.1:{port}/ (namespace '{ns}'" in err


def test_aiotasks_web_fails_in_one_line() -> None:
    proc = aiotasks("web", "--redis-url", "redis://127.0.0.1:1/0")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and err.startswith("error: cannot reach Redis at")
    assert len(err.splitlines()) == 1

    no_extra = (
        "import sys; sys.modules['starlette'] = None; sys.argv = ['aiotasks', 'web'];"
        "from aiotasks.cli import main; main()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", no_extra],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stderr=subprocess.PIPE,
        text=True,
    )
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert err == (
        "error: the dashboard needs the 'web' extra: pip install 'aiotasks-streams[web]' "
        "(missing starlette)\n"
    )


def test_workers_never_import_the_dashboard(redis_url: str, namespace: str) -> None:
    script = f"""
import asyncio, sys
from aiotasks import App
app = App(redis_url={redis_url!r}, namespace={namespace!r})

@app.task
async def add(x, y):
    return x + y

async def main():
    async with app, app.worker().running():
        assert await (await add.send(1, 2)).result(timeout=10) == 3
    print(sorted(m for m in sys.modules if m.startswith(("aiotasks.web", "jinja2"))))
    try:
        sys.modules["jinja2"] = None
        app.dashboard()
    except ImportError as exc:
        print(exc)

asyncio.run(main())
"""
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "[]",
        "the dashboard needs the 'web' extra: pip install 'aiotasks-streams[web]' (missing jinja2)",
    ]


async def test_while_redis_is_gone_pages_and_actions_say_so(
    own_server: object, namespace: str
) -> None:
    """A page loaded, or an action sent, while Redis does not answer gets a 503 that says
    so (it was a bare 500 'Internal Server Error', which the page's script could not read
    as JSON); open pages hear 'redis down' on their stream, then 'up' once it is back."""
    from aiotasks.testing.server import OwnServer

    assert isinstance(own_server, OwnServer)
    app = App(redis_url=own_server.url, namespace=namespace, warn_on_unsafe_server=False)
    try:
        # A real server: httpx's ASGI transport would hold the stream's body to its end.
        async with serve(app.dashboard()) as base, httpx.AsyncClient(base_url=base) as c:
            assert (await c.get("/")).status_code == 200
            heard: list[str] = []

            async def follow() -> None:
                async with c.stream("GET", "/events?view=overview") as s:
                    async for line in s.aiter_lines():
                        if line.startswith("event: redis"):
                            heard.append("redis")
                        elif heard and heard[-1] == "redis" and line.startswith("data: "):
                            heard[-1] = line[len("data: ") :]

            stream = asyncio.create_task(follow())
            await asyncio.sleep(0.3)
            await asyncio.to_thread(own_server.stop)
            page = await c.get("/tasks/some-id")
            assert page.status_code == 503, page.text
            assert "Redis does not answer" in page.text and "127.0.0.1" in page.text
            assert 'href="../static/app.css' in page.text  # the page's own depth
            act = await c.post(
                "/actions/revoke",
                headers={"Accept": "application/json"},
                data={"task_id": "x", "csrf": token(c)},
            )
            assert act.status_code == 503 and act.json()["ok"] is False
            assert "does not answer" in act.json()["message"]
            await wait_until(lambda: _async(heard[-1:] == ["down"]), 10, "'redis down'")
            await asyncio.to_thread(own_server.start)
            await wait_until(lambda: _async(heard[-1:] == ["up"]), 15, "'redis up'")
            assert (await c.get("/")).status_code == 200
            stream.cancel()
    finally:
        await app.close()


async def _async(value: bool) -> bool:
    return value


async def test_the_overview_marks_paused_queues_and_schedules(
    app: App, client: httpx.AsyncClient
) -> None:
    """An operator saw a paused queue, full of waiting tasks, look like any other."""
    add, _, _ = register(app)
    await app.send_task("web.add", (1, 2), queue="mail")
    await app.send_task("web.add", (1, 2), queue="other")
    await app.queues.pause("mail")
    await app.schedules.add("nightly", add.s(1, 1), every=3600)  # type: ignore[attr-defined]
    await app.schedules.pause("nightly")
    page = (await client.get("/")).text
    rows = {
        q: re.search(rf'<tr data-queue-row="{q}">(.*?)</tr>', page, re.S) for q in ("mail", "other")
    }
    assert rows["mail"] and 'class="tag paused"' in rows["mail"].group(1)
    assert rows["other"] and "paused" not in rows["other"].group(1)
    nightly = re.search(r"<tr><td>nightly</td>(.*?)</tr>", page, re.S)
    assert nightly and 'class="tag paused"' in nightly.group(1), page
