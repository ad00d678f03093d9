"""Reading the Kubernetes protobuf encoding of the built-in kinds kubectl sends that way.

kubectl's typed commands (``kubectl create namespace``) send
``application/vnd.kubernetes.protobuf``: the bytes ``k8s\\0`` and a ``runtime.Unknown``
(typeMeta, raw) whose raw bytes are the object's generated message. This decodes the
envelope and the fields of ObjectMeta and of a Namespace that a client can set, into the
JSON shape the rest of the server works on. Anything it does not know is refused (415),
never guessed. Responses are always JSON (every client that sends protobuf accepts it).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

MAGIC = b"k8s\x00"


class ProtobufError(ValueError):
    """The body is not a protobuf message this server can read."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ProtobufError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ProtobufError("varint too long")


def _fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of every field; length-delimited values as bytes."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            yield number, value
        elif wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise ProtobufError("truncated field")
            yield number, data[pos : pos + length]
            pos += length
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise ProtobufError(f"unsupported wire type {wire}")


def _text(value: int | bytes) -> str:
    if not isinstance(value, bytes):
        raise ProtobufError("expected a string")
    return value.decode()


def _map_entry(value: int | bytes) -> tuple[str, str]:
    if not isinstance(value, bytes):
        raise ProtobufError("expected a map entry")
    key = text = ""
    for number, item in _fields(value):
        if number == 1:
            key = _text(item)
        elif number == 2:
            text = _text(item)
    return key, text


def _object_meta(data: bytes) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    names = {1: "name", 2: "generateName", 3: "namespace", 5: "uid", 6: "resourceVersion"}
    for number, value in _fields(data):
        if number in names:
            if text := _text(value):
                meta[names[number]] = text
        elif number in (11, 12):
            key, text = _map_entry(value)
            meta.setdefault("labels" if number == 11 else "annotations", {})[key] = text
        elif number == 14:
            meta.setdefault("finalizers", []).append(_text(value))
    return meta


def _namespace(data: bytes) -> dict[str, Any]:
    obj: dict[str, Any] = {"apiVersion": "v1", "kind": "Namespace", "metadata": {}}
    for number, value in _fields(data):
        if not isinstance(value, bytes):
            continue
        if number == 1:
            obj["metadata"] = _object_meta(value)
        elif number == 2:
            finalizers = [_text(v) for n, v in _fields(value) if n == 1]
            obj["spec"] = {"finalizers": finalizers} if finalizers else {}
    return obj


def _put(obj: dict[str, Any], key: str, value: Any) -> None:
    """Set a field the way JSON would carry it: gogo protobuf writes zero values, which
    JSON omits (an empty string, port 0: "not set")."""
    if value not in ("", 0, None):  # False == 0: a false bool is omitted too
        obj[key] = value


def _int_or_string(data: bytes) -> int | str | None:
    kind, number, text = 0, 0, ""
    for n, v in _fields(data):
        if n == 1 and isinstance(v, int):
            kind = v
        elif n == 2 and isinstance(v, int):
            number = v
        elif n == 3:
            text = _text(v)
    if kind == 1:
        return text or None
    return number or None


def _service_port(data: bytes) -> dict[str, Any]:
    port: dict[str, Any] = {}
    for number, value in _fields(data):
        if number in (1, 2, 6):
            _put(port, {1: "name", 2: "protocol", 6: "appProtocol"}[number], _text(value))
        elif number in (3, 5) and isinstance(value, int):
            _put(port, "port" if number == 3 else "nodePort", value)
        elif number == 4 and isinstance(value, bytes):
            _put(port, "targetPort", _int_or_string(value))
    return port


_SERVICE_STRINGS = {
    3: "clusterIP",
    4: "type",
    7: "sessionAffinity",
    8: "loadBalancerIP",
    10: "externalName",
    11: "externalTrafficPolicy",
    17: "ipFamilyPolicy",
    21: "loadBalancerClass",
    22: "internalTrafficPolicy",
}
_SERVICE_LISTS = {
    5: "externalIPs",
    9: "loadBalancerSourceRanges",
    18: "clusterIPs",
    19: "ipFamilies",
}


def _service_spec(data: bytes) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    for number, value in _fields(data):
        if number == 1 and isinstance(value, bytes):
            spec.setdefault("ports", []).append(_service_port(value))
        elif number == 2:
            key, text = _map_entry(value)
            spec.setdefault("selector", {})[key] = text
        elif number in _SERVICE_STRINGS:
            _put(spec, _SERVICE_STRINGS[number], _text(value))
        elif number in _SERVICE_LISTS:
            spec.setdefault(_SERVICE_LISTS[number], []).append(_text(value))
        elif number == 12 and isinstance(value, int):
            _put(spec, "healthCheckNodePort", value)
        elif number == 13 and isinstance(value, int):
            _put(spec, "publishNotReadyAddresses", bool(value))
        elif number == 20 and isinstance(value, int):
            spec["allocateLoadBalancerNodePorts"] = bool(value)
    return spec


def _service(data: bytes) -> dict[str, Any]:
    """A v1 Service: metadata and the spec fields of core/v1 generated.proto (status is
    the server's)."""
    obj: dict[str, Any] = {"apiVersion": "v1", "kind": "Service", "metadata": {}}
    for number, value in _fields(data):
        if not isinstance(value, bytes):
            continue
        if number == 1:
            obj["metadata"] = _object_meta(value)
        elif number == 2:
            obj["spec"] = _service_spec(value)
    return obj


_KINDS = {("v1", "Namespace"): _namespace, ("v1", "Service"): _service}


def decode(raw: bytes) -> dict[str, Any]:
    """The JSON form of a protobuf-encoded object of a kind in ``_KINDS``."""
    if not raw.startswith(MAGIC):
        raise ProtobufError("missing the k8s protobuf prefix")
    api_version = kind = ""
    body = b""
    for number, value in _fields(raw[len(MAGIC) :]):
        if number == 1 and isinstance(value, bytes):
            for n, v in _fields(value):
                if n == 1:
                    api_version = _text(v)
                elif n == 2:
                    kind = _text(v)
        elif number == 2 and isinstance(value, bytes):
            body = value
    decoder = _KINDS.get((api_version, kind))
    if decoder is None:
        raise ProtobufError(f"no protobuf support for {api_version} {kind}")
    return decoder(body)
