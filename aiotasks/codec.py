"""Serializers (msgpack, json) and optional compression, behind one small Protocol.

Both serializers round-trip datetime, date, time, timedelta, UUID, Decimal, bytes,
set and frozenset (tuples come back as lists, as in every JSON-like format, except
inside a set, where they stay tuples). Dataclasses, pydantic models, Enum members and
types given to `register_type` are handled by usertypes.py.
The content type written on the wire is `<serializer>[+<compression>]`.
"""

from __future__ import annotations

import base64
import bz2
import json
import lzma
import math
import zlib
from collections.abc import Callable
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, Protocol
from uuid import UUID

import msgpack  # type: ignore[import-untyped]

from . import usertypes
from .errors import SerializationError

# msgpack extension type codes (documented in docs/protocol.md).
EXT_DATETIME = 1  # ISO 8601 text, with offset when aware
EXT_DATE = 2  # ISO 8601 date text
EXT_UUID = 3  # 16 raw bytes
EXT_DECIMAL = 4  # decimal text
EXT_SET = 5  # msgpack array of the members
EXT_TIME = 6  # ISO 8601 time text
EXT_TIMEDELTA = 7  # msgpack array [days, seconds, microseconds]
EXT_FROZENSET = 8  # msgpack array of the members


class Serializer(Protocol):
    """Turns Python values into bytes and back."""

    name: str

    def dumps(self, value: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


def _ext_default(obj: Any) -> Any:
    user = usertypes.exact(obj)  # before our own: a registered datetime subclass wins
    if user is None:
        ext = _own_ext(obj)
        if ext is not None:
            return ext
        user = usertypes.registered(obj)
        if user is None:
            return usertypes.fields_of(obj)  # a record as its fields, else TypeError + hint
    return _user_ext(user, obj)


def _own_ext(obj: Any) -> msgpack.ExtType | None:
    if isinstance(obj, datetime):
        return msgpack.ExtType(EXT_DATETIME, obj.isoformat().encode())
    if isinstance(obj, date):
        return msgpack.ExtType(EXT_DATE, obj.isoformat().encode())
    if isinstance(obj, time):
        return msgpack.ExtType(EXT_TIME, obj.isoformat().encode())
    if isinstance(obj, timedelta):
        return msgpack.ExtType(EXT_TIMEDELTA, _packb([obj.days, obj.seconds, obj.microseconds]))
    if isinstance(obj, UUID):
        return msgpack.ExtType(EXT_UUID, obj.bytes)
    if isinstance(obj, Decimal):
        return msgpack.ExtType(EXT_DECIMAL, str(obj).encode())
    if isinstance(obj, frozenset):
        usertypes.check_set(obj)
        return msgpack.ExtType(EXT_FROZENSET, _packb(list(obj)))
    if isinstance(obj, set):
        usertypes.check_set(obj)
        return msgpack.ExtType(EXT_SET, _packb(list(obj)))
    return None


def _user_ext(user: usertypes.UserType, obj: Any) -> msgpack.ExtType:
    if user.code is not None:
        return msgpack.ExtType(user.code, _packb(user.encode(obj)))
    return msgpack.ExtType(usertypes.EXT_NAMED, _packb([user.name, user.encode(obj)]))


def _hashable(value: Any) -> Any:
    """A set member as it was sent: a tuple came back as a list, which no set can hold."""
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    return value


def _timedelta(data: bytes) -> timedelta:
    days, seconds, micros = _unpackb(data)
    return timedelta(days=days, seconds=seconds, microseconds=micros)


_OWN_EXT: dict[int, Callable[[bytes], Any]] = {
    EXT_DATETIME: lambda data: datetime.fromisoformat(data.decode()),
    EXT_DATE: lambda data: date.fromisoformat(data.decode()),
    EXT_TIME: lambda data: time.fromisoformat(data.decode()),
    EXT_TIMEDELTA: _timedelta,
    EXT_UUID: lambda data: UUID(bytes=data),
    EXT_DECIMAL: lambda data: Decimal(data.decode()),
    EXT_SET: lambda data: {_hashable(m) for m in _unpackb(data)},
    EXT_FROZENSET: lambda data: frozenset(_hashable(m) for m in _unpackb(data)),
}


def _ext_hook(code: int, data: bytes) -> Any:
    own = _OWN_EXT.get(code)
    if own is not None:
        return own(data)
    if code == usertypes.EXT_NAMED:
        name, value = _unpackb(data)
        return usertypes.by_name(name).decode(value)
    user = usertypes.by_code(code)
    if user is not None:
        return user.decode(_unpackb(data))
    # Never handed to a task as a raw ExtType: its message is refused (dead-lettered).
    raise ValueError(
        f"msgpack extension type {code} is not registered in this process "
        "(aiotasks.register_type(..., code=...))"
    )


def _why(exc: BaseException) -> str:
    """An error's message, or its class name when it has none (msgpack's StackError)."""
    return str(exc) or type(exc).__name__


def _packb(value: Any) -> bytes:
    return msgpack.packb(value, default=_ext_default, use_bin_type=True, datetime=False)  # type: ignore[no-any-return]


def _unpackb(data: bytes) -> Any:
    # timestamp=3: msgpack's own timestamp (ext -1, what most other languages' libraries
    # make of a date) is read as an aware UTC datetime, as ext 1 is.
    return msgpack.unpackb(data, raw=False, ext_hook=_ext_hook, strict_map_key=False, timestamp=3)


class MsgpackSerializer:
    """The default: compact and fast."""

    name = "msgpack"

    def __init__(self) -> None:
        # A reused Packer skips per-call setup on the hot path.
        self._packer = msgpack.Packer(default=_ext_default, use_bin_type=True, datetime=False)

    def dumps(self, value: Any) -> bytes:
        try:
            return self._packer.pack(value)  # type: ignore[no-any-return]
        except Exception as exc:
            # The packer keeps a partial buffer after an error; start clean.
            self._packer.reset()
            raise SerializationError(f"cannot encode with msgpack: {exc}") from exc

    def loads(self, data: bytes) -> Any:
        try:
            return _unpackb(data)
        except Exception as exc:
            raise SerializationError(f"cannot decode msgpack: {_why(exc)}") from exc


def _json_default(obj: Any) -> Any:
    user = usertypes.exact(obj)
    if user is None:
        tagged = _own_tag(obj)
        if tagged is not None:
            return tagged
        user = usertypes.registered(obj)
        if user is None:
            return usertypes.fields_of(obj)
    return {"__t": user.name, "v": user.encode(obj)}


def _own_tag(obj: Any) -> dict[str, Any] | None:
    if isinstance(obj, datetime):
        return {"__t": "datetime", "v": obj.isoformat()}
    if isinstance(obj, date):
        return {"__t": "date", "v": obj.isoformat()}
    if isinstance(obj, time):
        return {"__t": "time", "v": obj.isoformat()}
    if isinstance(obj, timedelta):
        return {"__t": "timedelta", "v": [obj.days, obj.seconds, obj.microseconds]}
    if isinstance(obj, UUID):
        return {"__t": "uuid", "v": str(obj)}
    if isinstance(obj, Decimal):
        return {"__t": "decimal", "v": str(obj)}
    if isinstance(obj, bytes):
        return {"__t": "bytes", "v": base64.b64encode(obj).decode()}
    if isinstance(obj, frozenset):
        usertypes.check_set(obj)
        return {"__t": "frozenset", "v": list(obj)}
    if isinstance(obj, set):
        usertypes.check_set(obj)
        return {"__t": "set", "v": list(obj)}
    return None


_JSON_DECODERS: dict[str, Callable[[Any], Any]] = {
    "datetime": datetime.fromisoformat,
    "date": date.fromisoformat,
    "time": time.fromisoformat,
    "timedelta": lambda v: timedelta(days=v[0], seconds=v[1], microseconds=v[2]),
    "uuid": UUID,
    "decimal": Decimal,
    "bytes": base64.b64decode,
    "set": lambda v: {_hashable(m) for m in v},
    "frozenset": lambda v: frozenset(_hashable(m) for m in v),
}


def _json_hook(obj: dict[str, Any]) -> Any:
    tag = obj.get("__t")
    if isinstance(tag, str) and len(obj) == 2 and "v" in obj:
        if tag in _JSON_DECODERS:
            return _JSON_DECODERS[tag](obj["v"])
        user = usertypes.registered_name(tag)
        if user is not None:
            return user.decode(obj["v"])
    return obj


def _not_json(name: str) -> Any:
    # NaN and Infinity are not JSON (RFC 8259): refused on the way in, as on the way out,
    # so a task never runs only to fail on its own result.
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: as Infinity
        raise ValueError(f"{text[:40]} is out of a float's range")
    return value


class JsonSerializer:
    """Readable on the wire; typed values are tagged as {"__t": type, "v": value}."""

    name = "json"

    def dumps(self, value: Any) -> bytes:
        try:
            # NaN and Infinity are not JSON: other languages' parsers refuse them.
            text = json.dumps(value, default=_json_default, separators=(",", ":"), allow_nan=False)
            return text.encode()
        except Exception as exc:
            # RecursionError: a structure too deep (or cyclic) for the json encoder; any
            # other: a registered type's own encode failed.
            hint = " (NaN or Infinity: use msgpack)" if "JSON compliant" in str(exc) else ""
            raise SerializationError(f"cannot encode with json: {exc}{hint}") from exc

    def loads(self, data: bytes) -> Any:
        try:
            return json.loads(
                data, object_hook=_json_hook, parse_constant=_not_json, parse_float=_finite
            )
        except Exception as exc:
            raise SerializationError(f"cannot decode json: {_why(exc)}") from exc


Decompress = Callable[[bytes, int], bytes]


def _bounded(make: Callable[[], Any]) -> Decompress:
    """A decompressor that refuses output over `limit` bytes (a decompression bomb)."""

    def decompress(data: bytes, limit: int) -> bytes:
        d = make()
        out = d.decompress(data, limit + 1)
        if len(out) > limit:
            raise SerializationError(f"decompressed body exceeds max_message_size ({limit} bytes)")
        return out  # type: ignore[no-any-return]

    return decompress


def _zstd() -> tuple[Callable[[bytes], bytes], Decompress]:
    try:
        import zstandard  # type: ignore[import-not-found]
    except ImportError as exc:  # pragma: no cover - depends on the optional extra
        raise SerializationError(
            "compression='zstd' needs: pip install 'aiotasks-streams[zstd]'"
        ) from exc

    def decompress(data: bytes, limit: int) -> bytes:
        with zstandard.ZstdDecompressor().stream_reader(data) as reader:
            out: bytes = reader.read(limit + 1)
        if len(out) > limit:
            raise SerializationError(f"decompressed body exceeds max_message_size ({limit} bytes)")
        return out

    return zstandard.ZstdCompressor().compress, decompress


_COMPRESSORS: dict[str, tuple[Callable[[bytes], bytes], Decompress]] = {
    "zlib": (zlib.compress, _bounded(zlib.decompressobj)),
    "lzma": (lzma.compress, _bounded(lzma.LZMADecompressor)),
    "bz2": (bz2.compress, _bounded(bz2.BZ2Decompressor)),
}

SERIALIZERS: dict[str, Serializer] = {"msgpack": MsgpackSerializer(), "json": JsonSerializer()}

#: Compression names a content type may carry.
COMPRESSIONS = ("zlib", "lzma", "bz2", "zstd")

#: Largest body (before and after decompression) a decode accepts by default.
MAX_SIZE = 64 * 1024 * 1024


def get_serializer(name: str) -> Serializer:
    """The serializer registered under `name` ("msgpack" or "json")."""
    try:
        return SERIALIZERS[name]
    except KeyError:
        raise SerializationError(f"unknown serializer {name!r}; use 'msgpack' or 'json'") from None


def _compressor(name: str) -> tuple[Callable[[bytes], bytes], Decompress]:
    if name == "zstd":
        return _zstd()
    try:
        return _COMPRESSORS[name]
    except KeyError:
        raise SerializationError(
            f"unknown compression {name!r}; use zlib, lzma, bz2 or zstd"
        ) from None


def encode(
    value: Any,
    serializer: str,
    compression: str | None = None,
    min_size: int = 1024,
    max_size: int = MAX_SIZE,
) -> tuple[bytes, str]:
    """Encode `value`; returns the bytes and their content type.

    Raises:
        SerializationError: the value cannot be encoded, or it takes more than
            `max_size` bytes before compression (a reader would refuse to inflate it).
    """
    data = get_serializer(serializer).dumps(value)
    if len(data) > max_size:
        raise SerializationError(f"{len(data)} bytes encoded, over max_message_size ({max_size})")
    if compression and len(data) >= min_size:
        return _compressor(compression)[0](data), f"{serializer}+{compression}"
    return data, serializer


def decode(data: bytes, content_type: str, max_size: int = MAX_SIZE) -> Any:
    """Decode bytes written by `encode` under `content_type`, at most `max_size` of them
    after decompression."""
    serializer, _, compression = content_type.partition("+")
    if compression:
        try:
            data = _compressor(compression)[1](data, max_size)
        except SerializationError:
            raise
        except Exception as exc:
            raise SerializationError(f"cannot decompress {compression}: {_why(exc)}") from exc
    return get_serializer(serializer).loads(data)
