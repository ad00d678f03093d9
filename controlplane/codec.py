"""Versioned msgpack envelopes for every value the control plane stores.

An envelope is a msgpack map ``{"v": <schema version>, "k": <kind>, "d": <payload>}``.
Decoding is strict: anything that is not such a map, carries another kind, or a version
this build does not know raises :class:`DecodeError`; callers log it, count it and skip
the key, they never crash on it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

import msgpack
import msgspec

P = TypeVar("P")

SCHEMA_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})


class DecodeError(ValueError):
    """A stored value is not a valid envelope of the expected kind and version."""


def encode(kind: str, payload: Any) -> bytes:
    """Wrap ``payload`` (msgpack-serialisable data) in an envelope of ``kind``."""
    data: bytes = msgpack.packb({"v": SCHEMA_VERSION, "k": kind, "d": payload}, use_bin_type=True)
    return data


def unpack(raw: bytes) -> dict[str, Any]:
    """Decode an envelope of any kind; returns ``{"v", "k", "d"}``."""
    try:
        obj = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise DecodeError(f"not msgpack: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, dict) or "v" not in obj or "k" not in obj or "d" not in obj:
        raise DecodeError("not an envelope (want a map with v, k and d)")
    version, kind = obj["v"], obj["k"]
    if not isinstance(version, int) or isinstance(version, bool):
        raise DecodeError(f"envelope version is not an integer: {version!r}")
    if version not in SUPPORTED_VERSIONS:
        raise DecodeError(f"unknown envelope version {version}")
    if not isinstance(kind, str):
        raise DecodeError(f"envelope kind is not a string: {kind!r}")
    return obj


def decode(kind: str, raw: bytes) -> Any:
    """Decode an envelope that must be of ``kind``; returns its payload."""
    obj = unpack(raw)
    if obj["k"] != kind:
        raise DecodeError(f"envelope kind {obj['k']!r}, expected {kind!r}")
    return obj["d"]


class _Envelope(msgspec.Struct, Generic[P], gc=False):
    v: int
    k: str
    d: P


def typed_decoder(kind: str, payload: type[P]) -> Callable[[bytes], P]:
    """A decoder of ``kind`` envelopes straight into ``payload``, a msgspec Struct whose
    fields carry their checks, all in C (several times faster than :func:`decode` and a
    model's ``from_dict``). It raises :class:`DecodeError` for anything it does not take,
    with msgspec's reason; callers then ask the strict path, which decides."""
    decoder = msgspec.msgpack.Decoder(_Envelope[payload])  # type: ignore[valid-type]

    def decode_typed(raw: bytes) -> P:
        try:
            obj = decoder.decode(raw)
        except msgspec.MsgspecError as exc:
            raise DecodeError(str(exc)) from None
        if obj.v not in SUPPORTED_VERSIONS or obj.k != kind:
            raise DecodeError(f"envelope of kind {obj.k!r}, version {obj.v}: not {kind!r}")
        data: P = obj.d
        return data

    return decode_typed


def to_display(raw: bytes) -> Any:
    """Best-effort view of a stored value for humans and ``--json``.

    Envelopes become their JSON-friendly content; anything else is shown as UTF-8 text
    when it is text, else as hex.
    """
    try:
        return _jsonable(unpack(raw))
    except DecodeError:
        pass
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return {"hex": raw.hex()}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, bytes):
        try:
            return obj.decode("utf-8")
        except UnicodeDecodeError:
            return {"hex": obj.hex()}
    return obj
