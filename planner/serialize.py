"""Plain-JSON conversion of the frozen dataclasses (specs, configs, profile and plan records).

Owns: `to_jsonable` (dataclass -> dict/list/str/number) and `from_jsonable` (typed rebuild
that reports the path of a bad field, and refuses non-finite numbers), and `dumps` with a
fixed layout so the same object always gives byte-identical text.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
from enum import Enum
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from planner.errors import FormatError, MeshplanError

T = TypeVar("T")


def to_jsonable(obj: Any) -> Any:
    """Dataclasses become objects of their fields; a field with metadata `json_omit_none` is
    left out while None, one with `json_omit_default` while it equals its default (a field added
    later keeps older documents' bytes, and hashes)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.name: to_jsonable(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if not _omitted(f, getattr(obj, f.name))
        }
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    return obj


def _omitted(f: dataclasses.Field[Any], value: Any) -> bool:
    if f.metadata.get("json_omit_none") and value is None:
        return True
    return bool(f.metadata.get("json_omit_default")) and value == f.default


def dumps(obj: Any) -> str:
    """Deterministic JSON: sorted keys, two-space indent, trailing newline."""
    return json.dumps(to_jsonable(obj), indent=2, sort_keys=True, allow_nan=False) + "\n"


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path)
            except (FormatError, TypeError, ValueError):
                continue
        raise FormatError(f"{path}: {value!r} fits none of {tp}")
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, list):
            raise FormatError(f"{path}: expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise FormatError(f"{path}: expected {len(args)} items, got {len(value)}")
        return tuple(
            _convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))
        )
    if origin is dict:
        kt, vt = get_args(tp)
        if not isinstance(value, dict):
            raise FormatError(f"{path}: expected an object, got {type(value).__name__}")
        return {_convert(kt, k, path): _convert(vt, v, f"{path}.{k}") for k, v in value.items()}
    if origin is list:
        (et,) = get_args(tp)
        return [_convert(et, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_jsonable(tp, value, path)
    if isinstance(tp, type) and issubclass(tp, Enum):
        try:
            return tp(value)
        except ValueError:
            allowed = "|".join(str(m.value) for m in tp)
            raise FormatError(f"{path}={value!r} is not allowed; use one of {allowed}") from None
    if tp is float:
        # Python's json reads NaN and Infinity; no meshplan file may hold them (dumps refuses).
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise FormatError(f"{path}: expected a number, got {value!r}")
        number = float(value) if isinstance(value, float) or abs(value) < 2**1023 else math.inf
        if not math.isfinite(number):
            raise FormatError(f"{path}: expected a finite number, got {value!r}")
        return number
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise FormatError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise FormatError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise FormatError(f"{path}: expected a string, got {value!r}")
        return value
    return value


@functools.cache
def _schema(cls: type) -> tuple[dict[str, Any], dict[str, dataclasses.Field[Any]]]:
    """Type hints and fields of a dataclass, resolved once per class: `get_type_hints` costs
    ~0.1 ms and a 2,048-node plan has ~25,000 objects (emit took seconds in it alone)."""
    return get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls)}


def from_jsonable(cls: type[T], data: Any, path: str = "") -> T:
    """Rebuild dataclass `cls` from parsed JSON; errors name the path of the bad field."""
    name = path or cls.__name__
    if not isinstance(data, dict):
        raise FormatError(f"{name}: expected an object, got {type(data).__name__}")
    hints, fields = _schema(cls)  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise FormatError(
            f"{name}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(fields)}"
        )
    kwargs = {}
    for fname, f in fields.items():
        if fname in data:
            kwargs[fname] = _convert(hints[fname], data[fname], f"{name}.{fname}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise FormatError(f"{name}: missing required field '{fname}'")
    try:
        return cls(**kwargs)
    except MeshplanError as e:
        raise FormatError(f"{name}: {e}") from None
