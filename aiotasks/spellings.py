"""Celery's in-place callback spellings, shared by signatures and canvases.

`link()` and `link_error()` add to the `link`/`link_error` send options and return
what they added; `on_error()` does what link_error() does and returns the signature or
canvas itself, so that `add.s(2, 2).on_error(alert.s()).delay()` sends `add`.
"""

from __future__ import annotations

from typing import Any, Self, TypeVar

from .message import check_options
from .nodes import as_list

C = TypeVar("C")


class Links:
    """link() and link_error() over a mutable `options` dict (changed in place, as
    Celery's are)."""

    __slots__ = ()
    options: dict[str, Any]

    def link(self, callback: C) -> C:
        """Add a callback (the `link` option), called with the final result; returns it."""
        self._add_option("link", callback)
        return callback

    def link_error(self, errback: C) -> C:
        """Add an errback (the `link_error` option), called if it fails for good;
        returns it."""
        self._add_option("link_error", errback)
        return errback

    def _add_option(self, name: str, value: Any) -> None:
        items = as_list(self.options.get(name))
        check_options({name: [*items, value]})
        self.options[name] = [*items, value]


class OnError(Links):
    """on_error(): link_error() that returns the signature or canvas itself (a chord has
    none: its `on_error` is the chord's errback)."""

    __slots__ = ()

    def on_error(self, errback: Any) -> Self:
        """Add an errback as link_error() does; returns this signature or canvas."""
        self._add_option("link_error", errback)
        return self
