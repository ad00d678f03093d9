"""Services (ClusterIP load balancing): :class:`Frontend`, :class:`Backend`, :class:`Service`.

A service has a virtual IP (``cluster_ip``), one or more frontends on it (port and
protocol, TCP or UDP) and backends (an address and port, and optionally the node that
hosts it). With one frontend every backend serves it; with several, every frontend has a
name and every backend names the frontend it serves (``frontend``), as a Kubernetes
EndpointSlice port names its Service port. A frontend without backends is valid: the
datapath refuses its connections at once.

The same model is fed by every source of services: the kvstore (``cpctl service put``)
and, later, Kubernetes Services with their EndpointSlices.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any, Final, Self

from controlplane.model._checks import (
    _as_tuple,
    _build,
    _is_int,
    _list_field,
    _record,
    _set,
    _short,
    _str_field,
)
from controlplane.model.addresses import IPAddress, _check_address, _ip_field
from controlplane.model.errors import InvalidRecord, ModelError
from controlplane.model.names import NodeName, _check_dns_label, _check_dns_subdomain

__all__ = [
    "MAX_SERVICE_BACKENDS",
    "SERVICE_PROTOCOLS",
    "Backend",
    "Frontend",
    "Service",
]

SERVICE_PROTOCOLS: Final = {"TCP": 6, "UDP": 17}
"""The protocols a service frontend may use (the datapath balances these two)."""
_PROTOCOL_NAMES: Final = {number: name for name, number in SERVICE_PROTOCOLS.items()}
MAX_SERVICE_BACKENDS: Final = 1024
"""Backends of one frontend at most (the datapath's slots per frontend)."""


def _check_port(what: str, value: object) -> int:
    if not _is_int(value) or not 1 <= value <= 65535:
        raise ModelError(f"{what}: port must be 1..65535, got {_short(value)}")
    return value


def _check_ipv4(what: str, value: object) -> IPAddress:
    address = _check_address(what, value)
    if not isinstance(address, IPv4Address):
        raise ModelError(f"{what}: only IPv4 services are supported for now, got {address}")
    return address


def _protocol(kind: str, raw: object) -> int:
    if isinstance(raw, str) and raw.upper() in SERVICE_PROTOCOLS:
        return SERVICE_PROTOCOLS[raw.upper()]
    if _is_int(raw) and raw in _PROTOCOL_NAMES:
        return raw
    raise InvalidRecord(f"{kind}: protocol must be TCP or UDP, got {_short(raw)}")


def _port_field(kind: str, data: Any, name: str) -> int:
    value = data.get(name)
    if value is None:
        raise InvalidRecord(f"{kind}: missing field {name!r}")
    return value  # type: ignore[no-any-return]  # checked by the constructor


@dataclass(frozen=True, slots=True)
class Frontend:
    """A port of the service's virtual IP: ``port``/``protocol`` (6 TCP, 17 UDP), named
    (a DNS-1123 label) when the service has several."""

    port: int
    protocol: int = 6
    name: str = ""

    def __post_init__(self) -> None:
        _check_port("service frontend", self.port)
        if self.protocol not in _PROTOCOL_NAMES or not _is_int(self.protocol):
            raise ModelError(
                f"service frontend: protocol must be TCP (6) or UDP (17), got "
                f"{_short(self.protocol)}"
            )
        if self.name:
            _check_dns_label("service frontend name", self.name)

    @property
    def protocol_name(self) -> str:
        return _PROTOCOL_NAMES[self.protocol]

    def __str__(self) -> str:
        return f"{self.port}/{self.protocol_name}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"port": self.port, "protocol": self.protocol_name}
        if self.name:
            out["name"] = self.name
        return out

    @classmethod
    def from_dict(cls, data: object) -> Self:
        k = "Frontend"
        d = _record(k, data)
        name = _str_field(k, d, "name") if "name" in d else ""
        protocol = _protocol(k, d.get("protocol", "TCP"))
        return _build(k, cls, port=_port_field(k, d, "port"), protocol=protocol, name=name)


@dataclass(frozen=True, slots=True)
class Backend:
    """One backend: ``ip``:``port``, on ``node`` when known, serving the frontend named
    ``frontend`` (empty: the service's only frontend)."""

    ip: IPAddress
    port: int
    node: NodeName | None = None
    frontend: str = ""

    def __post_init__(self) -> None:
        _check_ipv4("service backend", self.ip)
        _check_port("service backend", self.port)
        if self.node is not None:
            _check_dns_subdomain("service backend node", self.node)
        if self.frontend:
            _check_dns_label("service backend frontend", self.frontend)

    def __str__(self) -> str:
        return f"{self.ip}:{self.port}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ip": str(self.ip), "port": self.port}
        if self.node is not None:
            out["node"] = self.node
        if self.frontend:
            out["frontend"] = self.frontend
        return out

    @classmethod
    def from_dict(cls, data: object) -> Self:
        k = "Backend"
        d = _record(k, data)
        node = NodeName(_str_field(k, d, "node")) if d.get("node") is not None else None
        frontend = _str_field(k, d, "frontend") if "frontend" in d else ""
        return _build(
            k,
            cls,
            ip=_ip_field(k, d, "ip"),
            port=_port_field(k, d, "port"),
            node=node,
            frontend=frontend,
        )


@dataclass(frozen=True, slots=True)
class Service:
    """A ClusterIP service: ``namespace/name``, its virtual IP, frontends and backends.

    ``name`` and ``namespace`` are DNS-1123 labels (as Kubernetes Service names)."""

    namespace: str
    name: str
    cluster_ip: IPAddress
    frontends: tuple[Frontend, ...]
    backends: tuple[Backend, ...] = ()

    def __post_init__(self) -> None:
        _check_dns_label("service namespace", self.namespace)
        _check_dns_label("service name", self.name)
        _check_ipv4("service cluster_ip", self.cluster_ip)
        frontends = _as_tuple("service frontends", self.frontends)
        backends = _as_tuple("service backends", self.backends)
        if not frontends:
            raise ModelError(f"service {self.id}: needs at least one frontend (port)")
        seen: set[tuple[int, int]] = set()
        names: set[str] = set()
        for fe in frontends:
            if not isinstance(fe, Frontend):
                raise ModelError("service frontends: expected Frontend")
            if (fe.port, fe.protocol) in seen:
                raise ModelError(f"service {self.id}: frontend {fe} given twice")
            seen.add((fe.port, fe.protocol))
            if len(frontends) > 1 and not fe.name:
                raise ModelError(
                    f"service {self.id}: frontend {fe} needs a name (the service has "
                    f"{len(frontends)} frontends)"
                )
            if fe.name in names:
                raise ModelError(f"service {self.id}: frontend name {fe.name!r} given twice")
            names.add(fe.name)
        counts: dict[str, int] = {}
        backend_keys: set[tuple[str, IPAddress, int]] = set()
        for be in backends:
            if not isinstance(be, Backend):
                raise ModelError("service backends: expected Backend")
            target = self._frontend_of(frontends, be)
            key = (target.name, be.ip, be.port)
            if key in backend_keys:
                raise ModelError(f"service {self.id}: backend {be} of {target} given twice")
            backend_keys.add(key)
            counts[target.name] = counts.get(target.name, 0) + 1
            if counts[target.name] > MAX_SERVICE_BACKENDS:
                raise ModelError(
                    f"service {self.id}: frontend {target} has more than "
                    f"{MAX_SERVICE_BACKENDS} backends"
                )
        _set(self, "frontends", frontends)
        _set(self, "backends", backends)

    def _frontend_of(self, frontends: tuple[Frontend, ...], backend: Backend) -> Frontend:
        if len(frontends) == 1 and backend.frontend in ("", frontends[0].name):
            return frontends[0]
        if not backend.frontend:
            raise ModelError(
                f"service {self.id}: backend {backend} must name its frontend (one of "
                f"{', '.join(fe.name for fe in frontends)})"
            )
        for fe in frontends:
            if fe.name == backend.frontend:
                return fe
        raise ModelError(
            f"service {self.id}: backend {backend} names frontend {backend.frontend!r}, "
            "which the service does not have"
        )

    @property
    def id(self) -> str:
        """``namespace/name``."""
        return f"{self.namespace}/{self.name}"

    def backends_of(self, frontend: Frontend) -> tuple[Backend, ...]:
        """The backends serving ``frontend`` (one of :attr:`frontends`), in the given order."""
        return tuple(
            be for be in self.backends if self._frontend_of(self.frontends, be) == frontend
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "name": self.name,
            "cluster_ip": str(self.cluster_ip),
            "frontends": [fe.to_dict() for fe in self.frontends],
            "backends": [be.to_dict() for be in self.backends],
        }

    @classmethod
    def from_dict(cls, data: object) -> Self:
        k = "Service"
        d = _record(k, data)
        frontends = tuple(Frontend.from_dict(f) for f in _list_field(k, d, "frontends"))
        raw_backends = _list_field(k, d, "backends") if "backends" in d else []
        backends = tuple(Backend.from_dict(b) for b in raw_backends)
        return _build(
            k,
            cls,
            namespace=_str_field(k, d, "namespace"),
            name=_str_field(k, d, "name"),
            cluster_ip=_ip_field(k, d, "cluster_ip"),
            frontends=frontends,
            backends=backends,
        )
