"""Worker logs: visible in an embedded worker, and structured for `--log-format json`."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from aiotasks import logs


def test_visible_errors_adds_a_stderr_handler_only_when_nothing_shows_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # as under uvicorn: root is not configured
    logger = logging.getLogger("aiotasks")
    before = list(logger.handlers)
    with logs.visible_errors():
        added = [h for h in logger.handlers if h not in before]
        assert len(added) == 1
        assert isinstance(added[0], logging.StreamHandler) and added[0].stream is sys.stderr
        assert added[0].level == logging.WARNING
    assert logger.handlers == before  # removed with the embedded worker

    monkeypatch.setattr(root, "handlers", [logging.StreamHandler(io.StringIO())])
    with logs.visible_errors():
        assert logger.handlers == before  # the host's own handler shows them already
