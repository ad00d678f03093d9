"""The agent's Prometheus metrics, on a registry of its own (several agents per process)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, Metric

from controlplane.datapath.bpf_syscall import KernelMapError
from controlplane.datapath.counters import pinned_verdict_counts
from controlplane.metrics import StoreMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentMetrics:
    registry: CollectorRegistry
    store: StoreMetrics
    """The store layer's metrics (malformed values skipped, repairs) on the same registry."""
    restarts: Counter
    """Control-plane restarts (in-process or exit), by reason."""
    shard_recoveries: Counter
    """Restarts of one shard's connection alone (several shards, the others healthy)."""
    endpoints: Gauge
    """Endpoints this agent owns."""
    cache_objects: Gauge
    """Objects in the local cache, by resource (identities, endpoints, nodes)."""
    map_entries: Gauge
    """Entries per datapath map."""
    map_writes: Counter
    """Entries written to a datapath map, by map and op (update, delete)."""
    heartbeat_age: Gauge
    """Seconds since the operator heartbeat was last received, per shard."""
    kvstore_healthy: Gauge
    """1 while the shard is healthy (fewer consecutive failed checks than the maximum)."""
    kvstore_errors: Gauge
    """Consecutive failed status checks, per shard."""
    api_requests: Counter
    """Local API requests, by route and status code."""
    cni_requests: Counter
    """CNI plugin runs for the node's launcher (``POST /v1/cni``), by command and result
    (ok, error, timeout, failed)."""

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> AgentMetrics:
        registry = registry if registry is not None else CollectorRegistry()
        return cls(
            registry=registry,
            store=StoreMetrics.create(registry),
            restarts=Counter(
                "cp_agent_kvstore_restarts_total",
                "Restarts of the agent's control-plane side after the kvstore went unhealthy",
                ["reason"],
                registry=registry,
            ),
            shard_recoveries=Counter(
                "cp_agent_kvstore_shard_recoveries_total",
                "Reconnections of one unhealthy kvstore shard while the others carried on",
                ["shard", "reason"],
                registry=registry,
            ),
            endpoints=Gauge("cp_agent_endpoints", "Endpoints this agent owns", registry=registry),
            cache_objects=Gauge(
                "cp_agent_cache_objects",
                "Objects in the agent's local cache",
                ["resource"],
                registry=registry,
            ),
            map_entries=Gauge(
                "cp_agent_map_entries", "Entries per datapath map", ["map"], registry=registry
            ),
            map_writes=Counter(
                "cp_agent_map_writes_total",
                "Entries written to datapath maps",
                ["map", "op"],
                registry=registry,
            ),
            heartbeat_age=Gauge(
                "cp_agent_heartbeat_age_seconds",
                "Seconds since the operator heartbeat was last received (local clock)",
                ["shard"],
                registry=registry,
            ),
            kvstore_healthy=Gauge(
                "cp_agent_kvstore_healthy",
                "1 while the kvstore shard is healthy",
                ["shard"],
                registry=registry,
            ),
            kvstore_errors=Gauge(
                "cp_agent_kvstore_consecutive_errors",
                "Consecutive failed kvstore status checks",
                ["shard"],
                registry=registry,
            ),
            api_requests=Counter(
                "cp_agent_api_requests_total",
                "Local API requests",
                ["route", "code"],
                registry=registry,
            ),
            cni_requests=Counter(
                "cp_agent_cni_requests_total",
                "CNI plugin runs for the node's cp-cni launcher",
                ["command", "result"],
                registry=registry,
            ),
        )


class DatapathCounters:
    """A collector of the tc programs' verdict counters, read from the pinned ``cp_metrics``
    at each scrape: ``cp_datapath_packets_total`` and ``cp_datapath_bytes_total`` by reason
    and verdict (``cpctl bpf metrics`` shows the same). Nothing until a program has been
    loaded on this host; a map that cannot be read is logged once per failure streak and
    leaves the scrape without these series, never failing it."""

    def __init__(self, pin_dir: Path) -> None:
        self.pin_dir = pin_dir
        self._failing = False

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        packets, bytes_ = self._families()
        try:
            counts = pinned_verdict_counts(self.pin_dir) or []
        except (KernelMapError, OSError, ValueError) as exc:
            if not self._failing:
                log.warning("datapath counters under %s unreadable: %s", self.pin_dir, exc)
            self._failing = True
            counts = []
        else:
            self._failing = False
        for count in counts:
            labels = [count.reason, count.verdict]
            packets.add_metric(labels, count.packets)
            bytes_.add_metric(labels, count.bytes)
        yield packets
        yield bytes_

    @staticmethod
    def _families() -> tuple[CounterMetricFamily, CounterMetricFamily]:
        labels = ["reason", "verdict"]
        return (
            CounterMetricFamily(
                "cp_datapath_packets", "Packets the tc programs passed or dropped", labels=labels
            ),
            CounterMetricFamily(
                "cp_datapath_bytes", "Bytes the tc programs passed or dropped", labels=labels
            ),
        )
