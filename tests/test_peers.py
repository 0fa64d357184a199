"""A worker warns when its namespace is served by workers registering other tasks."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest

from aiotasks import App


def two_apps(make_app: Callable[..., App], first: list[str], second: list[str]) -> list[App]:
    apps = [make_app(), make_app()]
    for a, names in zip(apps, (first, second), strict=True):
        for name in names:
            a.task(name=name)(_noop)
    return apps


async def _noop() -> None:
    return None


def peer_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "registering other tasks" in r.getMessage()]


async def test_a_second_app_with_other_tasks_on_the_namespace_is_warned_about_once(
    make_app: Callable[..., App], worker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    one, two = two_apps(make_app, ["mail.send", "shared"], ["shared", "report.build"])
    with caplog.at_level(logging.WARNING, logger="aiotasks"):
        first = await worker(one)
        assert peer_warnings(caplog) == []  # alone on the namespace
        second = await worker(two)
    (record,) = peer_warnings(caplog)
    assert record.levelno == logging.WARNING and record.name == "aiotasks.worker"
    message = record.getMessage()
    assert f"worker {second.name}: namespace {one.settings.namespace!r}" in message
    assert first.name in message and "queue(s) default" in message
    assert "Not on every worker: report.build." in message
    assert "Not on this worker: mail.send." in message
    fields: Any = record
    assert fields.not_on_every_worker == ["report.build"]
    assert fields.not_on_this_worker == ["mail.send"]
    assert fields.peers == [first.name] and fields.queues == ["default"]


async def test_same_tasks_or_separate_queues_are_not_warned_about(
    make_app: Callable[..., App], worker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    one, two = two_apps(make_app, ["a", "b"], ["b", "a"])
    mail, reports = two_apps(make_app, ["mail.send"], ["report.build"])
    with caplog.at_level(logging.WARNING, logger="aiotasks"):
        await worker(one)
        await worker(two)  # the same tasks, registered in another order
        await worker(mail, queues=["mail"])
        await worker(reports, queues=["reports"])  # a queue of its own: nothing is taken
    assert peer_warnings(caplog) == []
