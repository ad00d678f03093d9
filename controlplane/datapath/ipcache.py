"""The ipcache: prefix -> (identity, tunnel endpoint, flags), as the tc program reads it.

Key and value are fixed C structs, mirrored here with ctypes (little-endian hosts; the
kernel map stores host byte order for the integers and network order for addresses)::

    struct ipcache_key {            /* BPF_MAP_TYPE_LPM_TRIE key, 20 bytes */
        __u32 prefixlen;            /* bits of addr that count: 96 + n for IPv4 /n */
        __u8  addr[16];             /* IPv6, or IPv4-mapped IPv6 (::ffff:a.b.c.d) */
    };
    struct ipcache_value {          /* 24 bytes */
        __u32 sec_identity;
        __u8  tunnel_endpoint[16];  /* host IP of the owning node (IPv4-mapped for v4) */
        __u8  flags;
        __u8  pad[3];
    };

IPv4 prefixes are stored IPv4-mapped so that one LPM trie serves both families.
"""

from __future__ import annotations

import ctypes
import ipaddress
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Final

from controlplane.datapath.maps import Map, UserspaceMap
from controlplane.model import IPAddress, IPIdentity, IPNetwork, NumericIdentity

IPCACHE_MAP_NAME: Final = "cp_ipcache"
IPCACHE_MAX_ENTRIES: Final = 512 * 1024

FLAG_LOCAL: Final = 0x01
"""The prefix is an endpoint (or the host) of this node."""
FLAG_NODE: Final = 0x02
"""The prefix is a node's own IP (not an endpoint)."""

_V4_MAPPED_BITS: Final = 96
_V4_MAPPED_PREFIX: Final = b"\x00" * 10 + b"\xff\xff"


class IpcacheKey(ctypes.Structure):
    _fields_ = (("prefixlen", ctypes.c_uint32), ("addr", ctypes.c_uint8 * 16))


class IpcacheValue(ctypes.Structure):
    _fields_ = (
        ("sec_identity", ctypes.c_uint32),
        ("tunnel_endpoint", ctypes.c_uint8 * 16),
        ("flags", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
    )


KEY_SIZE: Final = ctypes.sizeof(IpcacheKey)
VALUE_SIZE: Final = ctypes.sizeof(IpcacheValue)
assert KEY_SIZE == 20 and VALUE_SIZE == 24, "ipcache layouts must match bpf/cp_maps.h"

# The same layouts as struct formats: packing through ctypes costs ~10x more, and the
# agent encodes every entry of a cold sync.
_KEY_STRUCT: Final = struct.Struct("=I16s")
_VALUE_STRUCT: Final = struct.Struct("=I16sB3x")
assert _KEY_STRUCT.size == KEY_SIZE and _VALUE_STRUCT.size == VALUE_SIZE


def _addr16(ip: IPAddress) -> bytes:
    return _mapped16(ip.packed)


def _mapped16(packed: bytes) -> bytes:
    """A packed IPv4 (4 bytes) as IPv4-mapped IPv6; IPv6 (16 bytes) as is."""
    return _V4_MAPPED_PREFIX + packed if len(packed) == 4 else packed


def _pack_key(packed: bytes, prefix_len: int) -> bytes:
    bits = prefix_len + _V4_MAPPED_BITS if len(packed) == 4 else prefix_len
    return _KEY_STRUCT.pack(bits, _mapped16(packed))


def address_from16(raw: bytes) -> IPAddress:
    """A 16-byte address as the maps hold it: IPv4-mapped back to IPv4, else IPv6."""
    if raw.startswith(_V4_MAPPED_PREFIX):
        return IPv4Address(raw[12:])
    return IPv6Address(raw)


def encode_key(prefix: IPNetwork) -> bytes:
    return _pack_key(prefix.network_address.packed, prefix.prefixlen)


def decode_key(raw: bytes) -> IPNetwork:
    key = IpcacheKey.from_buffer_copy(raw)
    addr = bytes(key.addr)
    if addr.startswith(_V4_MAPPED_PREFIX) and key.prefixlen >= _V4_MAPPED_BITS:
        return IPv4Network((IPv4Address(addr[12:]), key.prefixlen - _V4_MAPPED_BITS))
    return IPv6Network((IPv6Address(addr), key.prefixlen))


# These two run for every endpoint of a cold sync: _pack_key and _mapped16, inlined.
def ip_identity_key(pair: IPIdentity) -> bytes:
    """The ipcache key of an endpoint: its ``ip/prefix_len``."""
    ip = pair.ip
    if len(ip) == 4:
        return _KEY_STRUCT.pack(pair.prefix_len + _V4_MAPPED_BITS, _V4_MAPPED_PREFIX + ip)
    return _KEY_STRUCT.pack(pair.prefix_len, ip)


def ip_identity_value(pair: IPIdentity, flags: int = 0) -> bytes:
    """The encoded :class:`IpcacheEntry` of an endpoint: its identity, on its node."""
    host_ip = pair.host_ip
    if len(host_ip) == 4:
        host_ip = _V4_MAPPED_PREFIX + host_ip
    return _VALUE_STRUCT.pack(pair.identity, host_ip, flags)


@dataclass(frozen=True, slots=True)
class IpcacheEntry:
    """What the datapath learns about a source prefix."""

    identity: NumericIdentity
    tunnel_endpoint: IPAddress
    """The host IP of the node the prefix lives on."""
    flags: int = 0

    def encode(self) -> bytes:
        return _VALUE_STRUCT.pack(self.identity, _addr16(self.tunnel_endpoint), self.flags)

    @classmethod
    def decode(cls, raw: bytes) -> IpcacheEntry:
        value = IpcacheValue.from_buffer_copy(raw)
        return cls(
            NumericIdentity(value.sec_identity),
            address_from16(bytes(value.tunnel_endpoint)),
            value.flags,
        )


class Ipcache:
    """The ipcache over any :class:`Map` (userspace now, the pinned kernel map later)."""

    def __init__(self, map_: Map) -> None:
        if map_.key_size != KEY_SIZE or map_.value_size != VALUE_SIZE:
            raise ValueError(
                f"map {map_.name} has key/value sizes {map_.key_size}/{map_.value_size}, "
                f"the ipcache needs {KEY_SIZE}/{VALUE_SIZE}"
            )
        self.map = map_

    def get(self, prefix: IPNetwork) -> IpcacheEntry | None:
        raw = self.map.lookup(encode_key(prefix))
        return IpcacheEntry.decode(raw) if raw is not None else None

    def lookup_ip(self, ip: IPAddress) -> tuple[IPNetwork, IpcacheEntry] | None:
        """Longest-prefix match, as the tc program does (userspace walk, for tools/tests)."""
        for bits in range(ip.max_prefixlen, -1, -1):
            prefix = ipaddress.ip_network((ip, bits), strict=False)
            entry = self.get(prefix)
            if entry is not None:
                return prefix, entry
        return None

    def entries(self) -> Iterator[tuple[IPNetwork, IpcacheEntry]]:
        for key, value in self.map.items():
            yield decode_key(key), IpcacheEntry.decode(value)

    def dump(self) -> dict[IPNetwork, IpcacheEntry]:
        return dict(self.entries())

    def __len__(self) -> int:
        return len(self.map)


def userspace_ipcache(max_entries: int = IPCACHE_MAX_ENTRIES) -> Ipcache:
    """An ipcache on a fresh dict-backed map (no root or eBPF needed)."""
    return Ipcache(UserspaceMap(IPCACHE_MAP_NAME, KEY_SIZE, VALUE_SIZE, max_entries))
