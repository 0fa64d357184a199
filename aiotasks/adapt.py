"""Arguments and results rebuilt into the types a task's annotations name.

A dataclass, pydantic model or Enum member travels as plain data (usertypes.py). Before
a worker calls the task, each argument whose parameter is annotated with such a type
(or a list, tuple, set, dict or `X | None` of one) is rebuilt from that data; `result()`
in a process that registered the task rebuilds its return value the same way, as
Celery 5.5's `pydantic=True` does, but from the annotations alone.

A task's hints are read once, on first use (so a class defined below the task resolves);
a task whose annotations name no such type gets `None` and costs nothing per call.
"""

from __future__ import annotations

import collections.abc as abc
import dataclasses
import enum
import inspect
import logging
import sys
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

Convert = Callable[[Any], Any]

_SEQUENCES: dict[Any, type] = {
    list: list,
    set: set,
    frozenset: frozenset,
    abc.Sequence: list,
    abc.MutableSequence: list,
    abc.Iterable: list,
    abc.Collection: list,
    abc.Set: set,
    abc.MutableSet: set,
}
_MAPPINGS = (dict, abc.Mapping, abc.MutableMapping)
_cache: dict[Any, Convert | None] = {}


def converter(tp: Any) -> Convert | None:
    """A function rebuilding plain data into `tp`, or None when `tp` needs nothing."""
    try:
        return _cache[tp]
    except KeyError:
        made = _cache[tp] = _build(tp)
        return made
    except TypeError:  # an unhashable annotation: build it every time it is asked for
        return _build(tp)


def _build(tp: Any) -> Convert | None:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return converter(args[0])
    if origin is typing.Union or origin is types.UnionType:
        return _union(args)
    if origin in _SEQUENCES:
        return _each(_SEQUENCES[origin], converter(args[0]) if args else None)
    if origin is tuple:
        return _tuple(args)
    if origin in _MAPPINGS and len(args) == 2:
        return _mapping(converter(args[0]), converter(args[1]))
    if not isinstance(tp, type):
        return None
    if dataclasses.is_dataclass(tp):
        return _Dataclass(tp)
    pydantic = sys.modules.get("pydantic")
    if pydantic is not None and issubclass(tp, pydantic.BaseModel):
        return _instance_or(tp, tp.model_validate)  # type: ignore[attr-defined]
    if issubclass(tp, enum.Enum):
        return _instance_or(tp, tp)
    return None


def _instance_or(tp: type, make: Convert) -> Convert:
    def convert(value: Any) -> Any:
        return value if isinstance(value, tp) else make(value)

    return convert


def _each(make: type, inner: Convert | None) -> Convert | None:
    if inner is None:
        return None

    def convert(value: Any) -> Any:
        if isinstance(value, list | tuple | set | frozenset):
            return make(inner(v) for v in value)
        return value

    return convert


def _tuple(args: tuple[Any, ...]) -> Convert | None:
    if len(args) == 2 and args[1] is Ellipsis:
        return _each(tuple, converter(args[0]))
    inners = [converter(a) for a in args]
    if not any(inners):
        return None

    def convert(value: Any) -> Any:
        if not isinstance(value, list | tuple) or len(value) != len(inners):
            return value
        return tuple(c(v) if c else v for c, v in zip(inners, value, strict=True))

    return convert


def _mapping(key: Convert | None, val: Convert | None) -> Convert | None:
    if key is None and val is None:
        return None

    def convert(value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        return {(key(k) if key else k): (val(v) if val else v) for k, v in value.items()}

    return convert


def _union(args: tuple[Any, ...]) -> Convert | None:
    inners = [c for c in (converter(a) for a in args if a is not type(None)) if c is not None]
    if not inners:
        return None

    def convert(value: Any) -> Any:
        if value is None:
            return None
        error: Exception | None = None
        for inner in inners:  # the first member type that accepts the data
            try:
                return inner(value)
            except (TypeError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
                error = exc
        assert error is not None
        raise error

    return convert


class _Dataclass:
    """Rebuilds a dataclass from its fields; field converters are made on first use, so a
    dataclass that refers to itself (a tree) works."""

    def __init__(self, tp: type) -> None:
        self.tp = tp
        self.fields: dict[str, Convert] | None = None

    def __call__(self, value: Any) -> Any:
        if not isinstance(value, dict):
            return value  # an instance already (an inline call), or data the call refuses
        if self.fields is None:
            self.fields = _field_converters(self.tp)
        fields = self.fields
        return self.tp(**{k: fields[k](v) if k in fields else v for k, v in value.items()})


def _field_converters(tp: type) -> dict[str, Convert]:
    hints = _hints(tp)
    out: dict[str, Convert] = {}
    for f in dataclasses.fields(tp):
        c = converter(hints.get(f.name))
        if c is not None and f.init:
            out[f.name] = c
    return out


def _hints(obj: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(obj, include_extras=True)
    except Exception as exc:  # a name the annotations use cannot be resolved
        log.warning("cannot read the type hints of %r (%s): no conversion for it", obj, exc)
        return {}


@dataclass(frozen=True, slots=True)
class Adapter:
    """How one task's arguments and result are rebuilt (made once per task)."""

    positional: tuple[Convert | None, ...]  # by position, for positional parameters
    named: dict[str, Convert]  # by name, for any parameter passed by keyword
    params: frozenset[str]  # every named parameter: what **kwargs does not catch
    var_args: Convert | None
    var_kwargs: Convert | None
    result: Convert | None

    def args(self, args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        """The arguments of one call, rebuilt."""
        pos = self.positional
        out = [_apply(pos[i] if i < len(pos) else self.var_args, a) for i, a in enumerate(args)]
        named, params, rest = self.named, self.params, self.var_kwargs
        kw = {k: _apply(named.get(k) if k in params else rest, v) for k, v in kwargs.items()}
        return out, kw


def _apply(convert: Convert | None, value: Any) -> Any:
    return value if convert is None else convert(value)


def adapter_for(fn: Callable[..., Any]) -> Adapter | None:
    """The Adapter of a task function, or None when no argument or result needs one."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    hints = _hints(fn)
    positional: list[Convert | None] = []
    named: dict[str, Convert] = {}
    var_args = var_kwargs = None
    for p in sig.parameters.values():
        c = converter(hints.get(p.name))
        if p.kind is p.VAR_POSITIONAL:
            var_args = c
        elif p.kind is p.VAR_KEYWORD:
            var_kwargs = c
        else:
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                positional.append(c)
            if c is not None and p.kind is not p.POSITIONAL_ONLY:
                named[p.name] = c
    result = converter(hints.get("return"))
    if not (any(positional) or named or var_args or var_kwargs or result):
        return None
    params = frozenset(
        p.name
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    )
    return Adapter(tuple(positional), named, params, var_args, var_kwargs, result)
