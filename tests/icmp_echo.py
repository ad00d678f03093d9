"""ICMP echo over raw sockets inside a network namespace (no ping binary needed)."""

from __future__ import annotations

import secrets
import select
import socket
import struct
import time

from controlplane.datapath import loader

ECHO_REQUEST, ECHO_REPLY = 8, 0


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def echo_request(ident: int, seq: int) -> bytes:
    payload = b"cp-e2e-icmp-" + seq.to_bytes(2, "big")
    header = struct.pack("!BBHHH", ECHO_REQUEST, 0, 0, ident, seq)
    csum = checksum(header + payload)
    return struct.pack("!BBHHH", ECHO_REQUEST, 0, csum, ident, seq) + payload


def echo_reply(packet: bytes, src_ip: str, ident: int) -> int | None:
    """The sequence number of ``packet`` (IPv4 header included, as a raw socket reads it) if
    it is an echo reply from ``src_ip`` with ``ident`` and a valid checksum, else None."""
    ihl = (packet[0] & 0x0F) * 4
    icmp = packet[ihl:]
    if len(packet) < 20 or len(icmp) < 8 or socket.inet_ntoa(packet[12:16]) != src_ip:
        return None
    kind, code, _, got_ident, seq = struct.unpack_from("!BBHHH", icmp)
    if kind != ECHO_REPLY or code != 0 or got_ident != ident or checksum(icmp) != 0:
        return None
    return int(seq)


def raw_icmp(netns: str) -> socket.socket:
    """A raw ICMP socket in ``netns`` (only the network namespace is entered)."""
    with loader.in_netns(netns):
        return socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)


def ping(src_ns: str, dst_ip: str, timeout: float) -> bool:
    """One ICMP echo from ``src_ns`` to ``dst_ip``: whether its reply (same id and seq)
    arrives within ``timeout`` seconds."""
    ident, seq = secrets.randbelow(0x10000), secrets.randbelow(0x10000)
    with raw_icmp(src_ns) as sock:
        sock.sendto(echo_request(ident, seq), (dst_ip, 0))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([sock], [], [], left)
            if ready and echo_reply(sock.recv(65535), dst_ip, ident) == seq:
                return True
        return False
