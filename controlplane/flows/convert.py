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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from google.protobuf.timestamp_pb2 import Timestamp
from google.protobuf.wrappers_pb2 import BoolValue

from controlplane.datapath.flowevents import FlowFlag, FlowKind, FlowType, RawFlow
from controlplane.datapath.layouts import MetricReason
from controlplane.flows.proto import flow_pb2 as pb

__all__ = [
    "DROP_REASONS",
    "IPPROTO_NAMES",
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
_ICMP_TYPES: Final = {
    (False, FlowKind.ECHO_REQUEST): 8,
    (False, FlowKind.ECHO_REPLY): 0,
    (True, FlowKind.ECHO_REQUEST): 128,
    (True, FlowKind.ECHO_REPLY): 129,
}
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


def _layer4(raw: RawFlow, ipv6: bool) -> pb.Layer4 | None:
    proto = raw.proto
    if proto == IPPROTO_TCP:
        flags = raw.tcp_flags
        return pb.Layer4(
            TCP=pb.TCP(
                source_port=raw.sport,
                destination_port=raw.dport,
                flags=pb.TCPFlags(
                    FIN=bool(flags & 0x01),
                    SYN=bool(flags & 0x02),
                    RST=bool(flags & 0x04),
                    PSH=bool(flags & 0x08),
                    ACK=bool(flags & 0x10),
                    URG=bool(flags & 0x20),
                    ECE=bool(flags & 0x40),
                    CWR=bool(flags & 0x80),
                ),
            )
        )
    if proto == IPPROTO_UDP:
        return pb.Layer4(UDP=pb.UDP(source_port=raw.sport, destination_port=raw.dport))
    if proto == IPPROTO_SCTP:
        return pb.Layer4(SCTP=pb.SCTP(source_port=raw.sport, destination_port=raw.dport))
    if proto in (IPPROTO_ICMP, IPPROTO_ICMPV6):
        icmp_type = _ICMP_TYPES.get((proto == IPPROTO_ICMPV6, FlowKind(raw.kind)), 0)
        if proto == IPPROTO_ICMP:
            return pb.Layer4(ICMPv4=pb.ICMPv4(type=icmp_type))
        return pb.Layer4(ICMPv6=pb.ICMPv6(type=icmp_type))
    return None


def to_flow(raw: RawFlow, wall_ns: int, node: str, resolver: Resolver) -> pb.Flow:
    """The ``flow.Flow`` of one event seen at ``wall_ns`` (ns since the epoch) on ``node``."""
    src, ipv6 = address_text(raw.src)
    dst, _ = address_text(raw.dst)
    flags = raw.flags
    to_ep = bool(flags & FlowFlag.TO_ENDPOINT)
    reply = bool(flags & FlowFlag.REPLY)
    remote_identity = raw.identity if flags & FlowFlag.IDENTITY else 0
    if to_ep:
        source = _endpoint(resolver, src, remote_identity)
        destination = _endpoint(resolver, dst, 0, local_id=raw.endpoint_id)
    else:
        source = _endpoint(resolver, src, 0, local_id=raw.endpoint_id)
        destination = _endpoint(resolver, dst, remote_identity)
    drop = raw.type == FlowType.DROP
    ingress = to_ep != reply  # the peer opened the connection
    flow = pb.Flow(
        time=Timestamp(seconds=wall_ns // 1_000_000_000, nanos=wall_ns % 1_000_000_000),
        verdict=pb.DROPPED if drop else pb.FORWARDED,
        IP=pb.IP(source=src, destination=dst, ipVersion=pb.IPv6 if ipv6 else pb.IPv4),
        source=source,
        destination=destination,
        Type=pb.L3_L4,
        node_name=node,
        reply=reply,
        is_reply=BoolValue(value=reply),
        traffic_direction=pb.INGRESS if ingress else pb.EGRESS,
        trace_observation_point=pb.TO_ENDPOINT if to_ep else pb.FROM_ENDPOINT,
    )
    l4 = _layer4(raw, ipv6)
    if l4 is not None:
        flow.l4.CopyFrom(l4)
    if drop:
        reason = DROP_REASONS.get(raw.reason, pb.DROP_REASON_UNKNOWN)
        flow.drop_reason = reason
        flow.drop_reason_desc = reason
        flow.event_type.type = raw.type
        flow.event_type.sub_type = reason
    else:
        flow.event_type.type = raw.type
        if raw.type == FlowType.TRACE and not to_ep:
            flow.event_type.sub_type = _TRACE_FROM_LXC
    return flow
