"""Checks shared by the model's types: bounded renderings of values for messages, ints,
tuples, normalised fields of frozen dataclasses, and the field extraction of
``from_dict`` (raises :class:`~controlplane.model.errors.InvalidRecord`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final, NoReturn, TypeGuard, TypeVar

from controlplane.model.errors import InvalidRecord, ModelError

_MAX_REPR: Final = 60


def _short(value: object) -> str:
    """A one-line, bounded rendering of an arbitrary value for error messages."""
    text = repr(value)
    if len(text) > _MAX_REPR:
        text = text[: _MAX_REPR - 3] + "..."
    return text


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _set(obj: object, name: str, value: object) -> None:
    """Assign a normalised field inside ``__post_init__`` of a frozen dataclass."""
    object.__setattr__(obj, name, value)


def _as_tuple(what: str, value: object) -> tuple[Any, ...]:
    if isinstance(value, tuple):
        return value
    if isinstance(value, list):
        return tuple(value)
    raise ModelError(f"{what}: expected a tuple, got {type(value).__name__}")


# --- from_dict field extraction (raise InvalidRecord) ------------------------------------


def _record(kind: str, data: object) -> Mapping[Any, Any]:
    if type(data) is dict or isinstance(data, Mapping):  # the ABC check is slow
        return data
    raise InvalidRecord(f"{kind}: expected a dict, got {type(data).__name__}")


def _field(kind: str, data: Mapping[Any, Any], name: str) -> object:
    return data[name] if name in data else _missing(kind, name)


def _missing(kind: str, name: str) -> NoReturn:
    raise InvalidRecord(f"{kind}: missing field {name!r}")


def _str_field(kind: str, data: Mapping[Any, Any], name: str) -> str:
    value = data[name] if name in data else _missing(kind, name)
    if isinstance(value, str):
        return value
    raise InvalidRecord(f"{kind}: field {name!r}: expected str, got {type(value).__name__}")


def _int_field(kind: str, data: Mapping[Any, Any], name: str) -> int:
    value = data[name] if name in data else _missing(kind, name)
    if _is_int(value):
        return value
    raise InvalidRecord(f"{kind}: field {name!r}: expected int, got {type(value).__name__}")


def _list_field(kind: str, data: Mapping[Any, Any], name: str) -> list[object]:
    value = _field(kind, data, name)
    if not isinstance(value, list | tuple):
        raise InvalidRecord(f"{kind}: field {name!r}: expected list, got {type(value).__name__}")
    return list(value)


_T = TypeVar("_T")


def _build(kind: str, build: type[_T], **kwargs: Any) -> _T:
    """Construct a model object from extracted fields, turning ValueErrors into InvalidRecord."""
    try:
        return build(**kwargs)
    except ValueError as e:
        raise _invalid(kind, e) from None


def _invalid(kind: str, error: ValueError) -> InvalidRecord:
    """The InvalidRecord to raise when constructing a ``kind`` object raised ``error``."""
    return error if isinstance(error, InvalidRecord) else InvalidRecord(f"{kind}: {error}")


def _parse_item(kind: str, name: str, parse: Callable[[object], _T], value: object) -> _T:
    try:
        return parse(value)
    except InvalidRecord as e:
        raise InvalidRecord(f"{kind}: field {name!r}: {e}") from None
