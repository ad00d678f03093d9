"""IP addresses and networks: their checks, builders of an explicit family, and the parsers
of text found in stored keys and values (:func:`parse_ip` with its IPv4 fast path,
:func:`parse_canonical_ip`, :func:`parse_cidr`; raise
:class:`~controlplane.model.errors.InvalidRecord`).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, Final

from controlplane.model._checks import _short, _str_field
from controlplane.model.errors import InvalidRecord, ModelError

__all__ = [
    "IPAddress",
    "IPNetwork",
    "parse_canonical_ip",
    "parse_cidr",
    "parse_ip",
]

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network


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


def _address(version: int, value: int) -> IPAddress:
    """Build an address of an explicit family (``ip_address(int)`` would guess IPv4)."""
    return IPv4Address(value) if version == 4 else IPv6Address(value)


def _network(version: int, address: int, prefix_len: int) -> IPNetwork:
    """Build a network of an explicit family from an int address and a prefix length."""
    if version == 4:
        return IPv4Network((address, prefix_len))
    return IPv6Network((address, prefix_len))


# --- parsing of text found in stored keys and values (raise InvalidRecord) ---------------


_inet_pton: Final = socket.inet_pton
_AF_INET: Final = socket.AF_INET
_from_bytes: Final = int.from_bytes


def _address_of(packed: bytes) -> IPAddress:
    return IPv4Address(_from_bytes(packed)) if len(packed) == 4 else IPv6Address(packed)


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


def _packed_ip_field(kind: str, data: Mapping[Any, Any], name: str) -> bytes:
    try:
        return _packed_ip(_str_field(kind, data, name))
    except InvalidRecord as e:
        raise InvalidRecord(f"{kind}: field {name!r}: {e}") from None


def _ip_field(kind: str, data: Mapping[Any, Any], name: str) -> IPAddress:
    return _address_of(_packed_ip_field(kind, data, name))
