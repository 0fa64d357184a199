"""The dashboard as a Starlette app: pages, their live streams, and the actions.

```
GET  /                    overview: queues, workers, periodic tasks, recent tasks
GET  /tasks               the task list: search (id or name) and filters (state, queue)
GET  /tasks/<id>          a task's page (tasks?id=<id> for an id that is not plain:
                          see filters.task_href)
GET  /dead                dead letters
GET  /events?view=...     server-sent events for the overview, list and dead-letter pages
GET  /events/task/<id>    server-sent events for a task's page (or events/task?id=<id>)
POST /actions/<name>      revoke, terminate, retry, purge, requeue, drop (unless read_only)
GET  /static/...          the stylesheet and script, served from the package
```

Every URL a page holds is relative (`root` is "./" or "../"), so the dashboard works
under any mount point or proxy prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote, urlsplit

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..admin import Admin, CannotRetry, QueueNotFound, TaskNotFound, TaskUnreadable
from ..config import redact_url
from ..errors import CONNECTION_ERRORS, BrokerConnectionError, describe
from ..index import TaskIndex
from ..state import TaskState
from .filters import install_filters
from .hub import Hub, Tick
from .pages import dead_letters as read_dead
from .pages import overview as read_overview
from .pages import task_detail as read_task

if TYPE_CHECKING:
    from ..app import App

HERE = Path(__file__).parent
CSRF_COOKIE = "aiotasks_csrf"
#: Seconds between keep-alive comments on an idle stream.
KEEP_ALIVE = 15.0
#: Tasks the list shows at most, and the overview's recent tasks.
LIST_LIMITS = (25, 50, 100, 200)
RECENT = 12
#: Bytes an action's form may have.
MAX_FORM = 16 * 1024

_FEED_ID = re.compile(r"^\d+-\d+(,\d+-\d+)*$")  # TaskIndex.last_id(): one id per shard
_NEXT = re.compile(r"^[A-Za-z0-9_\-.~%/?=&+]*$")


class Dashboard:
    """The dashboard of one App (see `App.dashboard`)."""

    def __init__(self, app: App, read_only: bool = False) -> None:
        from .. import __version__

        self.app = app
        self.read_only = read_only
        self.admin = Admin(app)
        self.index = TaskIndex(app.client)
        self.env = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=select_autoescape(["html"]),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        install_filters(self.env)
        self.env.globals.update(
            version=__version__,
            read_only=read_only,
            namespace=app.settings.namespace,
            states=[s.value for s in TaskState],
        )
        self.hub = Hub(
            self.index, {"overview": self._overview_fragment, "dead": self._dead_fragment}
        )

    def asgi(self) -> Starlette:
        """The Starlette app serving this dashboard."""
        routes = [
            Route("/", self.overview),
            Route("/tasks", self.task_list),
            Route("/tasks/{task_id:path}", self.task_page),
            Route("/dead", self.dead),
            Route("/events", self.stream),
            Route("/events/task", self.task_stream),
            Route("/events/task/{task_id:path}", self.task_stream),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ]
        if not self.read_only:
            routes.append(Route("/actions/{action}", self.act, methods=["POST"]))

        @contextlib.asynccontextmanager
        async def lifespan(_app: Starlette) -> AsyncIterator[None]:
            yield
            await self.hub.close()

        # Not OSError as a whole: a template that cannot be read is no lost Redis.
        lost = [e for e in (*CONNECTION_ERRORS, BrokerConnectionError) if e is not OSError]
        unreachable = dict.fromkeys(lost, self._unreachable)
        web = Starlette(routes=routes, lifespan=lifespan, exception_handlers=unreachable)
        web.state.dashboard = self
        return web

    # -- rendering --------------------------------------------------------------------

    def render(self, template: str, **context: Any) -> str:
        return self.env.get_template(template).render(**context)

    def page(self, request: Request, template: str, **context: Any) -> Response:
        token = request.cookies.get(CSRF_COOKIE) or secrets.token_urlsafe(24)
        html = self.render(template, csrf=token, **context)
        response = HTMLResponse(html, headers={"Cache-Control": "no-store"})
        if request.cookies.get(CSRF_COOKIE) != token:
            response.set_cookie(
                CSRF_COOKIE,
                token,
                httponly=True,
                samesite="strict",
                secure=request.url.scheme == "https",
                path="/",
            )
        return response

    async def _unreachable(self, request: Request, exc: Exception) -> Response:
        """A page or action while Redis is gone: say so (503), not a bare server error."""
        message = (
            f"Redis at {redact_url(self.app.settings.redis_url)} does not answer "
            f"({describe(exc)}); the dashboard goes on once it is back"
        )
        if "application/json" in request.headers.get("accept", ""):
            return JSONResponse({"ok": False, "message": message}, status_code=503)
        html = self.render(
            "unreachable.html", root=_root(request), page="", view="", message=message, csrf=""
        )
        headers = {"Retry-After": "5"}
        if request.method == "GET":  # the browser tries again: the page comes back with Redis
            headers["Refresh"] = "5"
        return HTMLResponse(html, status_code=503, headers=headers)

    async def _overview_fragment(self) -> str:
        data = await read_overview(self.admin, self.hub)
        return self.render("_overview.html", root="./", o=data, csrf="")

    async def _dead_fragment(self) -> str:
        queues = await read_dead(self.admin)
        return self.render("_dead.html", root="./", queues=queues, csrf="")

    # -- pages ------------------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        if not request.url.path.endswith("/"):
            # Relative links need the trailing slash: /tasks-ui -> /tasks-ui/
            last = request.url.path.rsplit("/", 1)[-1]
            return RedirectResponse(f"{last}/", status_code=308)
        self.hub.touch()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await self.hub.ready.wait()  # the throughput of the last minute
        after = await self.index.last_id()
        data = await read_overview(self.admin, self.hub)
        recent = await self.index.recent(limit=RECENT)
        return self.page(
            request, "overview.html", root="./", page="overview", o=data, tasks=recent,
            after=after, view="overview", limit=RECENT,
        )  # fmt: skip

    async def task_list(self, request: Request) -> Response:
        params = request.query_params
        if "id" in params:  # a task's page, for an id that is not plain (task_href)
            return await self._task_page(request, params["id"], "./")
        q = params.get("q", "").strip()
        state = params.get("state", "").upper() or None
        if state not in {s.value for s in TaskState}:
            state = None
        queue = params.get("queue") or None
        limit = _int(params.get("limit"), 50, LIST_LIMITS)
        after = await self.index.last_id()
        found_id, search = None, None
        if q:
            by_id = []
            if await self.admin.exists(q):  # an unknown id would read as PENDING
                by_id = await self.index.recent(task_id=q, state=state, queue=queue)
            if by_id:
                found_id, tasks = q, by_id
            else:
                search = q
                tasks = await self.index.recent(state=state, search=q, queue=queue, limit=limit)
        else:
            tasks = await self.index.recent(state=state, queue=queue, limit=limit)
        return self.page(
            request, "tasks.html", root="./", page="tasks", tasks=tasks, q=q, state=state,
            queue=queue, limit=limit, limits=LIST_LIMITS, search=search, found_id=found_id,
            queues=await self.admin.known_queues(), after=after, view="tasks",
        )  # fmt: skip

    async def task_page(self, request: Request) -> Response:
        # "../", or deeper for an id whose "/" came unencoded (typed, or decoded by a
        # proxy): the page's links, and those of the parts its stream sends, go up as far.
        return await self._task_page(request, request.path_params["task_id"], _root(request))

    async def _task_page(self, request: Request, task_id: str, root: str) -> Response:
        detail = await read_task(self.admin, task_id)
        if detail is None:
            html = self.render("missing.html", root=root, page="tasks", task_id=task_id, csrf="")
            return HTMLResponse(html, status_code=404)
        depth = root.count("../")
        quoted = quote(task_id, safe="")
        if depth == 0:
            stream = f"events/task?id={quoted}&depth=0"
        else:
            stream = f"events/task/{quoted}" + (f"?depth={depth}" * (depth > 1))
        return self.page(
            request, "task.html", root=root, page="task", d=detail, view="task", stream=stream,
        )  # fmt: skip

    async def dead(self, request: Request) -> Response:
        queues = await read_dead(self.admin)
        return self.page(
            request, "dead.html", root="./", page="dead", queues=queues, view="dead",
            after=await self.index.last_id(),
        )  # fmt: skip

    # -- live streams -----------------------------------------------------------------

    async def stream(self, request: Request) -> Response:
        view = request.query_params.get("view", "")
        wants = frozenset({view} & {"overview", "dead"})
        after = request.query_params.get("after", "")

        async def events() -> AsyncIterator[str]:
            async with self.hub.subscribe(wants) as sub:
                yield "retry: 2000\n\n"
                # Whether Redis answers, said at every (re)connect and on each change: a
                # page that reconnects after an outage must hear that it is over.
                up = self.hub.redis_up
                yield _sse("redis", "up" if up else "down")
                if _FEED_ID.match(after):
                    # What happened between the page's render and this stream.
                    with contextlib.suppress(*CONNECTION_ERRORS):  # the hub says so
                        missed = self.hub.changes(await self.index.events(after=after))
                        if missed:
                            yield _sse("tasks", json.dumps(missed))
                while True:
                    try:
                        async with asyncio.timeout(KEEP_ALIVE):
                            tick = await sub.queue.get()
                    except TimeoutError:
                        tick = Tick()
                        yield ": keep-alive\n\n"
                    if tick.end:
                        return
                    if self.hub.redis_up != up:
                        up = self.hub.redis_up
                        yield _sse("redis", "up" if up else "down")
                    for event in _events_of(tick):
                        yield event

        return _event_stream(events())

    async def task_stream(self, request: Request) -> Response:
        task_id = request.path_params.get("task_id") or request.query_params.get("id", "")
        if not task_id:
            return Response("no task id", status_code=404)
        root = "../" * _int(request.query_params.get("depth"), 1, _DEPTHS) or "./"

        async def render() -> str:
            detail = await read_task(self.admin, task_id)
            return self.render("_task.html", root=root, d=detail, csrf="")

        async def events() -> AsyncIterator[str]:
            yield "retry: 2000\n\n"
            # Watch first, then render: no change between the two goes unseen.
            async with self.app.client.for_task(task_id).notifier.watch(task_id) as watch:
                last = await render()
                yield _sse("task", last)
                while True:
                    try:
                        async with asyncio.timeout(KEEP_ALIVE):
                            await watch.get()  # a state or progress change, nothing else
                    except TimeoutError:
                        yield ": keep-alive\n\n"
                        continue
                    html = await render()
                    if html != last:
                        yield _sse("task", html)
                        last = html

        return _event_stream(events())

    # -- actions ----------------------------------------------------------------------

    async def act(self, request: Request) -> Response:
        # A small urlencoded form, read here: no multipart parser needed.
        raw = await request.body()
        if len(raw) > MAX_FORM:
            return _answer(request, {}, 413, "the form is too large")
        fields = dict(parse_qsl(raw.decode(errors="replace"), keep_blank_values=True))
        refused = _cross_site(request, fields.get("csrf", ""))
        if refused is not None:
            return _answer(request, fields, 403, refused)
        action = request.path_params["action"]
        handler = getattr(self, f"_do_{action}", None)
        if handler is None:
            return _answer(request, fields, 404, f"no action named {action!r}")
        try:
            message = await handler(fields)
        except (TaskNotFound, QueueNotFound) as exc:
            return _answer(request, fields, 404, str(exc))
        except (CannotRetry, TaskUnreadable, ValueError, KeyError) as exc:
            return _answer(request, fields, 400, _reason(exc))
        self.hub.poke()
        return _answer(request, fields, 200, message)

    async def _do_revoke(self, f: dict[str, str]) -> str:
        return await self._revoke(f["task_id"], terminate=False)

    async def _do_terminate(self, f: dict[str, str]) -> str:
        return await self._revoke(f["task_id"], terminate=True)

    async def _revoke(self, task_id: str, terminate: bool) -> str:
        before = await self.admin.revoke(task_id, terminate=terminate)
        if before.is_final:
            return f"Task {task_id} had already ended {before}: nothing to revoke."
        if before == TaskState.STARTED and not terminate:
            return (
                f"Revoked task {task_id}: it is running, and ends REVOKED when its run ends "
                "(Terminate cancels it now)."
            )
        verb = "Terminated" if terminate and before == TaskState.STARTED else "Revoked"
        return f"{verb} task {task_id} (it was {before})."

    async def _do_retry(self, f: dict[str, str]) -> str:
        done = await self.admin.retry(f["task_id"])
        return f"Task {f['task_id']}: {done}."

    async def _do_purge(self, f: dict[str, str]) -> str:
        n = await self.admin.purge(f["queue"])
        return f"Purged {n} waiting or scheduled task{'s' * (n != 1)} of queue {f['queue']}."

    async def _do_requeue(self, f: dict[str, str]) -> str:
        n = await self.admin.requeue_dead(f["queue"], _entries(f))
        return _dead_done("Requeued", n, f)

    async def _do_drop(self, f: dict[str, str]) -> str:
        n = await self.admin.drop_dead(f["queue"], _entries(f))
        return _dead_done("Dropped", n, f)


def _dead_done(verb: str, n: int, f: dict[str, str]) -> str:
    if n == 0:  # a page behind another's requeue or drop
        what = "that dead letter" if _entries(f) else "the dead letters"
        why = "gone" if verb == "Dropped" else "gone, or hold no message to run"
        return f"{verb} none: {what} of queue {f['queue']} may be {why} (reload the page)."
    return f"{verb} {n} dead letter{'s' * (n != 1)} of queue {f['queue']}."


def _root(request: Request) -> str:
    """The relative URL of the dashboard's root from this request's page ("./", "../")."""
    # The path as sent: an id with an encoded "/" (%2F) is one segment, not two.
    raw = request.scope.get("raw_path")
    path = raw.decode("latin-1").split("?", 1)[0] if raw else request.scope["path"]
    mount = request.scope.get("root_path", "")
    if mount and path.startswith(mount):
        path = path[len(mount) :]
    return "../" * (path.count("/") - 1) or "./"


def _entries(f: dict[str, str]) -> list[str] | None:
    entry = f.get("entry_id", "").strip()
    return [entry] if entry else None


def _reason(exc: Exception) -> str:
    if isinstance(exc, KeyError):
        return f"missing form field {exc.args[0]!r}"
    return str(exc)


def _cross_site(request: Request, token: str) -> str | None:
    """Why a POST is refused as a possible cross-site request, or None to accept it."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return f"refused: a cross-site request (Sec-Fetch-Site: {site})"
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
        return "refused: the request comes from another origin"
    cookie = request.cookies.get(CSRF_COOKIE, "")
    if not cookie or not secrets.compare_digest(cookie.encode(), token.encode()):
        return "refused: the form's token does not match this browser's (reload the page)"
    return None


def _answer(request: Request, fields: dict[str, str], status: int, message: str) -> Response:
    """JSON for the page's script; without script, back to the page the form was on."""
    if "application/json" in request.headers.get("accept", ""):
        return JSONResponse({"ok": status == 200, "message": message}, status_code=status)
    nxt = fields.get("next", "")
    if status != 200 or not _NEXT.match(nxt) or nxt.startswith("/") or ".." in nxt:
        return HTMLResponse(f"<p>{_escape(message)}</p>", status_code=status)
    return RedirectResponse(f"../{nxt}", status_code=303)  # relative to /actions/<name>


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


#: How deep a task's page may be (its id's unencoded "/"s), for its stream's parts.
_DEPTHS = tuple(range(65))  # 0: a page at tasks?id=


def _int(raw: str | None, default: int, allowed: tuple[int, ...]) -> int:
    try:
        value = int(raw or default)
    except ValueError:
        return default
    return value if value in allowed else default


def _events_of(tick: Tick) -> list[str]:
    """A hub's tick as server-sent events: task changes, then fragments."""
    out = []
    if tick.changes:
        out.append(_sse("tasks", json.dumps(tick.changes)))
    out += [_sse(name, html) for name, html in tick.fragments.items()]
    return out


def _sse(event: str, data: str) -> str:
    lines = "".join(f"data: {line}\n" for line in data.splitlines() or [""])
    return f"event: {event}\n{lines}\n"


def _event_stream(body: AsyncIterator[str]) -> StreamingResponse:
    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    return StreamingResponse(body, media_type="text/event-stream", headers=headers)


def create(app: App, read_only: bool = False) -> Starlette:
    """The dashboard of `app` as an ASGI app (see App.dashboard)."""
    return Dashboard(app, read_only).asgi()


__all__ = ["Dashboard", "create"]
