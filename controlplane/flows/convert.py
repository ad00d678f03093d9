"""Datapath flow events into Hubble's ``flow.Flow`` messages, enriched from the agent's view.

A :class:`~controlplane.datapath.flowevents.RawFlow` knows addresses, ports, the verdict
and where it was seen; a :class:`Resolver` (the agent's caches) names both sides: pod,
namespace, labels and identity. The message's fields keep Hubble's meanings:

- ``traffic_direction`` is the connection's direction for the local endpoint: INGRESS when
  the peer opened it, EGRESS when the pod did (a reply travels the other way but keeps
  its connection's direction, as in Hubble);
- ``is_reply`` says whether the packet goes against the connection's direction;
- ``trace_observation_point`` is TO_ENDPOINT for ``cp_to_endpoint`` (the host veth's
  egress, toward the pod) and FROM_ENDPOINT for ``cp_from_endpoint``;
- ``event_type`` is Cilium's monitor message type (1 drop, 4 trace, 5 policy verdict)
  with, for drops, the drop reason as sub-type;
- ``source``/``destination`` are the packet's sender and receiver.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from controlplane.datapath.flowevents import FlowFlag, FlowKind, FlowType, RawFlow
from controlplane.datapath.layouts import MetricReason
from controlplane.flows.proto import flow_pb2 as pb

__all__ = [
    "DROP_REASONS",
    "IPPROTO_NAMES",
    "FlowConverter",
    "PeerInfo",
    "Resolver",
    "StaticResolver",
    "address_text",
    "tcp_flag_names",
    "to_flow",
]

IPPROTO_TCP: Final = 6
IPPROTO_UDP: Final = 17
IPPROTO_ICMP: Final = 1
IPPROTO_ICMPV6: Final = 58
IPPROTO_SCTP: Final = 132
IPPROTO_NAMES: Final = {
    IPPROTO_TCP: "TCP",
    IPPROTO_UDP: "UDP",
    IPPROTO_ICMP: "ICMPv4",
    IPPROTO_ICMPV6: "ICMPv6",
    IPPROTO_SCTP: "SCTP",
}

DROP_REASONS: Final[dict[int, pb.DropReason]] = {
    MetricReason.DROP_POLICY_DENY: pb.POLICY_DENIED,
    MetricReason.DROP_MALFORMED: pb.CT_TRUNCATED_OR_INVALID_HEADER,
    MetricReason.DROP_FRAGMENT: pb.IP_FRAGMENTATION_NOT_SUPPORTED,
}
"""The datapath's drop reasons as Hubble's ``DropReason``."""

_TCP_FLAGS: Final = (
    (0x01, "FIN"),
    (0x02, "SYN"),
    (0x04, "RST"),
    (0x08, "PSH"),
    (0x10, "ACK"),
    (0x20, "URG"),
    (0x40, "ECE"),
    (0x80, "CWR"),
)
_V4_MAPPED: Final = b"\x00" * 10 + b"\xff\xff"
_ICMP_TYPES: Final[dict[tuple[bool, int], int]] = {
    (False, FlowKind.ECHO_REQUEST): 8,
    (False, FlowKind.ECHO_REPLY): 0,
    (True, FlowKind.ECHO_REQUEST): 128,
    (True, FlowKind.ECHO_REPLY): 129,
}
_F_TO_ENDPOINT: Final = int(FlowFlag.TO_ENDPOINT)
_F_REPLY: Final = int(FlowFlag.REPLY)
_F_IDENTITY: Final = int(FlowFlag.IDENTITY)
_T_DROP: Final = int(FlowType.DROP)
_T_TRACE: Final = int(FlowType.TRACE)
_TRACE_FROM_LXC: Final = 5
"""Cilium's trace sub-type of a packet from an endpoint (TraceFromLxc); TO is 0."""


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """What the agent knows of an address: a pod (namespace and name), or only an identity
    (a node, the world)."""

    identity: int
    labels: tuple[str, ...] = ()
    namespace: str = ""
    pod_name: str = ""
    endpoint_id: int = 0


class Resolver(Protocol):
    """The agent's caches as the converter asks them."""

    def peer(self, address: str) -> PeerInfo | None:
        """The endpoint or node at ``address`` (text form), or None."""

    def labels(self, identity: int) -> tuple[str, ...]:
        """The labels of ``identity`` (``source:key=value``), or ()."""


@dataclass(slots=True)
class StaticResolver:
    """A :class:`Resolver` over fixed tables (tests, benchmarks)."""

    peers: dict[str, PeerInfo]
    identity_labels: dict[int, tuple[str, ...]]

    def peer(self, address: str) -> PeerInfo | None:
        return self.peers.get(address)

    def labels(self, identity: int) -> tuple[str, ...]:
        return self.identity_labels.get(identity, ())


def address_text(raw: bytes) -> tuple[str, bool]:
    """A 16-byte datapath address (IPv4-mapped for IPv4) as text; and whether it is IPv6."""
    if raw[:12] == _V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, raw[12:]), False
    return socket.inet_ntop(socket.AF_INET6, raw), True


def tcp_flag_names(flags: int) -> list[str]:
    return [name for bit, name in _TCP_FLAGS if flags & bit]


def _endpoint(resolver: Resolver, address: str, identity: int, *, local_id: int = 0) -> pb.Endpoint:
    info = resolver.peer(address)
    if info is None:
        ident = identity or 2  # reserved:world, as the datapath decides for a miss
        return pb.Endpoint(ID=local_id, identity=ident, labels=resolver.labels(ident))
    ident = info.identity or identity
    labels: Sequence[str] = info.labels or resolver.labels(ident)
    return pb.Endpoint(
        ID=local_id or info.endpoint_id,
        identity=ident,
        namespace=info.namespace,
        labels=labels,
        pod_name=info.pod_name,
    )


def _layer4(l4: pb.Layer4, raw: RawFlow) -> None:
    proto = raw.proto
    if proto == IPPROTO_TCP:
        tcp = l4.TCP
        tcp.source_port = raw.sport
        tcp.destination_port = raw.dport
        flags = raw.tcp_flags
        out = tcp.flags
        out.SetInParent()
        for bit, name in _TCP_FLAGS:
            if flags & bit:
                setattr(out, name, True)
    elif proto == IPPROTO_UDP:
        l4.UDP.source_port = raw.sport
        l4.UDP.destination_port = raw.dport
    elif proto == IPPROTO_SCTP:
        l4.SCTP.source_port = raw.sport
        l4.SCTP.destination_port = raw.dport
    elif proto == IPPROTO_ICMP:
        l4.ICMPv4.type = _ICMP_TYPES.get((False, raw.kind), 0)
        l4.ICMPv4.SetInParent()
    elif proto == IPPROTO_ICMPV6:
        l4.ICMPv6.type = _ICMP_TYPES.get((True, raw.kind), 0)
        l4.ICMPv6.SetInParent()


class FlowConverter:
    """:func:`to_flow` with the endpoints of recent addresses kept (a second at most, so
    a changed pod or identity shows within a second): most flows repeat their peers."""

    def __init__(self, node: str, resolver: Resolver, ttl: float = 1.0) -> None:
        self.node = node
        self.resolver = resolver
        self.ttl = ttl
        self._endpoints: dict[tuple[str, int, int], pb.Endpoint] = {}
        self._since = time.monotonic()

    def _endpoint(self, address: str, identity: int, local_id: int) -> pb.Endpoint:
        key = (address, identity, local_id)
        ep = self._endpoints.get(key)
        if ep is None:
            if len(self._endpoints) > 8192:
                self._endpoints.clear()
            ep = _endpoint(self.resolver, address, identity, local_id=local_id)
            self._endpoints[key] = ep
        return ep

    def expire(self) -> None:
        """Forget the kept endpoints once they are ``ttl`` old (call once per batch)."""
        now = time.monotonic()
        if now - self._since >= self.ttl:
            self._endpoints.clear()
            self._since = now

    def fill(self, flow: pb.Flow, raw: RawFlow, wall_ns: int) -> None:
        """Write the event into ``flow`` (a new message, e.g. a response's ``flow``)."""
        src, ipv6 = address_text(raw.src)
        dst, _ = address_text(raw.dst)
        flags = raw.flags
        to_ep = bool(flags & _F_TO_ENDPOINT)
        reply = bool(flags & _F_REPLY)
        remote = raw.identity if flags & _F_IDENTITY else 0
        if to_ep:
            flow.source.CopyFrom(self._endpoint(src, remote, 0))
            flow.destination.CopyFrom(self._endpoint(dst, 0, raw.endpoint_id))
        else:
            flow.source.CopyFrom(self._endpoint(src, 0, raw.endpoint_id))
            flow.destination.CopyFrom(self._endpoint(dst, remote, 0))
        flow.time.seconds = wall_ns // 1_000_000_000
        flow.time.nanos = wall_ns % 1_000_000_000
        ip = flow.IP
        ip.source = src
        ip.destination = dst
        ip.ipVersion = pb.IPv6 if ipv6 else pb.IPv4
        flow.Type = pb.L3_L4
        flow.node_name = self.node
        flow.reply = reply
        flow.is_reply.value = reply
        flow.traffic_direction = pb.INGRESS if to_ep != reply else pb.EGRESS
        flow.trace_observation_point = pb.TO_ENDPOINT if to_ep else pb.FROM_ENDPOINT
        _layer4(flow.l4, raw)
        kind = raw.type
        flow.event_type.type = kind
        if kind == _T_DROP:
            reason = DROP_REASONS.get(raw.reason, pb.DROP_REASON_UNKNOWN)
            flow.verdict = pb.DROPPED
            flow.drop_reason = reason
            flow.drop_reason_desc = reason
            flow.event_type.sub_type = reason
        else:
            flow.verdict = pb.FORWARDED
            if kind == _T_TRACE and not to_ep:
                flow.event_type.sub_type = _TRACE_FROM_LXC


def to_flow(raw: RawFlow, wall_ns: int, node: str, resolver: Resolver) -> pb.Flow:
    """The ``flow.Flow`` of one event seen at ``wall_ns`` (ns since the epoch) on ``node``."""
    flow = pb.Flow()
    FlowConverter(node, resolver).fill(flow, raw, wall_ns)
    return flow
