"""Workers of one namespace that register different tasks.

Two Apps on one namespace (the default `aiotasks`, say) that serve a queue together take
each other's tasks: a task sent to that queue ends `UnknownTask` whenever a worker without
it takes it. Each worker publishes its task names in its description; a starting worker
compares them with the live workers that share a queue with it and warns once.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from .client import Client

log = logging.getLogger("aiotasks.worker")

#: Names listed in the warning before "and N more".
SHOWN = 10


def _own(names: Iterable[str]) -> frozenset[str]:
    """The app's own task names, without the built-ins (`aiotasks.*`), which differ by
    version: a warning at every upgrade would teach operators to ignore it. (A built-in
    an older worker lacks, `aiotasks.map` before 0.2, is dead-lettered there as
    UnknownTask: docs/protocol.md.)"""
    return frozenset(n for n in names if not n.startswith("aiotasks."))


def describe(names: Iterable[str]) -> dict[str, str]:
    """The fields a worker adds to its description: its task names, and their digest."""
    text = json.dumps(sorted(_own(names)))
    return {"tasks": text, "tasks_digest": hashlib.sha1(text.encode()).hexdigest()[:16]}


@dataclass(frozen=True, slots=True)
class Peer:
    """A live worker sharing a queue with this one, and its task names."""

    name: str
    queues: frozenset[str]
    tasks: frozenset[str]


async def live_peers(client: Client, me: str, queues: Collection[str]) -> list[Peer]:
    """Live workers other than `me` that serve one of `queues` and publish their tasks."""
    raw: list[bytes] = await cast(Any, client.redis).zrange(client.keys.workers, 0, -1)
    names = [n.decode() for n in raw if n.decode() != me]
    async with client.redis.pipeline(transaction=False) as pipe:
        for n in names:
            cast(Any, pipe).hmget(client.keys.worker(n), ["queues", "tasks"])
        found: list[list[bytes | None]] = await pipe.execute()
    peers = []
    for name, (raw_queues, raw_tasks) in zip(names, found, strict=True):
        if raw_queues is None or raw_tasks is None:
            continue  # expired (a dead worker), or a version that does not publish tasks
        shared = frozenset(raw_queues.decode().split(",")) & frozenset(queues)
        if shared:
            peers.append(Peer(name, shared, _own(json.loads(raw_tasks))))
    return peers


def difference(mine: Collection[str], peers: Sequence[Peer]) -> tuple[list[str], list[str]]:
    """Task names only this worker has, and names only some peer has."""
    theirs = frozenset().union(*(p.tasks for p in peers))
    every = frozenset(mine).intersection(*(p.tasks for p in peers))
    return sorted(frozenset(mine) - every), sorted(theirs - frozenset(mine))


async def warn_if_tasks_differ(
    client: Client, me: str, queues: Collection[str], mine: Collection[str]
) -> None:
    """Log one WARNING when a live worker sharing a queue registers other tasks."""
    mine = _own(mine)
    peers = [p for p in await live_peers(client, me, queues) if p.tasks != frozenset(mine)]
    if not peers:
        return
    not_everywhere, not_here = difference(mine, peers)
    shared = sorted(frozenset().union(*(p.queues for p in peers)))
    log.warning(
        "worker %s: namespace %r is also served by %d worker(s) registering other tasks, on "
        "queue(s) %s (%s). Not on every worker: %s. Not on this worker: %s. A task sent "
        "there ends UnknownTask when a worker without it takes it: give each App its own "
        "namespace, or register the same tasks in all of them",
        me,
        client.keys.namespace,
        len(peers),
        ", ".join(shared),
        ", ".join(p.name for p in peers[:SHOWN]),
        _listed(not_everywhere),
        _listed(not_here),
        extra={
            "worker": me,
            "namespace": client.keys.namespace,
            "peers": [p.name for p in peers],
            "queues": shared,
            "not_on_every_worker": not_everywhere,
            "not_on_this_worker": not_here,
        },
    )


def _listed(names: Sequence[str]) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more
