"""Signing: an HMAC-SHA256 over a message's envelope, so that a worker with a key runs
only what an App holding that key sent.

The signature covers the entry fields in `contract.SIGNED_FIELDS` (everything but
`err`, which Lua fills in on an errback, and `sig` itself), as the bytes Redis stores:
`b"aiotasks/2\\n"` then `name=value\\n` for each present field, in that order. Keys rotate
by giving several: the first signs, any verifies.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from typing import Any

from .contract import PROTOCOL, SIGNED_FIELDS

_PREFIX = f"aiotasks/{PROTOCOL}\n".encode()


def _canonical(pairs: Iterable[tuple[str, bytes]]) -> bytes:
    return _PREFIX + b"".join(name.encode() + b"=" + value + b"\n" for name, value in pairs)


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, int):
        return str(value).encode()
    return str(value).encode()


def sign(key: bytes, wire: Mapping[str, Any]) -> str:
    """The signature of a task record's wire map (hex)."""
    pairs = ((f, _as_bytes(wire[f])) for f in SIGNED_FIELDS if wire.get(f) not in (None, ""))
    return hmac.new(key, _canonical(pairs), hashlib.sha256).hexdigest()


def verify(keys: Iterable[bytes], entry: Mapping[bytes, bytes]) -> bool:
    """Whether a stream entry's `sig` was made with one of `keys` over its fields."""
    given = entry.get(b"sig")
    if not given:
        return False
    given = given.lower()  # hex of either case (docs/protocol.md)
    pairs = [(f, entry[f.encode()]) for f in SIGNED_FIELDS if entry.get(f.encode())]
    body = _canonical(pairs)
    return any(
        hmac.compare_digest(hmac.new(k, body, hashlib.sha256).hexdigest().encode(), given)
        for k in keys
    )
