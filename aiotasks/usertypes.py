"""Types the serializers learn beyond their own: records as their fields, registered types.

- A dataclass instance travels as a map of its fields, a pydantic model as its
  `model_dump(mode="json")`, an Enum member as its value. A worker rebuilds them from
  the task's annotations (adapt.py); without an annotation the task gets the plain data.
- `register_type(cls, encode=..., decode=..., name=...)` teaches both serializers
  another type. msgpack carries it as ext type 64 holding `[name, encoded value]`, or
  as its own ext type when registered with `code=` (65..127); json as
  `{"__t": name, "v": encoded value}`. Ext codes 64..127 are reserved for these;
  aiotasks' own are below 64 (docs/protocol.md). Register it in every process that
  sends or runs the tasks (the module that defines the tasks is a good place).
- Anything else is refused with a hint naming the usual fix (numpy, pandas, attrs...).
"""

from __future__ import annotations

import dataclasses
import enum
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: msgpack ext type of a registered type sent by name: `[name, value]`.
EXT_NAMED = 64
#: ext type codes a registered type may own (`register_type(..., code=...)`).
USER_CODES = range(65, 128)
#: json tags of aiotasks' own types (codec.py): no registered type may take them.
RESERVED_NAMES = frozenset(
    {"datetime", "date", "time", "timedelta", "uuid", "decimal", "bytes", "set", "frozenset"}
)


@dataclass(frozen=True, slots=True)
class UserType:
    """A registered type: how to turn it into encodable data and back."""

    cls: type
    name: str
    encode: Callable[[Any], Any]
    decode: Callable[[Any], Any]
    code: int | None


_by_class: dict[type, UserType] = {}
_by_name: dict[str, UserType] = {}
_by_code: dict[int, UserType] = {}


def register_type(
    cls: type,
    *,
    encode: Callable[[Any], Any],
    decode: Callable[[Any], Any],
    name: str | None = None,
    code: int | None = None,
) -> None:
    """Teach both serializers (msgpack and json) a type of your own.

    `encode(obj)` returns data the serializer already knows (str, int, list, dict...);
    `decode(data)` rebuilds the object. Register the type in every process that sends or
    runs tasks using it (senders, workers), under the same name.

    Args:
        cls: the type; its subclasses are encoded the same way.
        encode: object -> encodable data.
        decode: that data -> object.
        name: the name on the wire (default `module.qualname`), shared by every process.
        code: a msgpack ext type code of its own, 65..127, for a smaller encoding;
            by default the type travels under code 64 with its name.

    Raises:
        ValueError: the name or code is taken by another type, or out of range.
    """
    name = name or f"{cls.__module__}.{cls.__qualname__}"
    if not name or name in RESERVED_NAMES:
        raise ValueError(f"register_type: the name {name!r} is reserved or empty")
    if code is not None and code not in USER_CODES:
        raise ValueError(f"register_type: code must be in 65..127, got {code!r}")
    taken = _by_name.get(name)
    if taken is not None and _qualified(taken.cls) != _qualified(cls):
        raise ValueError(f"register_type: {name!r} already names {_qualified(taken.cls)}")
    if code is not None and code in _by_code and _by_code[code].name != name:
        raise ValueError(f"register_type: code {code} already encodes {_by_code[code].name!r}")
    if taken is not None:
        _unregister(taken)
    user = UserType(cls, name, encode, decode, code)
    _by_class[cls] = _by_name[name] = user
    if code is not None:
        _by_code[code] = user


def _unregister(user: UserType) -> None:
    _by_class.pop(user.cls, None)
    _by_name.pop(user.name, None)
    if user.code is not None:
        _by_code.pop(user.code, None)


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def exact(obj: Any) -> UserType | None:
    """The registered type of exactly `obj`'s class (checked before aiotasks' own types)."""
    return _by_class.get(type(obj)) if _by_class else None


def registered(obj: Any) -> UserType | None:
    """The registered type `obj` is an instance of, subclasses included."""
    user = exact(obj)
    if user is None:
        for candidate in _by_class.values():
            if isinstance(obj, candidate.cls):
                return candidate
    return user


def by_name(name: str) -> UserType:
    """The type registered under `name`; LookupError naming the fix when there is none."""
    try:
        return _by_name[name]
    except KeyError:
        raise LookupError(
            f"no type registered as {name!r} in this process "
            "(call aiotasks.register_type for it here too)"
        ) from None


def registered_name(name: str) -> UserType | None:
    """The type registered under `name`, if any (a json tag nobody registered stays a dict)."""
    return _by_name.get(name)


def by_code(code: int) -> UserType | None:
    """The type registered with its own ext code, if any."""
    return _by_code.get(code)


def is_model(obj: Any) -> bool:
    """Whether `obj` is a pydantic (v2) model instance, without importing pydantic."""
    pydantic = sys.modules.get("pydantic")
    return pydantic is not None and isinstance(obj, pydantic.BaseModel)


def is_record(obj: Any) -> bool:
    """A dataclass instance or a pydantic model: sent as its fields."""
    return (dataclasses.is_dataclass(obj) and not isinstance(obj, type)) or is_model(obj)


def fields_of(obj: Any) -> Any:
    """The plain data a record or Enum member travels as; TypeError with a hint otherwise."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        # Shallow: the serializer meets nested records and calls back for each.
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if is_model(obj):
        return obj.model_dump(mode="json")
    if isinstance(obj, enum.Enum):
        return obj.value
    raise unencodable(obj)


def check_set(members: Any) -> None:
    """Refuse a set of records: their fields decode as dicts, which no set can hold."""
    for m in members:
        if is_record(m):
            raise TypeError(
                f"a set of {type(m).__name__} records cannot be rebuilt (each travels as "
                "a dict, which is unhashable): send a list, annotated list[...] or set[...]"
            )


def unencodable(obj: Any) -> TypeError:
    """The error for a value no serializer knows, with the usual fix."""
    cls = type(obj)
    if isinstance(obj, int):  # msgpack calls back for an integer beyond 64 bits
        return TypeError("cannot serialize object of type int")
    return TypeError(f"cannot serialize object of type {_qualified(cls)}: {hint(obj)}")


def hint(obj: Any) -> str:
    """How to send a value of this kind."""
    cls = type(obj)
    root = (cls.__module__ or "").partition(".")[0]
    if root == "numpy":
        if getattr(obj, "ndim", 0):
            return "a numpy array: send array.tolist(), or register_type(numpy.ndarray, ...)"
        return "a numpy scalar: send value.item() (a plain int/float/bool)"
    if root == "pandas":
        return "a pandas object: send .to_dict() or .tolist(), or register_type(...) for it"
    if hasattr(cls, "__attrs_attrs__"):
        return "an attrs instance: send attrs.asdict(value), or make the class a dataclass"
    if isinstance(obj, type):
        return "a class, not an instance: send its name, or an instance of it"
    if callable(obj):
        return "a function or other callable: send its name or a signature instead"
    return (
        "make it a dataclass (rebuilt from the task's annotation), or teach it to the "
        "serializers with aiotasks.register_type(cls, encode=..., decode=...)"
    )
