"""Flow metrics on the agent's registry (its ``/metrics``), in the spirit of Hubble's.

- ``cp_flows_processed_total{type,verdict}``: every flow the server took in; ``type`` is the
  datapath event (``drop``, ``trace``, ``policy_verdict``), ``verdict`` FORWARDED/DROPPED;
- ``cp_flow_drops_total{reason,protocol}``: drops by Hubble's drop reason and L4 protocol;
- ``cp_flow_tcp_flags_total{flag,family}``: TCP flags seen in flows (SYN, SYN-ACK, FIN,
  RST, ...), by IP family;
- ``cp_flow_lost_events_total{source}``: events lost, by where: ``kernel_ring_buffer``
  (the BPF ring buffer was full), ``kernel_rate_limit`` (the program's rate limit),
  ``reader_lapped`` (a GetFlows reader fell behind the server's ring);
- ``cp_flow_ring_flows`` / ``cp_flow_ring_capacity``: what the server's ring holds.

Children are cached per label set: one dict lookup per flow and metric.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge

from controlplane.flows.proto import flow_pb2 as pb

__all__ = ["FlowMetrics"]

_TYPES: Final = {1: "drop", 4: "trace", 5: "policy_verdict"}
_PROTOCOLS: Final = {6: "TCP", 17: "UDP", 1: "ICMPv4", 58: "ICMPv6", 132: "SCTP"}


def _tcp_flag_label(flags: int) -> str | None:
    """SYN, SYN-ACK, RST or FIN (the first that applies) of raw TCP flags."""
    if flags & 0x02:
        return "SYN-ACK" if flags & 0x10 else "SYN"
    if flags & 0x04:
        return "RST"
    if flags & 0x01:
        return "FIN"
    return None


class FlowMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.processed = Counter(
            "cp_flows_processed_total",
            "Flows the flow server took in, by datapath event type and verdict",
            ["type", "verdict"],
            registry=registry,
        )
        self.drops = Counter(
            "cp_flow_drops_total",
            "Dropped flows by drop reason and L4 protocol",
            ["reason", "protocol"],
            registry=registry,
        )
        self.tcp_flags = Counter(
            "cp_flow_tcp_flags_total",
            "TCP flags seen in flows (SYN, SYN-ACK, FIN, RST) by IP family",
            ["flag", "family"],
            registry=registry,
        )
        self.lost = Counter(
            "cp_flow_lost_events_total",
            "Flow events lost, by where: kernel_ring_buffer, kernel_rate_limit, reader_lapped",
            ["source"],
            registry=registry,
        )
        self.ring_flows = Gauge(
            "cp_flow_ring_flows", "Entries the flow server's ring holds", registry=registry
        )
        self.ring_capacity = Gauge(
            "cp_flow_ring_capacity", "Capacity of the flow server's ring", registry=registry
        )
        for source in ("kernel_ring_buffer", "kernel_rate_limit", "reader_lapped"):
            self.lost.labels(source)  # exported as 0 from the start
        self._children: dict[tuple[object, ...], Counter] = {}
        self._pending: dict[tuple[int, int, int, int, bool], int] = {}
        self._labels: dict[
            tuple[int, int, int, int, bool], list[tuple[Counter, tuple[str, ...]]]
        ] = {}

    def _child(self, metric: Counter, *labels: str) -> Counter:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def count(self, key: tuple[int, int, int, int, bool]) -> None:
        """Count one flow by its datapath fields ``(type, drop reason or 0, IP protocol,
        TCP flags, IPv6)``; :meth:`flush` exports the counts (once per batch)."""
        self._pending[key] = self._pending.get(key, 0) + 1

    def flush(self) -> None:
        pending, self._pending = self._pending, {}
        for key, n in pending.items():
            labels = self._labels.get(key)
            if labels is None:
                labels = self._labels[key] = self._describe(*key)
            for metric, values in labels:
                self._child(metric, *values).inc(n)

    def _describe(
        self, kind: int, reason: int, proto: int, tcp_flags: int, ipv6: bool
    ) -> list[tuple[Counter, tuple[str, ...]]]:
        drop = kind == 1
        verdict = "DROPPED" if drop else "FORWARDED"
        protocol = _PROTOCOLS.get(proto, "other")
        out: list[tuple[Counter, tuple[str, ...]]] = [
            (self.processed, (_TYPES.get(kind, "other"), verdict))
        ]
        if drop:
            out.append((self.drops, (pb.DropReason.Name(reason), protocol)))
        if protocol == "TCP":
            label = _tcp_flag_label(tcp_flags)
            if label is not None:
                out.append((self.tcp_flags, (label, "IPv6" if ipv6 else "IPv4")))
        return out

    def lost_events(self, source: str, count: int) -> None:
        self._child(self.lost, source).inc(count)
