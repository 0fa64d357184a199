"""The dashboard mounted in a FastAPI app, behind its auth, under a path prefix, served by
a real uvicorn: every link, asset, form and stream of every page works under the prefix.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Awaitable, Callable
from html.parser import HTMLParser
from typing import Any
from urllib.parse import unquote, urldefrag, urljoin, urlsplit

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response

from aiotasks import App, TaskFailed, Worker, chain
from tests.webserver import serve

PREFIX = "/ops/tasks"
AUTH = {"Authorization": "Basic " + base64.b64encode(b"ops:secret").decode()}


class Links(HTMLParser):
    """Every URL a page refers to: links, assets, forms, and its event stream."""

    def __init__(self) -> None:
        super().__init__()
        self.get: set[str] = set()
        self.post: set[str] = set()
        self.root: str | None = None
        self.stream: str | None = None
        self.view: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "body":
            self.root, self.stream, self.view = (
                a.get("data-root"),
                a.get("data-stream"),
                a.get("data-view"),
            )
        for attr in ("href", "src"):
            if attr in a and not a[attr].startswith("#"):
                self.get.add(a[attr])
        if tag == "form":
            (self.post if a.get("method") == "post" else self.get).add(a.get("action", ""))


def dashboard_api(tasks: App, **options: Any) -> FastAPI:
    """The README's recipe: the dashboard mounted behind the application's own auth."""
    api = FastAPI(lifespan=tasks.lifespan())

    @api.middleware("http")
    async def ops_only(request: Request, call_next: Any) -> Any:
        if (
            request.url.path.startswith("/ops")
            and request.headers.get("authorization") != (AUTH["Authorization"])
        ):
            return Response(status_code=401, headers={"WWW-Authenticate": "Basic"})
        return await call_next(request)

    @api.get("/")
    async def home() -> dict[str, str]:
        return {"app": "yes"}

    api.mount(PREFIX, tasks.dashboard(**options))
    return api


@pytest.fixture
async def seeded(
    app: App, worker: Callable[..., Awaitable[Worker]]
) -> AsyncIterator[dict[str, str]]:
    """A namespace with a success, a failure, a chain, a scheduled task, a dead letter."""

    @app.task(name="pfx.add")
    async def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="pfx.boom")
    async def boom() -> None:
        raise ValueError("boom")

    @app.periodic(every=3600)
    @app.task(name="pfx.hourly")
    async def hourly() -> None:
        return None

    await worker()
    ok = await add.send(1, 2)
    bad = await boom.send()
    ch = await chain(add.s(1, 1), add.s(2)).send()
    later = await add.options(countdown=600).send(5, 5)
    dead = await app.send_task("pfx.nobody.knows.me", task_id="odd/id with space")
    assert await ok.result(timeout=10) == 3
    assert await ch.result(timeout=10) == 4
    with pytest.raises(TaskFailed):
        await bad.result(timeout=10)
    with pytest.raises(TaskFailed):
        await dead.result(timeout=10)
    yield {"ok": ok.id, "bad": bad.id, "later": later.id, "dead": dead.id}


async def crawl(client: httpx.AsyncClient, start: str) -> dict[str, Links]:
    """Visit every page reachable from `start` under the prefix; assets are fetched too."""
    pages: dict[str, Links] = {}
    todo = [start]
    while todo:
        url = todo.pop()
        if url in pages:
            continue
        r = await client.get(url, headers=AUTH)
        assert r.status_code == 200, (url, r.status_code, r.text[:300])
        if "text/html" not in r.headers["content-type"]:
            pages[url] = Links()
            continue
        links = Links()
        links.feed(r.text)
        pages[url] = links
        for ref in links.get:
            target = urldefrag(urljoin(str(r.url), ref))[0]
            assert urlsplit(target).path.startswith(PREFIX + "/"), (url, ref, target)
            todo.append(target)
    return pages


async def test_every_link_asset_form_and_stream_works_under_the_prefix(
    app: App, seeded: dict[str, str]
) -> None:
    api = dashboard_api(app)
    async with serve(api) as base, httpx.AsyncClient(base_url=base, timeout=10) as client:
        assert (await client.get(PREFIX + "/")).status_code == 401  # the app's auth guards it
        r = await client.get(PREFIX, headers=AUTH, follow_redirects=True)
        assert r.status_code == 200 and str(r.url) == f"{base}{PREFIX}/"
        pages = await crawl(client, f"{base}{PREFIX}/")

        visited = {urlsplit(u).path for u in pages}
        for key in ("ok", "bad", "later"):
            assert f"{PREFIX}/tasks/{seeded[key]}" in visited, key
        # An id with a slash and spaces (the dead letter's task): linked by a query, which
        # no proxy decodes.
        assert f"{base}{PREFIX}/tasks?id=odd%2Fid%20with%20space" in pages
        assert {f"{PREFIX}/static/app.css", f"{PREFIX}/static/app.js"} <= visited
        assert {f"{PREFIX}/", f"{PREFIX}/tasks", f"{PREFIX}/dead"} <= visited

        actions: set[str] = set()
        for url, links in pages.items():
            actions |= {urljoin(url, a) for a in links.post}
            if links.root is None:
                continue
            stream = links.stream or (f"events?view={links.view}" if links.view else None)
            assert stream, url
            await first_event(client, urljoin(url, links.root + stream))
        assert {urlsplit(a).path for a in actions} == {
            f"{PREFIX}/actions/{name}"
            for name in ("retry", "purge", "requeue", "drop", "revoke", "terminate")
        } - {f"{PREFIX}/actions/terminate"}  # nothing runs now: no terminate button
        for action in actions:  # each exists, and refuses a form without its token
            refused = await client.post(action, headers=AUTH, data={"task_id": "x"})
            assert refused.status_code == 403, (action, refused.text)

        # The same id with its "/" as is (typed, or decoded by a proxy): the page's
        # links, styles and stream go up as far as it is deep (it had no styles).
        raw = f"{base}{PREFIX}/tasks/odd/id with space"
        r = await client.get(raw, headers=AUTH)
        assert r.status_code == 200 and 'href="../../static/app.css' in r.text, r.text[:500]
        links = Links()
        links.feed(r.text)
        assert links.root == "../../" and links.stream, (links.root, links.stream)
        await first_event(client, urljoin(raw, links.root + links.stream))
        for ref in links.get - {""}:  # "": the search form, on this page
            target = urlsplit(urljoin(raw, ref)).path
            assert target.startswith(PREFIX + "/") and "/tasks/odd/" not in target, ref


def decoding_proxy(asgi: Any) -> Any:
    """`asgi` behind a proxy that decodes the path it passes on, "%2F" included (nginx's
    `proxy_pass` with a URI does): the browser's URL and the server's path then differ."""

    async def proxied(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path = unquote(scope["path"])
            scope = {**scope, "path": path, "raw_path": path.encode("latin-1", "replace")}
        await asgi(scope, receive, send)

    return proxied


async def test_an_odd_ids_page_works_behind_a_proxy_that_decodes_paths(
    app: App, seeded: dict[str, str]
) -> None:
    api = decoding_proxy(dashboard_api(app))
    async with serve(api) as base, httpx.AsyncClient(base_url=base, timeout=10) as client:
        pages = await crawl(client, f"{base}{PREFIX}/")
        odd = f"{base}{PREFIX}/tasks?id=odd%2Fid%20with%20space"
        assert odd in pages and pages[odd].root == "./", sorted(pages)
        r = await client.get(odd, headers=AUTH)
        assert "odd/id with space" in r.text and 'href="./static/app.css' in r.text
        links = pages[odd]
        assert links.stream == "events/task?id=odd%2Fid%20with%20space&depth=0"
        await first_event(client, urljoin(odd, links.root + links.stream))
        # The parts its stream sends link from the page's own place, the root.
        async with client.stream("GET", urljoin(odd, links.stream), headers=AUTH) as s:
            async with asyncio.timeout(5):
                async for line in s.aiter_lines():
                    if line.startswith("data:") and "href" in line:
                        assert 'href="./' in line and 'href="../' not in line, line
                        break


async def first_event(client: httpx.AsyncClient, url: str) -> None:
    """The stream at `url` answers as an event stream and sends its first line."""
    async with client.stream("GET", url, headers=AUTH) as r:
        assert r.status_code == 200, url
        assert r.headers["content-type"].startswith("text/event-stream")
        async with asyncio.timeout(5):
            async for line in r.aiter_lines():
                assert line == "retry: 2000"
                return


async def test_read_only_has_no_action_anywhere(app: App, seeded: dict[str, str]) -> None:
    api = dashboard_api(app, read_only=True)
    async with serve(api) as base, httpx.AsyncClient(base_url=base, timeout=10) as client:
        pages = await crawl(client, f"{base}{PREFIX}/")
        assert len(pages) > 8
        assert all(not links.post for links in pages.values())
        r = await client.get(f"{PREFIX}/tasks/{seeded['bad']}", headers=AUTH)
        assert "read-only" in r.text and "actions/" not in r.text
        posted = await client.post(f"{PREFIX}/actions/retry", headers=AUTH, data={})
        assert posted.status_code in (404, 405)


def test_the_page_script_links_ids_as_the_server_does() -> None:
    """app.js makes the rows the live feed adds: its rule for a plain id is the server's
    (filters.task_href), or one page links a task two ways."""
    import re
    from pathlib import Path

    from aiotasks.web import filters

    script = (Path(filters.__file__).parent / "static" / "app.js").read_text()
    (js,) = re.findall(r"if \(/\^(.+?)\$/\.test\(id\)\) return \"tasks/\" \+ id;", script)
    assert js == filters._PLAIN_ID.pattern
