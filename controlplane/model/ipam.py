"""IPAM: :class:`IPLease` (an IP held by an endpoint), :class:`CIDRPool` (the cluster pool
that node pod CIDRs are cut from) and the usable addresses of a node's CIDR
(:func:`router_ip`, :func:`usable_ips` and friends).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, Final, Self

from controlplane.model._checks import (
    _build,
    _int_field,
    _is_int,
    _record,
    _short,
    _str_field,
)
from controlplane.model.addresses import (
    IPAddress,
    IPNetwork,
    _address,
    _check_address,
    _check_network,
    _ip_field,
    _network,
    parse_cidr,
)
from controlplane.model.errors import InvalidRecord, ModelError
from controlplane.model.names import (
    EndpointID,
    NodeName,
    _check_dns_label,
    _check_dns_subdomain,
    _check_endpoint_id,
)

__all__ = [
    "DEFAULT_CLUSTER_POOL",
    "DEFAULT_CLUSTER_POOL_MASK_SIZE",
    "CIDRPool",
    "IPLease",
    "is_usable_ip",
    "router_ip",
    "usable_ip_count",
    "usable_ips",
]


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
