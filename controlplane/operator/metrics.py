"""Prometheus metrics of cp-operator, on a registry the daemon owns (no global state)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from controlplane.metrics import StoreMetrics


@dataclass(frozen=True)
class OperatorMetrics:
    registry: CollectorRegistry
    store: StoreMetrics
    """Malformed values skipped, identity GC (shared with the store layer)."""
    leader: Gauge
    """1 while this replica is the leader (doing leader work), else 0."""
    leader_transitions: Counter
    """Leadership changes of this replica, by event (elected, lost)."""
    epoch: Gauge
    """The fencing epoch of this replica's current term (0 when not leading)."""
    heartbeat_writes: Counter
    """Heartbeat writes by shard and result (ok, fenced, error)."""
    cidrs_in_use: Gauge
    """CIDRs of the cluster pool in use, as the leader's allocator sees them."""
    cidr_allocations: Counter
    """CIDRs given to nodes, by result (ok, exhausted, error)."""
    node_gc_deleted: Counter
    """Keys of gone nodes deleted, by resource (cidr-claim, ip-lease, endpoint)."""
    node_gc_pending: Gauge
    """Nodes seen absent that still hold state, waiting out the grace period."""
    node_gc_duration: Histogram
    """Duration of one stale-node GC sweep."""
    lease_renewals: Counter
    """CRD mode: the leader's Lease renewals, by result (ok, conflict, error)."""
    fenced_writes: Counter
    """CRD mode: leader writes refused locally (term over or renewal overdue) before they
    were sent, by resource."""
    write_conflicts: Counter
    """CRD mode: leader writes the API server refused on a resourceVersion or uid
    precondition (409), by resource."""

    @classmethod
    def create(cls) -> OperatorMetrics:
        registry = CollectorRegistry()
        return cls(
            registry=registry,
            store=StoreMetrics.create(registry),
            leader=Gauge(
                "cp_operator_leader", "1 while this replica leads, else 0", registry=registry
            ),
            leader_transitions=Counter(
                "cp_operator_leader_transitions_total",
                "Leadership changes of this replica",
                ["event"],
                registry=registry,
            ),
            epoch=Gauge(
                "cp_operator_epoch",
                "Fencing epoch of the current term (0: not leading)",
                registry=registry,
            ),
            heartbeat_writes=Counter(
                "cp_operator_heartbeat_writes_total",
                "Heartbeat writes by shard and result",
                ["shard", "result"],
                registry=registry,
            ),
            cidrs_in_use=Gauge(
                "cp_ipam_cidrs_in_use", "CIDRs of the cluster pool in use", registry=registry
            ),
            cidr_allocations=Counter(
                "cp_operator_cidr_allocations_total",
                "Pod CIDR allocations to nodes, by result",
                ["result"],
                registry=registry,
            ),
            node_gc_deleted=Counter(
                "cp_operator_node_gc_deleted_total",
                "Keys of gone nodes deleted by the stale-node GC",
                ["resource"],
                registry=registry,
            ),
            node_gc_pending=Gauge(
                "cp_operator_node_gc_pending_nodes",
                "Absent nodes still holding state, within their grace period",
                registry=registry,
            ),
            node_gc_duration=Histogram(
                "cp_operator_node_gc_duration_seconds",
                "Duration of one stale-node GC sweep",
                registry=registry,
            ),
            lease_renewals=Counter(
                "cp_operator_lease_renewals_total",
                "Lease renewals by the leader (CRD mode), by result",
                ["result"],
                registry=registry,
            ),
            fenced_writes=Counter(
                "cp_operator_fenced_writes_total",
                "Leader writes refused locally before sending (term over or renewal overdue)",
                ["resource"],
                registry=registry,
            ),
            write_conflicts=Counter(
                "cp_operator_write_conflicts_total",
                "Leader writes refused by the API server on a precondition (409)",
                ["resource"],
                registry=registry,
            ),
        )
