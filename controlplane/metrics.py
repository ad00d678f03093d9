"""Prometheus metrics of the store layer, registered on a registry the caller owns.

No global registry: several agents can run in one process (the scale tests do), each with
its own metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass(frozen=True)
class StoreMetrics:
    registry: CollectorRegistry
    malformed: Counter
    """Stored values or keys that could not be decoded, by resource; each was skipped."""
    repairs: Counter
    """Owned keys re-created after a lease loss or an outside delete, by resource and reason."""
    gc_candidates: Gauge
    gc_deleted: Counter
    gc_skipped: Counter
    gc_duration: Histogram

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> StoreMetrics:
        registry = registry if registry is not None else CollectorRegistry()
        return cls(
            registry=registry,
            malformed=Counter(
                "cp_store_malformed_values_total",
                "Stored keys or values that failed to decode and were skipped",
                ["resource"],
                registry=registry,
            ),
            repairs=Counter(
                "cp_store_repairs_total",
                "Owned keys re-created after a lease loss or an outside change",
                ["resource", "reason"],
                registry=registry,
            ),
            gc_candidates=Gauge(
                "cp_identity_gc_candidates",
                "Identities without references, to be deleted next round if still unused",
                registry=registry,
            ),
            gc_deleted=Counter(
                "cp_identity_gc_deleted_total", "Identities deleted by the GC", registry=registry
            ),
            gc_skipped=Counter(
                "cp_identity_gc_skipped_total",
                "GC deletes refused because the identity changed in between",
                registry=registry,
            ),
            gc_duration=Histogram(
                "cp_identity_gc_duration_seconds", "Duration of one GC round", registry=registry
            ),
        )


class DoubleWriteMetrics:
    """The double-write modes' counters (the agent's and the operator's): writes refused
    because the other store contradicts the read store, writes to the read store undone
    because the other's failed, and writes to the other store repaired later."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.conflicts = Counter(
            "cp_doublewrite_conflicts_total",
            "Double writes refused because the other store contradicts the read store",
            ["resource"],
            registry=registry,
        )
        self.undone = Counter(
            "cp_doublewrite_undone_total",
            "Writes to the read store undone because the other store's write failed",
            ["resource"],
            registry=registry,
        )
        self.pending = Gauge(
            "cp_doublewrite_pending",
            "Writes to the other store waiting for their repair",
            registry=registry,
        )
        self.repairs = Counter(
            "cp_doublewrite_repairs_total",
            "Writes to the other store repaired after they had failed",
            ["resource"],
            registry=registry,
        )
