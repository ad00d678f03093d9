"""Domain model: labels, identities, ID ranges, endpoints, nodes, CIDR pools and IP leases.

Pure data and validation; no store code, no I/O, no global mutable state.

Conventions
-----------
* Every type is a frozen, slotted dataclass and validates itself on construction, raising a
  :class:`ModelError` (a ``ValueError``) with a one-line message. Label problems raise the
  subclass :class:`InvalidLabel`.
* Every type has ``to_dict()`` producing plain msgpack-friendly data (``str``, ``int``,
  ``list``, ``dict``) and ``from_dict(data)`` consuming it. ``from_dict`` accepts *any*
  object and raises only :class:`InvalidRecord` (a ``ValueError``) with a one-line message
  when the data is malformed: stored data can be corrupt, callers log, count and skip.
  Unknown extra fields are ignored (a newer writer may add fields); lists may also arrive
  as tuples. Addresses are written in Python's canonical text form (``str(ip)``).

Label syntax
------------
A label is ``source:key=value``. ``source`` is a lowercase DNS label (``k8s``,
``reserved``, ``cidr``, ``unspec``, ``container`` ...). When a parsed string has no
source (``app=web``), the source is ``unspec``, as in Cilium's ``ParseLabel``.

The key and the value follow the Kubernetes label syntax: the key is an optional DNS
subdomain prefix (≤ 253 characters, lowercase) followed by ``/`` and a name (≤ 63
characters, alphanumeric at both ends, ``-``, ``_`` and ``.`` inside); the value is empty
or ≤ 63 characters of the same alphabet as a name. Keys of the ``cidr`` source are instead
an IP network in canonical form with no host bits set (``cidr:10.0.0.0/8``,
``cidr:2001:db8::/32``).

Canonical form of a label set
-----------------------------
Each label renders as ``source:key=value`` (``source:key`` when the value is empty, as in
Cilium); the entries are sorted by ``(source, key, value)`` and joined by ``;``. The empty
set renders as ``""``. The form is injective: sources contain no ``:``, and keys and values
contain neither ``=`` nor ``;``, so splitting on ``;``, then on the first ``:``, then on the
first ``=`` recovers exactly one label set. A set never holds two labels with the same
``(source, key)``.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import itertools
import re
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from types import MappingProxyType
from typing import Annotated, Any, Final, NewType, NoReturn, Self, TypeGuard, TypeVar

import msgspec

__all__ = [
    "DEFAULT_CLUSTER_POOL",
    "DEFAULT_CLUSTER_POOL_MASK_SIZE",
    "IDENTITY_HEALTH",
    "IDENTITY_HOST",
    "IDENTITY_INGRESS",
    "IDENTITY_INIT",
    "IDENTITY_KUBE_APISERVER",
    "IDENTITY_REMOTE_NODE",
    "IDENTITY_UNKNOWN",
    "IDENTITY_UNMANAGED",
    "IDENTITY_WORLD",
    "KEY_COMPONENT_MAX_BYTES",
    "MAX_NUMERIC_IDENTITY",
    "RESERVED_IDENTITIES",
    "RESERVED_IDENTITY_RANGE",
    "SOURCE_ANY",
    "SOURCE_CIDR",
    "SOURCE_CONTAINER",
    "SOURCE_K8S",
    "SOURCE_RESERVED",
    "SOURCE_UNSPEC",
    "CIDRPool",
    "Endpoint",
    "EndpointID",
    "EndpointRecord",
    "IPAddress",
    "IPIdentity",
    "IPLease",
    "IPNetwork",
    "Identity",
    "IdentityRange",
    "InvalidLabel",
    "InvalidRecord",
    "Label",
    "Labels",
    "ModelError",
    "Node",
    "NodeFields",
    "NodeName",
    "NumericIdentity",
    "cluster_identity_range",
    "ip_identity_from_dict",
    "ip_identity_from_record",
    "is_reserved_identity",
    "is_usable_ip",
    "parse_canonical_ip",
    "parse_cidr",
    "parse_endpoint_id",
    "parse_ip",
    "parse_node_name",
    "parse_numeric_identity",
    "reserved_identity_for",
    "reserved_labels",
    "router_ip",
    "shard_identity_ranges",
    "usable_ip_count",
    "usable_ips",
]

# ---------------------------------------------------------------------------------------
# Errors and small shared helpers
# ---------------------------------------------------------------------------------------


class ModelError(ValueError):
    """A value violates the model's rules. The message is always a single line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.splitlines()))


class InvalidLabel(ModelError):
    """A label or label set is malformed."""


class InvalidRecord(ModelError):
    """Stored (decoded) data does not describe a valid model object."""


IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

NumericIdentity = NewType("NumericIdentity", int)
NodeName = NewType("NodeName", str)
EndpointID = NewType("EndpointID", str)

_MAX_REPR: Final = 60


def _short(value: object) -> str:
    """A one-line, bounded rendering of an arbitrary value for error messages."""
    text = repr(value)
    if len(text) > _MAX_REPR:
        text = text[: _MAX_REPR - 3] + "..."
    return text


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


# DNS-1123 label / subdomain (Kubernetes names), and the Kubernetes label name/value alphabet.
_DNS_LABEL = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
_DNS_LABEL_RE: Final = re.compile(_DNS_LABEL)
_DNS_SUBDOMAIN_RE: Final = re.compile(rf"{_DNS_LABEL}(?:\.{_DNS_LABEL})*")
_SIMPLE_LABEL_RE: Final = re.compile(r"[a-z0-9][-a-z0-9]*")
"""With a last character that is not ``-``: exactly :data:`_DNS_LABEL_RE`, faster."""
_LABEL_NAME_RE: Final = re.compile(r"[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?")
_BOOT_ID_RE: Final = re.compile(r"[A-Za-z0-9._-]*")
_ENDPOINT_ID_RE: Final = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces
_DECIMAL_RE: Final = re.compile(r"0|[1-9][0-9]*")

_DNS_LABEL_MAX: Final = 63
_DNS_SUBDOMAIN_MAX: Final = 253
_LABEL_NAME_MAX: Final = 63
_LABEL_VALUE_MAX: Final = 63
_BOOT_ID_MAX: Final = 128
_ENDPOINT_ID_MAX: Final = 512


# Node and namespace names repeat across records: the regex match is worth caching.
@functools.lru_cache(maxsize=4096)
def _is_dns_label(value: str) -> bool:
    return _DNS_LABEL_RE.fullmatch(value) is not None


@functools.lru_cache(maxsize=4096)
def _is_dns_subdomain(value: str) -> bool:
    return _DNS_SUBDOMAIN_RE.fullmatch(value) is not None


def _check_dns_label(what: str, value: object) -> str:
    if not isinstance(value, str):
        raise ModelError(f"{what}: expected str, got {type(value).__name__}")
    if not value:
        raise ModelError(f"{what}: must not be empty")
    if len(value) > _DNS_LABEL_MAX:
        raise ModelError(f"{what}: longer than {_DNS_LABEL_MAX} characters: {_short(value)}")
    if not _is_dns_label(value):
        raise ModelError(f"{what}: not a DNS-1123 label: {_short(value)}")
    return value


def _check_dns_subdomain(what: str, value: object) -> str:
    if not isinstance(value, str):
        raise ModelError(f"{what}: expected str, got {type(value).__name__}")
    if not value:
        raise ModelError(f"{what}: must not be empty")
    if len(value) > _DNS_SUBDOMAIN_MAX:
        raise ModelError(f"{what}: longer than {_DNS_SUBDOMAIN_MAX} characters: {_short(value)}")
    if not _is_dns_subdomain(value):
        raise ModelError(f"{what}: not a DNS-1123 subdomain: {_short(value)}")
    return value


def _check_address(what: str, value: object) -> IPAddress:
    if isinstance(value, IPv4Address):
        return value
    if not isinstance(value, IPv6Address):
        raise ModelError(f"{what}: expected an IP address, got {type(value).__name__}")
    if value.scope_id is not None:
        raise ModelError(f"{what}: scoped IPv6 addresses are not allowed: {value}")
    return value


def _check_network(what: str, value: object) -> IPNetwork:
    if not isinstance(value, IPv4Network | IPv6Network):
        raise ModelError(f"{what}: expected an IP network, got {type(value).__name__}")
    if isinstance(value, IPv6Network) and value.network_address.scope_id is not None:
        raise ModelError(f"{what}: scoped IPv6 networks are not allowed: {value}")
    return value


def _check_numeric_identity(what: str, value: object, *, allow_zero: bool = False) -> int:
    if not _is_int(value):
        raise ModelError(f"{what}: expected int, got {type(value).__name__}")
    low = 0 if allow_zero else 1
    if not low <= value <= MAX_NUMERIC_IDENTITY:
        raise ModelError(f"{what}: {value} outside {low}..{MAX_NUMERIC_IDENTITY}")
    return value


def _address(version: int, value: int) -> IPAddress:
    """Build an address of an explicit family (``ip_address(int)`` would guess IPv4)."""
    return IPv4Address(value) if version == 4 else IPv6Address(value)


def _network(version: int, address: int, prefix_len: int) -> IPNetwork:
    """Build a network of an explicit family from an int address and a prefix length."""
    if version == 4:
        return IPv4Network((address, prefix_len))
    return IPv6Network((address, prefix_len))


def _set(obj: object, name: str, value: object) -> None:
    """Assign a normalised field inside ``__post_init__`` of a frozen dataclass."""
    object.__setattr__(obj, name, value)


# --- parsing of text found in stored keys and values (raise InvalidRecord) ---------------


_inet_pton: Final = socket.inet_pton
_AF_INET: Final = socket.AF_INET
_from_bytes: Final = int.from_bytes


def parse_ip(text: object) -> IPAddress:
    """Parse an IP address from its text form; raises :class:`InvalidRecord`."""
    return _address_of(_packed_ip(text))


def _packed_ip(text: object) -> bytes:
    """:func:`parse_ip`'s address as 4 or 16 bytes, without building an address object."""
    if not isinstance(text, str):
        raise InvalidRecord(f"IP address: expected str, got {type(text).__name__}")
    # inet_pton accepts exactly the IPv4 texts ipaddress accepts; anything else (IPv6,
    # errors) goes to ipaddress, which decides.
    if ":" not in text:
        try:
            return _inet_pton(_AF_INET, text)
        except (OSError, ValueError):
            pass
    try:
        return _check_address("IP address", ipaddress.ip_address(text)).packed
    except ValueError:
        raise InvalidRecord(f"invalid IP address {_short(text)}") from None


def parse_canonical_ip(text: object) -> IPAddress:
    """:func:`parse_ip`, and the text must be the canonical form ``str(ip)``."""
    address = parse_ip(text)
    # an IPv4 text that parses is a dotted quad without leading zeros: canonical
    if address.version == 4 or str(address) == text:
        return address
    raise InvalidRecord(f"IP address {_short(text)} is not in canonical form ({address})")


def parse_cidr(text: object) -> IPNetwork:
    """Parse an IP network (no host bits set) from its text form; raises InvalidRecord."""
    if not isinstance(text, str):
        raise InvalidRecord(f"CIDR: expected str, got {type(text).__name__}")
    if "/" not in text:
        raise InvalidRecord(f"invalid CIDR (no prefix length) {_short(text)}")
    try:
        network = ipaddress.ip_network(text, strict=True)
        return _check_network("CIDR", network)
    except ValueError:
        raise InvalidRecord(f"invalid CIDR {_short(text)}") from None


def parse_numeric_identity(text: object) -> NumericIdentity:
    """Parse a canonical decimal identity (as found in keys); raises InvalidRecord."""
    if not isinstance(text, str) or not _DECIMAL_RE.fullmatch(text) or len(text) > 10:
        raise InvalidRecord(f"invalid numeric identity {_short(text)}")
    try:
        return NumericIdentity(_check_numeric_identity("numeric identity", int(text)))
    except ModelError as e:
        raise InvalidRecord(str(e)) from None


def parse_node_name(text: object) -> NodeName:
    """Validate a node name (a DNS-1123 subdomain, as in Kubernetes); raises InvalidRecord."""
    try:
        return NodeName(_check_dns_subdomain("node name", text))
    except ModelError as e:
        raise InvalidRecord(str(e)) from None


def parse_endpoint_id(text: object) -> EndpointID:
    """Validate an endpoint id (1..512 printable ASCII characters, no spaces)."""
    try:
        return EndpointID(_check_endpoint_id("endpoint id", text))
    except ModelError as e:
        raise InvalidRecord(str(e)) from None


def _check_endpoint_id(what: str, value: object) -> str:
    if not isinstance(value, str):
        raise ModelError(f"{what}: expected str, got {type(value).__name__}")
    if not value or len(value) > _ENDPOINT_ID_MAX or not _ENDPOINT_ID_RE.fullmatch(value):
        raise ModelError(
            f"{what}: must be 1..{_ENDPOINT_ID_MAX} printable ASCII characters "
            f"without spaces: {_short(value)}"
        )
    return value


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


def _packed_ip_field(kind: str, data: Mapping[Any, Any], name: str) -> bytes:
    try:
        return _packed_ip(_str_field(kind, data, name))
    except InvalidRecord as e:
        raise InvalidRecord(f"{kind}: field {name!r}: {e}") from None


def _ip_field(kind: str, data: Mapping[Any, Any], name: str) -> IPAddress:
    return _address_of(_packed_ip_field(kind, data, name))


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


# ---------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------

SOURCE_K8S: Final = "k8s"
SOURCE_RESERVED: Final = "reserved"
SOURCE_CIDR: Final = "cidr"
SOURCE_UNSPEC: Final = "unspec"
SOURCE_CONTAINER: Final = "container"
SOURCE_ANY: Final = "any"


def _label_error(message: str) -> InvalidLabel:
    return InvalidLabel(message)


def _check_label_source(source: object) -> str:
    if not isinstance(source, str):
        raise _label_error(f"label source: expected str, got {type(source).__name__}")
    if not source:
        raise _label_error("label source must not be empty")
    if len(source) > _DNS_LABEL_MAX or not _DNS_LABEL_RE.fullmatch(source):
        raise _label_error(
            f"label source must be a lowercase DNS label (a-z, 0-9, '-'): {_short(source)}"
        )
    return source


def _check_label_key(source: str, key: object) -> str:
    if not isinstance(key, str):
        raise _label_error(f"label key: expected str, got {type(key).__name__}")
    if not key:
        raise _label_error("label key must not be empty")
    if source == SOURCE_CIDR:
        return _check_cidr_key(key)
    prefix, slash, name = key.rpartition("/")
    if slash:
        if not prefix:
            raise _label_error(f"label key has an empty prefix: {_short(key)}")
        if len(prefix) > _DNS_SUBDOMAIN_MAX:
            raise _label_error(
                f"label key prefix longer than {_DNS_SUBDOMAIN_MAX} characters: {_short(key)}"
            )
        if not _DNS_SUBDOMAIN_RE.fullmatch(prefix):
            raise _label_error(f"label key prefix is not a lowercase DNS subdomain: {_short(key)}")
    if not name:
        raise _label_error(f"label key has an empty name: {_short(key)}")
    if len(name) > _LABEL_NAME_MAX:
        raise _label_error(
            f"label key name longer than {_LABEL_NAME_MAX} characters: {_short(key)}"
        )
    if not _LABEL_NAME_RE.fullmatch(name):
        raise _label_error(
            "label key name must be alphanumeric at both ends with only '-', '_', '.' inside: "
            + _short(key)
        )
    return key


def _check_cidr_key(key: str) -> str:
    if "/" not in key or "%" in key:
        raise _label_error(f"cidr label key must be an unscoped IP network: {_short(key)}")
    try:
        network = ipaddress.ip_network(key, strict=False)
        address = ipaddress.ip_address(key.partition("/")[0])
    except ValueError:
        raise _label_error(f"cidr label key is not an IP network: {_short(key)}") from None
    if network.network_address != address:
        raise _label_error(f"cidr label key has host bits set: {_short(key)}")
    if str(network) != key:
        raise _label_error(
            f"cidr label key is not in canonical form (expected {str(network)!r}): {_short(key)}"
        )
    return key


def _check_label_value(value: object) -> str:
    if not isinstance(value, str):
        raise _label_error(f"label value: expected str, got {type(value).__name__}")
    if len(value) > _LABEL_VALUE_MAX:
        raise _label_error(
            f"label value longer than {_LABEL_VALUE_MAX} characters: {_short(value)}"
        )
    if value and not _LABEL_NAME_RE.fullmatch(value):
        raise _label_error(
            "label value must be empty or alphanumeric at both ends with only '-', '_', '.' "
            "inside: " + _short(value)
        )
    return value


@dataclass(frozen=True, slots=True, order=True)
class Label:
    """One label: ``source:key=value``. See the module docstring for the syntax."""

    source: str
    key: str
    value: str = ""

    def __post_init__(self) -> None:
        source = _check_label_source(self.source)
        _check_label_key(source, self.key)
        _check_label_value(self.value)

    @classmethod
    def parse(cls, text: str) -> Self:
        """Parse ``[source:]key[=value]``; a missing source means ``unspec`` (as Cilium).

        The source is the text before the first ``:`` when that ``:`` comes before any
        ``=``. Raises :class:`InvalidLabel`.
        """
        if not isinstance(text, str):
            raise _label_error(f"label: expected str, got {type(text).__name__}")
        if not text:
            raise _label_error("label must not be empty")
        colon = text.find(":")
        equals = text.find("=")
        if colon >= 0 and (equals < 0 or colon < equals):
            source, rest = text[:colon], text[colon + 1 :]
        else:
            source, rest = SOURCE_UNSPEC, text
        key, _, value = rest.partition("=")
        return cls(source, key, value)

    def canonical(self) -> str:
        """``source:key=value``, or ``source:key`` when the value is empty."""
        if self.value:
            return f"{self.source}:{self.key}={self.value}"
        return f"{self.source}:{self.key}"

    def __str__(self) -> str:
        return self.canonical()

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "key": self.key, "value": self.value}

    @classmethod
    def from_dict(cls, data: object) -> Self:
        d = _record("Label", data)
        return _build(
            "Label",
            cls,
            source=_str_field("Label", d, "source"),
            key=_str_field("Label", d, "key"),
            value=_str_field("Label", d, "value"),
        )


KEY_COMPONENT_MAX_BYTES: Final = 200
_HASH_PREFIX: Final = "sha256:"


@dataclass(frozen=True, slots=True)
class Labels:
    """An immutable, hashable set of labels, kept sorted by ``(source, key, value)``.

    At most one label per ``(source, key)``; exact duplicates collapse. Build one with
    ``Labels.of(...)``, ``Labels.parse("k8s:app=web;k8s:tier=db")`` or
    ``Labels.from_strings([...])``.
    """

    labels: tuple[Label, ...] = ()

    def __post_init__(self) -> None:
        items = self.labels
        if isinstance(items, str | bytes) or not isinstance(items, Iterable):
            raise _label_error(f"labels: expected an iterable of Label, got {_short(items)}")
        unique: set[Label] = set()
        for item in items:
            if not isinstance(item, Label):
                raise _label_error(f"labels: expected Label, got {type(item).__name__}")
            unique.add(item)
        ordered = tuple(sorted(unique))
        for prev, cur in itertools.pairwise(ordered):
            if prev.source == cur.source and prev.key == cur.key:
                raise _label_error(
                    f"labels: conflicting values for {prev.source}:{prev.key}: "
                    f"{prev.value!r} and {cur.value!r}"
                )
        _set(self, "labels", ordered)

    @classmethod
    def of(cls, *labels: Label) -> Self:
        return cls(labels)

    @classmethod
    def from_strings(cls, texts: Iterable[str]) -> Self:
        """Parse each string with :meth:`Label.parse`. Raises :class:`InvalidLabel`."""
        if isinstance(texts, str | bytes):
            raise _label_error("labels: expected an iterable of strings, got a single string")
        return cls(tuple(Label.parse(t) for t in texts))

    @classmethod
    def parse(cls, text: str) -> Self:
        """Parse a ``;``-separated list (the canonical form, in any order); ``""`` is empty."""
        if not isinstance(text, str):
            raise _label_error(f"labels: expected str, got {type(text).__name__}")
        if not text:
            return cls()
        return cls.from_strings(text.split(";"))

    def canonical(self) -> str:
        """The injective canonical form (see the module docstring)."""
        return ";".join(label.canonical() for label in self.labels)

    def __str__(self) -> str:
        return self.canonical()

    def key_component(self) -> str:
        """A form safe as one etcd key segment.

        The canonical string when it is non-empty, at most ``KEY_COMPONENT_MAX_BYTES`` bytes,
        contains no ``/`` and does not start with ``sha256:``; otherwise ``sha256:`` + the
        hex SHA-256 of the canonical string (callers store the full labels in the value).
        The result is never empty and never contains ``/``, and distinct label sets give
        distinct results (barring a SHA-256 collision).
        """
        canonical = self.canonical()
        encoded = canonical.encode()
        if (
            canonical
            and len(encoded) <= KEY_COMPONENT_MAX_BYTES
            and "/" not in canonical
            and not canonical.startswith(_HASH_PREFIX)
        ):
            return canonical
        return _HASH_PREFIX + hashlib.sha256(encoded).hexdigest()

    def to_strings(self) -> list[str]:
        return [label.canonical() for label in self.labels]

    def __iter__(self) -> Iterator[Label]:
        return iter(self.labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __contains__(self, item: object) -> bool:
        return item in self.labels

    def issuperset(self, other: Labels) -> bool:
        """Whether every label of ``other`` is in this set (selector matching)."""
        return all(label in self.labels for label in other.labels)

    def union(self, other: Labels) -> Labels:
        """Both sets' labels; raises :class:`InvalidLabel` on a ``(source, key)`` conflict."""
        return Labels(self.labels + other.labels)

    def with_source(self, source: str) -> Labels:
        """The labels of one source."""
        return Labels(tuple(label for label in self.labels if label.source == source))

    def to_dict(self) -> dict[str, Any]:
        return {"labels": self.to_strings()}

    @classmethod
    def from_dict(cls, data: object) -> Self:
        d = _record("Labels", data)
        return cls._from_list("Labels", _list_field("Labels", d, "labels"))

    @classmethod
    def _from_list(cls, kind: str, items: list[object]) -> Self:
        texts: list[str] = []
        for item in items:
            if not isinstance(item, str):
                raise InvalidRecord(f"{kind}: labels: expected str, got {type(item).__name__}")
            texts.append(item)
        try:
            return cls.from_strings(texts)
        except InvalidLabel as e:
            raise InvalidRecord(f"{kind}: {e}") from None


# ---------------------------------------------------------------------------------------
# Identities
# ---------------------------------------------------------------------------------------

MAX_NUMERIC_IDENTITY: Final = 2**32 - 1  # identities are uint32 in the datapath

IDENTITY_UNKNOWN: Final = NumericIdentity(0)
IDENTITY_HOST: Final = NumericIdentity(1)
IDENTITY_WORLD: Final = NumericIdentity(2)
IDENTITY_UNMANAGED: Final = NumericIdentity(3)
IDENTITY_HEALTH: Final = NumericIdentity(4)
IDENTITY_INIT: Final = NumericIdentity(5)
IDENTITY_REMOTE_NODE: Final = NumericIdentity(6)
IDENTITY_KUBE_APISERVER: Final = NumericIdentity(7)
IDENTITY_INGRESS: Final = NumericIdentity(8)

#: Reserved identity → its single ``reserved:<name>`` label set (read-only).
RESERVED_IDENTITIES: Final[Mapping[NumericIdentity, Labels]] = MappingProxyType(
    {
        ident: Labels.of(Label(SOURCE_RESERVED, name))
        for ident, name in (
            (IDENTITY_HOST, "host"),
            (IDENTITY_WORLD, "world"),
            (IDENTITY_UNMANAGED, "unmanaged"),
            (IDENTITY_HEALTH, "health"),
            (IDENTITY_INIT, "init"),
            (IDENTITY_REMOTE_NODE, "remote-node"),
            (IDENTITY_KUBE_APISERVER, "kube-apiserver"),
            (IDENTITY_INGRESS, "ingress"),
        )
    }
)

_RESERVED_BY_LABEL: Final[Mapping[Label, NumericIdentity]] = MappingProxyType(
    {next(iter(labels)): ident for ident, labels in RESERVED_IDENTITIES.items()}
)
_HOST_LABEL: Final = Label(SOURCE_RESERVED, "host")


def is_reserved_identity(ident: int) -> bool:
    """Whether ``ident`` lies in the reserved range 1..255."""
    return RESERVED_IDENTITY_RANGE.contains(ident)


def reserved_labels(ident: int) -> Labels | None:
    """The label set of a well-known reserved identity, or None."""
    return RESERVED_IDENTITIES.get(NumericIdentity(ident))


def reserved_identity_for(labels: Labels) -> NumericIdentity | None:
    """The reserved identity a label set maps to, or None (allocate a cluster identity).

    As in Cilium: any set containing ``reserved:host`` is the host identity (the host may
    carry extra labels, e.g. its node labels); otherwise a set consisting of exactly one
    known ``reserved:<name>`` label maps to that identity. Anything else gives None.
    """
    if _HOST_LABEL in labels:
        return IDENTITY_HOST
    if len(labels) == 1:
        return _RESERVED_BY_LABEL.get(next(iter(labels)))
    return None


@dataclass(frozen=True, slots=True)
class IdentityRange:
    """An inclusive range ``first..last`` of numeric identities."""

    first: int
    last: int

    def __post_init__(self) -> None:
        first = _check_numeric_identity("identity range first", self.first, allow_zero=True)
        last = _check_numeric_identity("identity range last", self.last, allow_zero=True)
        if first > last:
            raise ModelError(f"identity range: first {first} > last {last}")

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    def contains(self, ident: int) -> bool:
        return self.first <= ident <= self.last

    def overlaps(self, other: IdentityRange) -> bool:
        return self.first <= other.last and other.first <= self.last

    def as_range(self) -> range:
        return range(self.first, self.last + 1)

    def __str__(self) -> str:
        return f"{self.first}..{self.last}"

    def to_dict(self) -> dict[str, Any]:
        return {"first": self.first, "last": self.last}

    @classmethod
    def from_dict(cls, data: object) -> Self:
        d = _record("IdentityRange", data)
        return _build(
            "IdentityRange",
            cls,
            first=_int_field("IdentityRange", d, "first"),
            last=_int_field("IdentityRange", d, "last"),
        )


RESERVED_IDENTITY_RANGE: Final = IdentityRange(1, 255)


def cluster_identity_range() -> IdentityRange:
    """Cilium's cluster-local identity range, 256..65535."""
    return IdentityRange(256, 65535)


def shard_identity_ranges(total: IdentityRange, shards: int) -> list[IdentityRange]:
    """Split ``total`` into ``shards`` disjoint, contiguous slices that cover it, in order.

    Slices differ in size by at most one (the first ``size % shards`` get one more ID).
    Raises :class:`ModelError` when ``shards < 1`` or a slice would be empty.
    """
    if not _is_int(shards) or shards < 1:
        raise ModelError(f"shard count must be a positive int, got {_short(shards)}")
    if shards > total.size:
        raise ModelError(
            f"cannot split identity range {total} ({total.size} IDs) into {shards} shards"
        )
    base, extra = divmod(total.size, shards)
    ranges: list[IdentityRange] = []
    start = total.first
    for index in range(shards):
        count = base + (1 if index < extra else 0)
        ranges.append(IdentityRange(start, start + count - 1))
        start += count
    return ranges


@dataclass(frozen=True, slots=True)
class Identity:
    """A security identity: a numeric ID (1..2**32-1) bound to a label set."""

    id: NumericIdentity
    labels: Labels

    def __post_init__(self) -> None:
        _check_numeric_identity("identity id", self.id)
        if not isinstance(self.labels, Labels):
            raise ModelError(f"identity labels: expected Labels, got {type(self.labels).__name__}")

    @property
    def is_reserved(self) -> bool:
        return is_reserved_identity(self.id)

    def to_dict(self) -> dict[str, Any]:
        return {"id": int(self.id), "labels": self.labels.to_strings()}

    @classmethod
    def from_dict(cls, data: object) -> Self:
        d = _record("Identity", data)
        ident = _int_field("Identity", d, "id")
        labels = Labels._from_list("Identity", _list_field("Identity", d, "labels"))
        return _build("Identity", cls, id=NumericIdentity(ident), labels=labels)


# ---------------------------------------------------------------------------------------
# Endpoints, nodes, leases
# ---------------------------------------------------------------------------------------


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
            self.ip.packed, self.prefix_len, self.identity, self.node, self.host_ip.packed
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
    return IPIdentity(ip, prefix_len, NumericIdentity(identity), NodeName(node), host_ip)


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
    return IPIdentity(ip, prefix_len, record.identity, node, host_ip)


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


def _address_of(packed: bytes) -> IPAddress:
    return IPv4Address(_from_bytes(packed)) if len(packed) == 4 else IPv6Address(packed)


@dataclass(frozen=True, slots=True, kw_only=True)
class Node:
    """A node as published by its agent.

    ``ips`` (primary first) and ``pod_cidrs`` are tuples without duplicates; lists are
    accepted and converted. ``boot_id`` is 0..128 characters of ``[A-Za-z0-9._-]`` (a
    kernel boot UUID; empty when unknown).
    """

    name: NodeName
    ips: tuple[IPAddress, ...] = ()
    pod_cidrs: tuple[IPNetwork, ...] = ()
    boot_id: str = ""

    def __post_init__(self) -> None:
        _check_dns_subdomain("node name", self.name)
        ips = _as_tuple("node ips", self.ips)
        for ip in ips:
            _check_address("node ip", ip)
        if len(set(ips)) != len(ips):
            raise ModelError("node ips contain duplicates")
        cidrs = _as_tuple("node pod_cidrs", self.pod_cidrs)
        for cidr in cidrs:
            _check_network("node pod cidr", cidr)
        if len(set(cidrs)) != len(cidrs):
            raise ModelError("node pod_cidrs contain duplicates")
        if not isinstance(self.boot_id, str):
            raise ModelError(f"node boot_id: expected str, got {type(self.boot_id).__name__}")
        if len(self.boot_id) > _BOOT_ID_MAX or not _BOOT_ID_RE.fullmatch(self.boot_id):
            raise ModelError(f"node boot_id: invalid {_short(self.boot_id)}")
        _set(self, "ips", ips)
        _set(self, "pod_cidrs", cidrs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": str(self.name),
            "ips": [str(ip) for ip in self.ips],
            "pod_cidrs": [str(c) for c in self.pod_cidrs],
            "boot_id": self.boot_id,
        }

    @classmethod
    def from_dict(cls, data: object) -> Self:
        k = "Node"
        d = _record(k, data)
        name = _str_field(k, d, "name")
        ips = tuple(_parse_item(k, "ips", parse_ip, v) for v in _list_field(k, d, "ips"))
        cidrs = tuple(
            _parse_item(k, "pod_cidrs", parse_cidr, v) for v in _list_field(k, d, "pod_cidrs")
        )
        boot_id = _str_field(k, d, "boot_id")
        return _build(k, cls, name=NodeName(name), ips=ips, pod_cidrs=cidrs, boot_id=boot_id)


def _parse_item(kind: str, name: str, parse: Callable[[object], _T], value: object) -> _T:
    try:
        return parse(value)
    except InvalidRecord as e:
        raise InvalidRecord(f"{kind}: field {name!r}: {e}") from None


def _as_tuple(what: str, value: object) -> tuple[Any, ...]:
    if isinstance(value, tuple):
        return value
    if isinstance(value, list):
        return tuple(value)
    raise ModelError(f"{what}: expected a tuple, got {type(value).__name__}")


@dataclass(frozen=True, slots=True, kw_only=True)
class IPLease:
    """An IP held by an endpoint on a node (the node-local IPAM's record)."""

    node: NodeName
    ip: IPAddress
    owner: EndpointID

    def __post_init__(self) -> None:
        _check_dns_subdomain("lease node", self.node)
        _check_address("lease ip", self.ip)
        _check_endpoint_id("lease owner", self.owner)

    def to_dict(self) -> dict[str, Any]:
        return {"node": str(self.node), "ip": str(self.ip), "owner": str(self.owner)}

    @classmethod
    def from_dict(cls, data: object) -> Self:
        k = "IPLease"
        d = _record(k, data)
        return _build(
            k,
            cls,
            node=NodeName(_str_field(k, d, "node")),
            ip=_ip_field(k, d, "ip"),
            owner=EndpointID(_str_field(k, d, "owner")),
        )


# ---------------------------------------------------------------------------------------
# CIDR pool and node-local usable addresses
# ---------------------------------------------------------------------------------------

DEFAULT_CLUSTER_POOL: Final = IPv4Network("10.0.0.0/8")
DEFAULT_CLUSTER_POOL_MASK_SIZE: Final = 24


@dataclass(frozen=True, slots=True)
class CIDRPool:
    """The cluster pool that per-node pod CIDRs are cut from (IPv4 or IPv6).

    Default: ``10.0.0.0/8`` in ``/24`` slices, named ``default``. Slice ``i`` is the
    ``i``-th ``/mask_size`` subnet of ``cidr`` in address order. ``name`` (a DNS-1123
    label) identifies the pool in keys.
    """

    cidr: IPNetwork = DEFAULT_CLUSTER_POOL
    mask_size: int = DEFAULT_CLUSTER_POOL_MASK_SIZE
    name: str = "default"

    def __post_init__(self) -> None:
        cidr = _check_network("pool cidr", self.cidr)
        if not _is_int(self.mask_size) or not (
            cidr.prefixlen <= self.mask_size <= cidr.max_prefixlen
        ):
            raise ModelError(
                f"pool mask size must be {cidr.prefixlen}..{cidr.max_prefixlen} for {cidr}, "
                f"got {_short(self.mask_size)}"
            )
        _check_dns_label("pool name", self.name)

    @property
    def size(self) -> int:
        """The number of ``/mask_size`` CIDRs in the pool."""
        return 1 << (self.mask_size - self.cidr.prefixlen)

    @property
    def _shift(self) -> int:
        return self.cidr.max_prefixlen - self.mask_size

    def iter_cidrs(self) -> Iterator[IPNetwork]:
        """Every CIDR of the pool, in index order (lazy)."""
        for index in range(self.size):
            yield self.cidr_at(index)

    def contains(self, cidr: IPNetwork) -> bool:
        """Whether ``cidr`` is one of the pool's CIDRs (right family, inside, right mask)."""
        return (
            isinstance(cidr, IPv4Network | IPv6Network)
            and cidr.version == self.cidr.version
            and cidr.prefixlen == self.mask_size
            and cidr.subnet_of(self.cidr)  # type: ignore[arg-type]
        )

    def validate(self, cidr: IPNetwork) -> None:
        """Raise :class:`ModelError` unless ``cidr`` is one of the pool's CIDRs."""
        if not self.contains(cidr):
            raise ModelError(
                f"{_short(str(cidr))} is not a /{self.mask_size} inside pool "
                f"{self.name} ({self.cidr})"
            )

    def index_of(self, cidr: IPNetwork) -> int:
        """The index of ``cidr`` in the pool; raises :class:`ModelError` if not in it."""
        self.validate(cidr)
        return (int(cidr.network_address) - int(self.cidr.network_address)) >> self._shift

    def cidr_at(self, index: int) -> IPNetwork:
        """The CIDR at ``index`` (0..size-1); raises :class:`ModelError` out of range."""
        if not _is_int(index) or not 0 <= index < self.size:
            raise ModelError(f"pool index {_short(index)} outside 0..{self.size - 1}")
        address = int(self.cidr.network_address) + (index << self._shift)
        return _network(self.cidr.version, address, self.mask_size)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "cidr": str(self.cidr), "mask_size": self.mask_size}

    @classmethod
    def from_dict(cls, data: object) -> Self:
        k = "CIDRPool"
        d = _record(k, data)
        name = _str_field(k, d, "name")
        try:
            cidr = parse_cidr(_str_field(k, d, "cidr"))
        except InvalidRecord as e:
            raise InvalidRecord(f"{k}: field 'cidr': {e}") from None
        mask_size = _int_field(k, d, "mask_size")
        return _build(k, cls, cidr=cidr, mask_size=mask_size, name=name)


def _usable_bounds(cidr: IPNetwork) -> tuple[int, int]:
    """``(router, last)`` as ints; ``router > last`` means no usable address.

    Candidates are the CIDR's addresses minus the network address (IPv4 network address;
    IPv6 subnet-router anycast address) and, for IPv4, minus the broadcast address. The
    first candidate is reserved for the node's router (gateway), as Cilium does.
    """
    network = _check_network("cidr", cidr)
    low = int(network.network_address) + 1
    high = int(network.broadcast_address) - (1 if network.version == 4 else 0)
    if low > high:  # /32, /31 (IPv4) and /128: no candidates at all
        return low, low - 1
    return low, high


def router_ip(cidr: IPNetwork) -> IPAddress | None:
    """The address reserved for the node's router/gateway: the first usable address of
    ``cidr`` (``.1`` of an IPv4 /24, ``::1`` of an IPv6 subnet); None if the CIDR is too
    small to have one."""
    router, last = _usable_bounds(cidr)
    if router > last:
        return None
    return _address(cidr.version, router)


def usable_ips(cidr: IPNetwork) -> Iterator[IPAddress]:
    """The addresses the node-local allocator may hand to endpoints, in order (lazy).

    Excludes the network address, the IPv4 broadcast address and the router address
    (:func:`router_ip`). A /24 yields ``.2``..``.254`` (253 addresses).
    """
    router, last = _usable_bounds(cidr)
    for value in range(router + 1, last + 1):
        yield _address(cidr.version, value)


def usable_ip_count(cidr: IPNetwork) -> int:
    """``len(list(usable_ips(cidr)))`` without iterating."""
    router, last = _usable_bounds(cidr)
    return max(0, last - router)


def is_usable_ip(cidr: IPNetwork, ip: IPAddress) -> bool:
    """Whether ``ip`` is one of :func:`usable_ips` of ``cidr``."""
    if not isinstance(ip, IPv4Address | IPv6Address) or ip.version != cidr.version:
        return False
    router, last = _usable_bounds(cidr)
    return router < int(ip) <= last


# ---------------------------------------------------------------------------------------
# Network policy (small, Cilium-like)
# ---------------------------------------------------------------------------------------

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
