"""Endpoints: :class:`Endpoint` as its node publishes it, :class:`IPIdentity` (what the
ipcache needs of one), and the two paths that read a stored endpoint record: the strict
:func:`ip_identity_from_dict` and the fast path, :class:`EndpointRecord` (a msgspec
schema) with :func:`ip_identity_from_record` and :class:`NodeFields`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Self, TypeVar

import msgspec

from controlplane.model._checks import (
    _int_field,
    _invalid,
    _is_int,
    _record,
    _set,
    _short,
    _str_field,
)
from controlplane.model.addresses import (
    _AF_INET,
    IPAddress,
    IPNetwork,
    _address,
    _address_of,
    _check_address,
    _from_bytes,
    _inet_pton,
    _network,
    _packed_ip,
    _packed_ip_field,
)
from controlplane.model.errors import InvalidRecord, ModelError
from controlplane.model.identity import (
    MAX_NUMERIC_IDENTITY,
    NumericIdentity,
    _check_numeric_identity,
)
from controlplane.model.names import (
    _DNS_LABEL_MAX,
    _DNS_SUBDOMAIN_MAX,
    _DNS_SUBDOMAIN_RE,
    _SIMPLE_LABEL_RE,
    EndpointID,
    NodeName,
    _check_dns_label,
    _check_dns_subdomain,
    _is_dns_label,
    _is_dns_subdomain,
)

__all__ = [
    "Endpoint",
    "EndpointRecord",
    "IPIdentity",
    "NodeFields",
    "ip_identity_from_dict",
    "ip_identity_from_record",
]

# The helpers above are imported by name on purpose: the cold-sync path
# (ip_identity_from_record) finds them among this module's globals, one lookup each.

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    """One endpoint (pod) as its node publishes it: ip/prefix → identity, location, name
    (the ipcache itself reads only its :class:`IPIdentity`).

    ``prefix_len`` defaults to the address's full length (32 or 128; pass ``-1`` or omit
    it); ``ip`` must be the network address of ``ip/prefix_len``. ``name`` is a DNS-1123
    subdomain and ``namespace`` a DNS-1123 label, as in Kubernetes.
    """

    ip: IPAddress
    prefix_len: int = -1
    identity: NumericIdentity
    node: NodeName
    host_ip: IPAddress
    name: str
    namespace: str

    def __post_init__(self) -> None:
        ip = _check_address("endpoint ip", self.ip)
        _check_address("endpoint host_ip", self.host_ip)
        prefix_len = _check_endpoint(
            ip.version, int(ip), self.prefix_len, self.identity, self.node, self.name,
            self.namespace,
        )  # fmt: skip
        if prefix_len != self.prefix_len:
            _set(self, "prefix_len", prefix_len)

    @property
    def ip_identity(self) -> IPIdentity:
        """What the ipcache needs of this endpoint."""
        return IPIdentity(
            self.ip.packed,
            self.prefix_len,
            self.identity,
            self.node,
            self.host_ip.packed,
            self.namespace,
            self.name,
        )

    @property
    def prefix(self) -> IPNetwork:
        """The ipcache key: ``ip/prefix_len``."""
        return _network(self.ip.version, int(self.ip), self.prefix_len)

    @property
    def endpoint_id(self) -> EndpointID:
        """``namespace/name``: the owner recorded in this endpoint's :class:`IPLease`."""
        return EndpointID(f"{self.namespace}/{self.name}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "ip": str(self.ip),
            "prefix_len": self.prefix_len,
            "identity": int(self.identity),
            "node": str(self.node),
            "host_ip": str(self.host_ip),
            "name": self.name,
            "namespace": self.namespace,
        }

    @classmethod
    def from_dict(cls, data: object) -> Self:
        pair = ip_identity_from_dict(data)  # every field checked, as the ipcache reads it
        d = _record("Endpoint", data)
        try:
            return cls(
                ip=_address_of(pair.ip),
                prefix_len=pair.prefix_len,
                identity=pair.identity,
                node=pair.node,
                host_ip=_address_of(pair.host_ip),
                name=d["name"],
                namespace=d["namespace"],
            )
        except ValueError as e:
            raise _invalid("Endpoint", e) from None


class IPIdentity(msgspec.Struct, frozen=True, gc=False):
    """An endpoint as the ipcache needs it: address and prefix, identity, node, host IP.

    :func:`ip_identity_from_dict` reads it from a stored endpoint record with every check
    of :class:`Endpoint` (it is :meth:`Endpoint.from_dict`'s validation) but without
    building address objects or the Endpoint: an agent decodes one per endpoint of the
    cluster on a cold sync. Addresses are packed, 4 or 16 bytes. (A msgspec Struct: made
    in C, ~6x cheaper to create than a NamedTuple.)
    """

    ip: bytes
    prefix_len: int
    identity: NumericIdentity
    node: NodeName
    host_ip: bytes
    namespace: str = ""
    """The pod's namespace and name (flow observability shows them; the ipcache does not
    need them)."""
    name: str = ""


def ip_identity_from_dict(data: object) -> IPIdentity:
    """Check a stored endpoint record (raises :class:`InvalidRecord`) and return what the
    ipcache needs of it."""
    k = "Endpoint"
    d = _record(k, data)
    ip = _packed_ip_field(k, d, "ip")
    prefix_len = _int_field(k, d, "prefix_len")
    identity = _int_field(k, d, "identity")
    node = _str_field(k, d, "node")
    host_ip = _packed_ip_field(k, d, "host_ip")
    name = _str_field(k, d, "name")
    namespace = _str_field(k, d, "namespace")
    try:
        version = 4 if len(ip) == 4 else 6
        prefix_len = _check_endpoint(
            version, _from_bytes(ip), prefix_len, identity, node, name, namespace
        )
    except ValueError as e:
        raise _invalid(k, e) from None
    return IPIdentity(
        ip, prefix_len, NumericIdentity(identity), NodeName(node), host_ip, namespace, name
    )


class EndpointRecord(msgspec.Struct, frozen=True, gc=False):
    """An endpoint record (:meth:`Endpoint.to_dict`) as a schema that msgspec checks while
    it decodes, in C: field types, the identity range and the names' lengths.

    A fast path only: it must never accept what :func:`ip_identity_from_dict` refuses
    (a property test holds them side by side); whatever it refuses goes to the strict
    path, which decides and says why. :func:`ip_identity_from_record` checks the rest
    (names by the model's own regexes, cached where names repeat: msgspec's patterns run
    Python's regex engine on every field, ~1 µs per record).
    """

    ip: str
    prefix_len: int
    identity: Annotated[NumericIdentity, msgspec.Meta(ge=1, le=MAX_NUMERIC_IDENTITY)]
    node: Annotated[NodeName, msgspec.Meta(min_length=1, max_length=_DNS_SUBDOMAIN_MAX)]
    host_ip: str
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=_DNS_SUBDOMAIN_MAX)]
    namespace: Annotated[str, msgspec.Meta(min_length=1, max_length=_DNS_LABEL_MAX)]


class NodeFields:
    """The node name and host address of endpoint records, one shared instance of each:
    they repeat across a node's endpoints, so a store keeps each once, checked and parsed
    once (less memory per endpoint, fewer checks on a cold sync). Bounded: past ``limit``
    entries it starts over."""

    __slots__ = ("_hosts", "_nodes", "limit")

    def __init__(self, limit: int = 65536) -> None:
        self._nodes: dict[str, NodeName] = {}
        self._hosts: dict[str, bytes] = {}
        self.limit = limit

    def node(self, name: NodeName) -> NodeName | None:
        """The shared instance of ``name``; None when it is not a DNS-1123 subdomain."""
        shared = self._nodes.get(name)
        if shared is None:
            if not _is_dns_subdomain(name):
                return None
            shared = self._keep(self._nodes, name, name)
        return shared

    def host(self, text: str) -> bytes:
        """The packed address ``text`` names (raises :class:`ModelError` like
        :func:`_packed_ip`)."""
        packed = self._hosts.get(text)
        if packed is None:
            packed = self._keep(self._hosts, text, _packed_ip(text))
        return packed

    def _keep(self, table: dict[str, _T], key: str, value: _T) -> _T:
        if len(table) >= self.limit:
            table.clear()
        table[key] = value
        return value


def ip_identity_from_record(record: EndpointRecord, shared: NodeFields) -> IPIdentity:
    """The addresses, prefix and names of a decoded :class:`EndpointRecord` checked: what
    the ipcache needs of it, its node name and host address from ``shared``. Raises
    :class:`ModelError` for a record that breaks a rule; only the strict path,
    :func:`ip_identity_from_dict`, says which.

    An agent runs this for every endpoint of the cluster on a cold sync, hence the
    inlined IPv4 parse (see :func:`_packed_ip`) and the boolean name checks.
    """
    try:
        ip = _inet_pton(_AF_INET, record.ip)
    except (OSError, ValueError):
        ip = _packed_ip(record.ip)
    host_ip = shared.host(record.host_ip)
    prefix_len = record.prefix_len
    if len(ip) != 4 or not (prefix_len == 32 or prefix_len == -1):  # a v4 /32 has no host bits
        prefix_len = _check_prefix(4 if len(ip) == 4 else 6, _from_bytes(ip), prefix_len)
    elif prefix_len == -1:
        prefix_len = 32
    # nodes and namespaces repeat across records (checked once); pod names mostly do not,
    # and most are one DNS label, which a simpler pattern takes in a third of the time
    name = record.name
    node = shared.node(record.node)
    if not (
        node is not None
        and _is_dns_label(record.namespace)
        and (
            (_SIMPLE_LABEL_RE.fullmatch(name) is not None and name[-1] != "-")
            or _DNS_SUBDOMAIN_RE.fullmatch(name) is not None
        )
    ):
        raise InvalidRecord("endpoint: a node, name or namespace that is not a DNS-1123 name")
    return IPIdentity(ip, prefix_len, record.identity, node, host_ip, record.namespace, name)


def _check_endpoint(
    version: int,
    address: int,
    prefix_len: object,
    identity: object,
    node: object,
    name: object,
    namespace: object,
) -> int:
    """The rules of an endpoint's fields besides its addresses; returns the prefix length
    (``-1`` means the address's full length)."""
    prefix_len = _check_prefix(version, address, prefix_len)
    _check_numeric_identity("endpoint identity", identity)
    _check_names(node, name, namespace)
    return prefix_len


def _check_names(node: object, name: object, namespace: object) -> None:
    _check_dns_subdomain("endpoint node", node)
    _check_dns_subdomain("endpoint name", name)
    _check_dns_label("endpoint namespace", namespace)


def _check_prefix(version: int, address: int, prefix_len: object) -> int:
    max_prefixlen = 32 if version == 4 else 128
    if prefix_len == -1:
        prefix_len = max_prefixlen
    if not _is_int(prefix_len) or not 0 <= prefix_len <= max_prefixlen:
        raise ModelError(
            f"endpoint prefix length must be 0..{max_prefixlen}, got {_short(prefix_len)}"
        )
    if address & ((1 << (max_prefixlen - prefix_len)) - 1):
        ip = _address(version, address)
        raise ModelError(f"endpoint ip {ip} has host bits set for /{prefix_len}")
    return prefix_len
