"""Notifier: one shared pub/sub connection per App wakes every waiting handle.

Two kinds of channel share the connection:

- the App's reply channel, subscribed once: every task this App sends names it, and
  the worker's finish script publishes the final state (and the encoded result) there,
  so `result()` costs no subscription round trip and often no read after the wake-up;
- a task's own channel, subscribed per waiter (refcounted) for tasks sent by others and
  for `updates()`, which also wants intermediate states and progress.

Waiters are woken by a message, never by polling. After a reconnect every waiter is
told to re-read its task, since a message may have been missed meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, cast

import msgpack  # type: ignore[import-untyped]
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .backoff import Backoff
from .cancel import cancel_and_wait, keep_cancel
from .config import redact_url
from .keys import Keys
from .outage import REMIND, Outage
from .refusals import refusal
from .topology import notifier_client

log = logging.getLogger(__name__)

RECONNECTED = "\x00reconnected"

#: A notification: the state (or "progress", or RECONNECTED), plus for a final
#: state on the reply channel, the result's content type and bytes when it has one.
Note = tuple[str, bytes | None, bytes | None]


class Watch:
    """The notifications of one task, for one waiter."""

    RECHECK = frozenset({"SUCCESS", "FAILURE", "REVOKED", RECONNECTED})

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Note] = asyncio.Queue()

    def put(self, note: Note) -> None:
        self._queue.put_nowait(note)

    async def get(self) -> Note:
        """The next notification."""
        return await self._queue.get()


#: A pub/sub command that failed because the subscription connection is gone (or, for
#: RuntimeError, not connected yet): the reconnect subscribes every watched channel.
_GONE = (RedisConnectionError, RedisTimeoutError, OSError, RuntimeError)


class _Refused:
    """Why a subscription is gone: Redis refused the (S)SUBSCRIBE."""

    __slots__ = ("exc",)

    def __init__(self, exc: ResponseError) -> None:
        self.exc = exc


class _StartAgain(Exception):
    """The first waiter of a channel gave up before it subscribed: subscribe again."""


class Mailbox:
    """Where the first notification of a task this App sent lands, from the moment it
    is sent: `result()` on a fresh handle waits here instead of reading the task first.

    Held by the handle only: a task sent and forgotten costs a weak reference. A handle
    that keeps its mailbox keeps the result it received, as `info()` would return it.
    """

    __slots__ = ("owner", "note", "_waiter", "__weakref__")

    def __init__(self, owner: Notifier) -> None:
        #: The notifier that fills it: one of another event loop, or of a closed App,
        #: never will (TaskHandle reads the task instead).
        self.owner = owner
        self.note: Note | None = None
        self._waiter: asyncio.Future[None] | None = None

    def put(self, note: Note) -> None:
        if self.note is None:
            self.note = note
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(None)

    async def get(self) -> Note:
        """The first notification: a final state, or RECONNECTED (one may be lost)."""
        if self.note is None:
            if self._waiter is None:
                self._waiter = asyncio.get_running_loop().create_future()
            # Shielded: one waiter's timeout must not cancel the others' wait.
            await asyncio.shield(self._waiter)
        assert self.note is not None
        return self.note


class Notifier:
    """Shared subscription for all task waiters of one App."""

    def __init__(
        self,
        url: str,
        keys: Keys,
        mark: Callable[[str], Awaitable[object]] | None = None,
        redis: Redis | None = None,
        pick: Callable[[], Awaitable[Redis]] | None = None,
        sharded: bool = False,
        marks_at_once: int = 1,
    ) -> None:
        """`mark`: marks a task watched (scripts.watch, on the App's own pool);
        `marks_at_once`: how many it runs at once after a reconnect (a share of that pool).
        `redis`: the client to subscribe with (default: one for `url`); `pick`: gives a
        client of another node when a reconnect fails (a cluster node that died), or of
        the node that owns the namespace's slot (`sharded`). `sharded`: subscribe with
        SSUBSCRIBE (a Cluster, whose scripts SPUBLISH)."""
        # A connection of its own, without redis-py's silent retries: the reader must see
        # a lost connection to tell every waiter to re-read what it may have missed.
        # RESP2: under RESP3 every message is a push reply, and hiredis-py leaks about
        # 95 bytes per push reply (benchmarks/notifier_rss.py measures it).
        if redis is None:
            redis = notifier_client(url)
        self._url = redact_url(url)
        self._redis = redis
        self._pick = pick
        self._mark = mark
        self._marks_at_once = max(1, marks_at_once)
        #: Watched task channels and their ids: marked again after a reconnect, since a
        #: failover may have promoted a replica that never got the mark.
        self._marked: dict[str, str] = {}
        self._keys = keys
        self.reply_channel = keys.reply_channel(uuid.uuid4().hex[:16])
        self._pubsub: PubSub | None = None
        self._watches: dict[str, set[Watch]] = {}  # channel -> waiters
        self._replies: dict[str, set[Watch]] = {}  # task id -> waiters on the reply channel
        #: Mailboxes of sent tasks whose handles are alive (see Mailbox), by task id.
        self._boxes: weakref.WeakValueDictionary[str, Mailbox] = weakref.WeakValueDictionary()
        #: The reply channel is subscribed and the subscription has not been lost since.
        self._reply_live = False
        self._confirm: dict[str, asyncio.Future[None]] = {}
        #: A worker running on this App says "lost Redis" once for all its loops, this
        #: listener's included (outage.py); None: the listener logs on its own.
        self.outage: Outage | None = None
        self._reader: asyncio.Task[None] | None = None
        #: What a channel's subscription is for, where a refusal should say it (listen).
        self._why: dict[str, str] = {}
        #: The refusal logged last, and when: said again only once REMIND s have passed.
        self._refusal_said: tuple[str, float] | None = None
        #: Subscription upkeep left behind by waiters that were cancelled.
        self._leaving_tasks: set[asyncio.Task[None]] = set()
        self._cmd_lock = asyncio.Lock()
        self._sharded = sharded
        #: A sharded subscription the server dropped (its slot moved): reconnect.
        self._dropped = False
        #: SUNSUBSCRIBEs sent and not yet confirmed, by channel: their replies are ours,
        #: not the server dropping a channel a new waiter watches again meanwhile.
        self._leaving: Counter[str] = Counter()
        #: Reconnects so far: a waiter that saw its task before one and finds no record
        #: after it knows the server lost the task (handle.TaskLost).
        self.reconnects = 0

    @asynccontextmanager
    async def watch(self, task_id: str) -> AsyncIterator[Watch]:
        """Subscribe to a task's own channel for the duration of the block.

        The task is marked watched once subscribed (watch.lua): only then do the scripts
        publish its state changes there. Read the task after entering the block.
        """
        channel = self._keys.done_channel(task_id)
        try:
            async with self.listen(channel) as w:
                if self._mark is not None:
                    await self._mark(task_id)
                    self._marked[channel] = task_id
                yield w
        finally:
            if channel not in self._watches:  # the last waiter of this task left
                self._marked.pop(channel, None)

    @asynccontextmanager
    async def listen(self, channel: str, why: str = "") -> AsyncIterator[Watch]:
        """Subscribe to any channel for the duration of the block; `why` says what it is
        for in the log line should Redis refuse it (an ACL without the channel)."""
        if why:
            self._why[channel] = why
        w = Watch()
        await self._add(channel, w)
        try:
            yield w
        finally:
            await self._remove(channel, w)
            if channel not in self._watches:
                self._why.pop(channel, None)

    @asynccontextmanager
    async def watch_reply(self, task_id: str) -> AsyncIterator[Watch]:
        """Listen for a task's final state on this App's reply channel."""
        await self.ensure_reply()
        w = Watch()
        self._replies.setdefault(task_id, set()).add(w)
        try:
            yield w
        finally:
            watchers = self._replies.get(task_id)
            if watchers is not None:
                watchers.discard(w)
                if not watchers:
                    del self._replies[task_id]

    def mailbox(self, task_id: str) -> Mailbox | None:
        """A mailbox for a task about to be sent, when its final state cannot be missed:
        the reply channel is subscribed already (None: read the task when waiting)."""
        if not self._reply_live or task_id in self._boxes:
            # The id is live in another handle of this App (a second send of a task id):
            # its box stays, and this send reads.
            return None
        box = Mailbox(self)
        self._boxes[task_id] = box
        return box

    async def ensure_reply(self) -> None:
        """Subscribe to the reply channel (once per App)."""
        while True:
            if self.reply_channel not in self._watches:
                await self._add(self.reply_channel, Watch())
                return
            if await self._confirmed(self.reply_channel):
                return

    async def _add(self, channel: str, w: Watch) -> None:
        while True:
            watchers = self._watches.get(channel)
            if watchers is None:
                await self._subscribe_first(channel, w)
                return
            watchers.add(w)
            try:
                if await self._confirmed(channel):
                    return
            except BaseException:
                self._leave_later(channel, w)
                raise

    async def _confirmed(self, channel: str) -> bool:
        """Wait until a channel another waiter subscribes is confirmed; False: that
        waiter gave up before it subscribed, and the caller starts again."""
        confirm = self._confirm.get(channel)
        if confirm is not None:
            try:
                await asyncio.shield(confirm)
            except _StartAgain:
                return False
        return True

    async def _subscribe_first(self, channel: str, w: Watch) -> None:
        """Subscribe to a channel nobody watches yet; waiters that join meanwhile wait
        for the same confirmation."""
        self._watches[channel] = {w}
        confirm = asyncio.get_running_loop().create_future()
        self._confirm[channel] = confirm
        sent = False
        try:
            # redis-py's PubSub opens its connection on first use; two concurrent first
            # subscribes would each open one and the reader would hear only the last.
            async with self._cmd_lock:
                if self._pubsub is None and self._pick is not None:
                    old, self._redis = self._redis, await self._pick()  # a live node
                    await old.aclose()
                pubsub = self._ensure_reader()
                sent = True  # from here on the SUBSCRIBE may be on its way
                await keep_cancel(self._subscribe(pubsub, channel))
            # Read the state only once Redis confirms the subscription, so a result that
            # lands in between is seen either by the read or by the notification.
            await asyncio.shield(confirm)
        except BaseException:
            if not sent and not confirm.done():
                # Nothing subscribed: the waiters that joined meanwhile start again. (A
                # confirmation can come first: the reply to an earlier waiter's SUBSCRIBE
                # of the channel, which its joiners took as theirs: then subscribe.)
                self._watches.pop(channel, None)
                self._confirm.pop(channel, None)
                confirm.set_exception(_StartAgain())
                confirm.exception()  # retrieved: maybe nobody joined
            else:
                # Cancelled as the SUBSCRIBE went out, or before: send it (again), so the
                # joiners get their confirmation, then leave as a waiter would. The reply
                # channel stays, as it does for the App's life.
                self._later(self._subscribe_again(channel, w, channel != self.reply_channel))
            raise

    async def _subscribe_again(self, channel: str, w: Watch, leave: bool) -> None:
        try:
            async with self._cmd_lock:
                if channel in self._watches and self._pubsub is not None:
                    await self._subscribe(self._pubsub, channel)
        except _GONE:
            pass  # lost: the reconnect subscribes every watched channel
        if leave:
            await self._remove(channel, w)

    def _leave_later(self, channel: str, w: Watch) -> None:
        """`_remove`, for a waiter that cannot wait for it (it was cancelled)."""
        self._later(self._remove(channel, w))

    def _later(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._leaving_tasks.add(task)
        task.add_done_callback(self._leaving_tasks.discard)

    async def _remove(self, channel: str, w: Watch) -> None:
        watchers = self._watches.get(channel)
        if watchers is None:
            return
        watchers.discard(w)
        if watchers:
            return
        del self._watches[channel]
        self._confirm.pop(channel, None)
        if self._pubsub is not None:
            try:
                async with self._cmd_lock:
                    if self._sharded:
                        self._leaving[channel] += 1
                        await self._pubsub.sunsubscribe(channel)
                    else:
                        await self._pubsub.unsubscribe(channel)
            except _GONE:
                pass  # the reconnect drops it anyway

    async def _remark(self) -> None:
        """Mark every watched task again (after a reconnect)."""
        if self._mark is None:
            return
        for channel in [c for c in self._marked if c not in self._watches]:
            del self._marked[channel]
        # Many at a time, not one round trip each: every waiter hears RECONNECTED only
        # once all are marked, and a client may watch thousands of tasks.
        ids = list(self._marked.values())
        for start in range(0, len(ids), self._marks_at_once):
            chunk = ids[start : start + self._marks_at_once]
            done = await asyncio.gather(*map(self._mark, chunk), return_exceptions=True)
            for task_id, res in zip(chunk, done, strict=True):
                if isinstance(res, BaseException):  # the reader must live on
                    log.warning("cannot mark task %s watched again (%s)", task_id, res)

    def _ensure_reader(self) -> PubSub:
        if self._pubsub is None:
            self._pubsub = self._redis.pubsub()
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(
                self._read(self._pubsub), name="aiotasks-notifier"
            )
        return self._pubsub

    async def _next(
        self, pubsub: PubSub
    ) -> tuple[dict[str, Any] | None, str | BaseException | _Refused | None]:
        """The next message (None: none yet), or why the subscription is gone: a lost
        connection's error, or a message ("" when that needs no warning)."""
        try:
            return await pubsub.get_message(timeout=None), None
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            return None, exc
        except ResponseError as exc:
            # A refused (S)SUBSCRIBE: MOVED (a node's slot map behind a move),
            # CLUSTERDOWN, LOADING, NOPERM... Subscribe again, on the node asked anew.
            return None, _Refused(exc)
        except RuntimeError:
            # redis-py's "pubsub connection not set": nothing subscribed yet (wait),
            # or the first subscribe could not connect (as good as a lost connection).
            if not self._watches or self._cmd_lock.locked():
                await asyncio.sleep(0.01)
                return None, None
            return None, ""

    async def _read(self, pubsub: PubSub) -> None:
        backoff = Backoff(start=0.05, cap=2.0)
        lost = False
        down = False  # the connection was lost, and "reconnected" is not said yet
        while True:
            msg, gone = await self._next(pubsub)
            if gone is None:
                if msg is not None:
                    self._dispatch(msg)
                    if msg["type"] != "sunsubscribe":
                        backoff.reset()  # a working subscription, not one refused again
                if not self._dropped:
                    continue
                # The slot moved: its new owner's shard is where its messages go now.
                self._dropped = False
                gone = "the namespace's slot moved; subscribing on its new owner"
            self._reply_live = False  # from here on, a reply may be missed
            self._say_gone(gone, lost)
            lost = True
            down = down or isinstance(gone, BaseException) or gone == ""
            await asyncio.sleep(backoff.next())
            try:
                pubsub = await self._reconnect(pubsub)
            except _GONE:
                continue
            if down:  # not after a refusal only: the connection was never lost
                self._say_back()
                down = False
            lost = False
            self.reconnects += 1
            self._broadcast((RECONNECTED, None, None))

    def _say_gone(self, gone: str | BaseException | _Refused, again: bool) -> None:
        """Log why the subscription is gone: once per loss (`again`: said already), or
        through the worker's Outage, which says it once for all its loops."""
        if isinstance(gone, BaseException):
            if self.outage is not None:
                self.outage.failed("result listener", gone)
            elif not again:
                log.warning("lost Redis (%s); reconnecting with backoff", gone)
        elif isinstance(gone, _Refused):
            self._say_refused(gone.exc)
        elif gone and not again:
            log.warning("%s", gone)

    def _say_refused(self, exc: ResponseError) -> None:
        """Say a refused subscription once (again every REMIND s while it lasts): a
        NOPERM at ERROR, naming what the refused channels bring; MOVED, LOADING and the
        like, which a retry gets past, at WARNING."""
        key, now = f"{type(exc).__name__}: {exc}", time.monotonic()
        said = self._refusal_said
        if said is not None and said[0] == key and now - said[1] < REMIND:
            log.debug("Redis refused a subscription again (%s)", exc)
            return
        self._refusal_said = (key, now)
        named = [f"{c} ({self._why[c]})" for c in sorted(self._watches) if c in self._why]
        others = len(self._watches) - len(named)
        if others:
            named.append(f"{others} other channel{'s' * (others != 1)}")
        err = refusal(self._url, exc, "a subscription to " + (", ".join(named) or "a channel"))
        level = logging.ERROR if err.code == "NOPERM" else logging.WARNING
        log.log(level, "%s; trying again", err)

    def _say_back(self) -> None:
        self._refusal_said = None  # a refusal that comes back is news again
        if self.outage is not None:
            self.outage.ok("result listener")
        else:
            log.warning("reconnected to Redis")

    async def _reconnect(self, pubsub: PubSub) -> PubSub:
        """Connect again (on a cluster, to a node that answers), subscribe to every
        channel still watched and mark their tasks again; the pubsub now in use."""
        async with self._cmd_lock:
            if self._pick is not None:
                # Another node may answer where this one died.
                old, self._redis = self._redis, await self._pick()
                await cast(Any, pubsub).aclose()
                await old.aclose()
                pubsub = self._pubsub = self._redis.pubsub()
            await cast(Any, pubsub).connect()
            if self._watches:
                await self._subscribe(pubsub, *self._watches)
        await self._remark()
        return pubsub

    async def _subscribe(self, pubsub: PubSub, *channels: str) -> None:
        if self._sharded:
            await pubsub.ssubscribe(*channels)
        else:
            await pubsub.subscribe(*channels)

    def _dispatch(self, msg: dict[str, Any]) -> None:
        channel = msg["channel"]
        channel = channel.decode() if isinstance(channel, bytes) else channel
        kind = msg["type"]
        if kind in ("message", "smessage"):
            data = msg["data"]
            data = data if isinstance(data, bytes) else str(data).encode()
            if channel == self.reply_channel:
                self._reply(data)
                return
            note: Note = (data.decode(), None, None)
            for w in self._watches.get(channel, ()):
                w.put(note)
        elif kind in ("subscribe", "ssubscribe"):
            self._subscribed(channel)
        elif kind == "sunsubscribe":
            if self._leaving[channel] > 0:
                self._leaving[channel] -= 1
                if not self._leaving[channel]:
                    del self._leaving[channel]
            elif channel in self._watches:
                self._dropped = True  # not asked for: the server moved the channel's slot

    def _subscribed(self, channel: str) -> None:
        if channel == self.reply_channel:
            self._reply_live = True
        confirm = self._confirm.pop(channel, None)
        if confirm is not None and not confirm.done():
            confirm.set_result(None)

    def _reply(self, data: bytes) -> None:
        if data[:1] == b"\n":
            # A batch: "\n" + msgpack [[id, state(, content type, result bytes)], ...]
            try:
                batch = msgpack.unpackb(data[1:], raw=True)
            except Exception:
                log.warning("notifier: unreadable reply batch of %d bytes", len(data))
                return
            for item in batch:
                if isinstance(item, list) and len(item) in (2, 4):
                    self._wake(item[0].decode(), item[1].decode(), *item[2:])
            return
        # "<id>\n<state>" or "<id>\n<state>\n<content type>\n<result bytes>"
        parts = data.split(b"\n", 3)
        if len(parts) == 4:
            self._wake(parts[0].decode(), parts[1].decode(), parts[2], parts[3])
        elif len(parts) == 2:
            self._wake(parts[0].decode(), parts[1].decode())

    def _wake(
        self, task_id: str, state: str, ct: bytes | None = None, data: bytes | None = None
    ) -> None:
        note: Note = (state, ct, data)
        box = self._boxes.get(task_id)
        if box is not None:
            box.put(note)
        watchers = self._replies.get(task_id)
        if watchers:
            for w in watchers:
                w.put(note)

    def _broadcast(self, note: Note) -> None:
        for box in list(self._boxes.values()):
            box.put(note)
        for watchers in [*self._watches.values(), *self._replies.values()]:
            for w in watchers:
                w.put(note)
        for confirm in self._confirm.values():
            if not confirm.done():
                confirm.set_result(None)
        self._confirm.clear()

    async def close(self) -> None:
        """Stop the reader and close the connection."""
        self._reply_live = False
        for box in list(self._boxes.values()):  # nothing reaches them from now on
            box.put((RECONNECTED, None, None))
        if self._reader is not None:
            await cancel_and_wait([self._reader])
            self._reader = None
        await cancel_and_wait(list(self._leaving_tasks))
        if self._pubsub is not None:
            await cast(Any, self._pubsub).aclose()
            self._pubsub = None
        await self._redis.aclose()
