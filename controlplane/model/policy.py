"""Network policy (small, Cilium-like): :data:`PROTOCOLS`, label selectors,
:class:`PortProtocol`, :class:`IngressRule` and :class:`NetworkPolicy`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, Self

from controlplane.model._checks import (
    _as_tuple,
    _build,
    _int_field,
    _is_int,
    _list_field,
    _record,
    _set,
    _short,
    _str_field,
)
from controlplane.model.errors import InvalidLabel, InvalidRecord, ModelError
from controlplane.model.labels import SOURCE_ANY, Labels
from controlplane.model.names import _check_dns_label, _check_dns_subdomain

__all__ = [
    "PROTOCOLS",
    "IngressRule",
    "NetworkPolicy",
    "PortProtocol",
    "selector_matches",
]

PROTOCOLS: Final[Mapping[str, int]] = MappingProxyType(
    {"ANY": 0, "ICMP": 1, "TCP": 6, "UDP": 17, "ICMPV6": 58, "SCTP": 132}
)
"""Protocol names a policy may use (``proto`` also accepts the IP protocol number)."""
_PROTOCOL_NAMES: Final = {number: name for name, number in PROTOCOLS.items()}


def _parse_selector(kind: str, items: list[object]) -> Labels:
    """Selector labels: ``key=value`` without a source means any source (``any:``), as
    Cilium's ``ParseSelectLabel``; raises :class:`InvalidRecord`."""
    texts: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise InvalidRecord(f"{kind}: labels: expected str, got {type(item).__name__}")
        colon, equals = item.find(":"), item.find("=")
        has_source = colon >= 0 and (equals < 0 or colon < equals)
        texts.append(item if has_source else f"{SOURCE_ANY}:{item}")
    try:
        return Labels.from_strings(texts)
    except InvalidLabel as e:
        raise InvalidRecord(f"{kind}: {e}") from None


def selector_matches(selector: Labels, labels: Labels) -> bool:
    """Whether ``labels`` ⊇ ``selector``; a selector label of source ``any`` matches a label
    of any source with the same key and value. The empty selector matches everything."""
    for want in selector:
        if want.source == SOURCE_ANY:
            if not any(have.key == want.key and have.value == want.value for have in labels):
                return False
        elif want not in labels:
            return False
    return True


@dataclass(frozen=True, slots=True)
class PortProtocol:
    """An L4 destination: ``port`` 0 is any port of ``proto``; ``proto`` 0 (``ANY``) is any
    protocol and requires port 0 (the datapath has no port-of-any-protocol lookup)."""

    port: int
    proto: int

    def __post_init__(self) -> None:
        if not _is_int(self.port) or not 0 <= self.port <= 65535:
            raise ModelError(f"policy port must be 0..65535, got {_short(self.port)}")
        if not _is_int(self.proto) or not 0 <= self.proto <= 255:
            raise ModelError(f"policy protocol must be 0..255, got {_short(self.proto)}")
        if self.proto == 0 and self.port != 0:
            raise ModelError(f"policy port {self.port} needs a protocol (TCP, UDP, SCTP)")

    def to_dict(self) -> dict[str, Any]:
        return {"port": self.port, "proto": _PROTOCOL_NAMES.get(self.proto, self.proto)}

    @classmethod
    def from_dict(cls, data: object) -> Self:
        k = "PortProtocol"
        d = _record(k, data)
        port = _int_field(k, d, "port") if "port" in d else 0
        raw = d.get("proto", d.get("protocol", "TCP"))
        if isinstance(raw, str) and raw.upper() in PROTOCOLS:
            proto = PROTOCOLS[raw.upper()]
        elif _is_int(raw):
            proto = raw
        else:
            raise InvalidRecord(f"{k}: unknown protocol {_short(raw)}")
        return _build(k, cls, port=port, proto=proto)


@dataclass(frozen=True, slots=True)
class IngressRule:
    """Allow traffic from endpoints whose labels match ``from_selector`` to ``ports``
    (empty: every port and protocol)."""

    from_selector: Labels
    ports: tuple[PortProtocol, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.from_selector, Labels):
            raise ModelError("ingress rule from_selector: expected Labels")
        ports = _as_tuple("ingress rule ports", self.ports)
        for port in ports:
            if not isinstance(port, PortProtocol):
                raise ModelError("ingress rule ports: expected PortProtocol")
        _set(self, "ports", ports)

    def to_dict(self) -> dict[str, Any]:
        return {
            "from_selector": self.from_selector.to_strings(),
            "ports": [p.to_dict() for p in self.ports],
        }

    @classmethod
    def from_dict(cls, data: object) -> Self:
        k = "IngressRule"
        d = _record(k, data)
        selector = _parse_selector(k, _list_field(k, d, "from_selector"))
        raw_ports = _list_field(k, d, "ports") if "ports" in d else []
        ports = tuple(PortProtocol.from_dict(p) for p in raw_ports)
        return _build(k, cls, from_selector=selector, ports=ports)


@dataclass(frozen=True, slots=True)
class NetworkPolicy:
    """Selects the endpoints of ``namespace`` whose labels match ``endpoint_selector`` and
    allows them ingress per ``ingress`` (anything else to a selected endpoint is denied).

    ``name`` is a DNS-1123 subdomain and ``namespace`` a DNS-1123 label, as in Kubernetes.
    The empty endpoint selector selects every endpoint of the namespace."""

    name: str
    namespace: str
    endpoint_selector: Labels
    ingress: tuple[IngressRule, ...] = ()

    def __post_init__(self) -> None:
        _check_dns_subdomain("policy name", self.name)
        _check_dns_label("policy namespace", self.namespace)
        if not isinstance(self.endpoint_selector, Labels):
            raise ModelError("policy endpoint_selector: expected Labels")
        rules = _as_tuple("policy ingress", self.ingress)
        for rule in rules:
            if not isinstance(rule, IngressRule):
                raise ModelError("policy ingress: expected IngressRule")
        _set(self, "ingress", rules)

    @property
    def id(self) -> str:
        """``namespace/name``."""
        return f"{self.namespace}/{self.name}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "namespace": self.namespace,
            "endpoint_selector": self.endpoint_selector.to_strings(),
            "ingress": [rule.to_dict() for rule in self.ingress],
        }

    @classmethod
    def from_dict(cls, data: object) -> Self:
        k = "NetworkPolicy"
        d = _record(k, data)
        selector = _parse_selector(k, _list_field(k, d, "endpoint_selector"))
        rules = tuple(IngressRule.from_dict(r) for r in _list_field(k, d, "ingress"))
        return _build(
            k,
            cls,
            name=_str_field(k, d, "name"),
            namespace=_str_field(k, d, "namespace"),
            endpoint_selector=selector,
            ingress=rules,
        )
