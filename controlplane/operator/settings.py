"""Settings of cp-operator (one dataclass; flags in ``main.py`` mirror every field)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from controlplane.config import ConfigError, CrdConfig, KvstoreConfig
from controlplane.flags import DOUBLE_WRITE_STORES, STORES
from controlplane.model import CIDRPool, ModelError, parse_cidr

LOG_LEVELS = ("debug", "info", "warning", "error")


def default_id() -> str:
    """``<hostname>-<pid>``: unique per replica, stable for the life of the process."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True, slots=True)
class OperatorSettings:
    """Everything cp-operator needs besides the kvstore connection."""

    store: str = "crd"
    """Where the state lives: ``kvstore`` (etcd) or ``crd`` (the Kubernetes API); or a
    migration step, ``doublewrite-readcrd`` / ``doublewrite-readkvstore`` (both written,
    one leader across the modes: ``operator/doublewrite.py``)."""
    id: str = field(default_factory=default_id)
    """This replica's identity: the election candidate id and the heartbeat ``writer``."""
    heartbeat_interval: float = 15.0
    """Seconds between heartbeats on every shard (agents judge staleness at twice this)."""
    lease_duration: int = 15
    """TTL of the election lease, seconds: how long a dead leader blocks a successor."""
    renew_deadline: float = 10.0
    """The leader stops its work when it could not renew its lease for this long."""
    retry_period: float = 2.0
    """Seconds between lease renewals and between retries of failed leader work."""
    gc_interval: float = 60.0
    """Seconds between identity GC rounds and between stale-node GC sweeps."""
    identity_gc_rate: float = 100.0
    """Identity deletes per second, at most (the GC's rate limit)."""
    node_gc_grace: float = 300.0
    """A node absent from the node list for this long (by our clock) has its CIDR claims,
    IP leases and endpoints collected."""
    pool: CIDRPool = field(default_factory=CIDRPool)
    """The cluster pool that per-node pod CIDRs are cut from (10.0.0.0/8 in /24s)."""
    cluster_name: str = "default"
    """The cluster whose nodes and endpoints this operator serves (the ``<cluster>`` key
    component)."""
    metrics_host: str = "127.0.0.1"
    """Address of the /metrics, /healthz and /readyz endpoint."""
    metrics_port: int = 9963
    """Port of that endpoint; 0 picks a free one (printed on startup)."""
    log_level: str = "info"
    """One of debug, info, warning, error."""
    lease_namespace: str = "kube-system"
    """CRD mode: namespace of the election's coordination.k8s.io/v1 Lease."""
    lease_name: str = "cp-operator"
    """CRD mode: name of that Lease."""
    migration_peer: KvstoreConfig | CrdConfig | None = None
    """The other mode's store during a migration (``--migration-peer-*``): the operator
    then exports ``cp_migration_drift`` (``operator/migration_drift.py``)."""
    migration_drift_interval: float = 60.0
    """Seconds between drift rounds (each reads both stores whole)."""

    def validate(self) -> None:
        """Raise :class:`ConfigError` (one line) for settings that cannot work."""
        stores = STORES + DOUBLE_WRITE_STORES
        if self.store not in stores:
            raise ConfigError(f"store must be one of {', '.join(stores)}, got {self.store!r}")
        if self.store in DOUBLE_WRITE_STORES and self.migration_peer is not None:
            raise ConfigError(
                f"--store {self.store} reads both stores itself: no --migration-peer-* flag"
            )
        if not self.lease_namespace or not self.lease_name:
            raise ConfigError("lease-namespace and lease-name must not be empty")
        if not self.id or any(c.isspace() for c in self.id):
            raise ConfigError(f"operator id must be non-empty without spaces, got {self.id!r}")
        for name in ("heartbeat_interval", "gc_interval", "identity_gc_rate"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name.replace('_', '-')} must be positive")
        if self.migration_drift_interval <= 0:
            raise ConfigError("migration-drift-interval must be positive")
        peer_mode = {KvstoreConfig: "kvstore", CrdConfig: "crd"}.get(type(self.migration_peer))
        if peer_mode == self.store:
            raise ConfigError(f"the migration peer must be the other mode than {self.store}")
        if self.node_gc_grace < 0:
            raise ConfigError("node-gc-grace must not be negative")
        if self.lease_duration < 2:
            raise ConfigError(f"lease-duration must be at least 2 s, got {self.lease_duration}")
        if not 0 < self.renew_deadline < self.lease_duration:
            raise ConfigError(
                f"renew-deadline ({self.renew_deadline:g}) must be positive and shorter than "
                f"lease-duration ({self.lease_duration})"
            )
        if not 0 < self.retry_period < self.renew_deadline:
            raise ConfigError(
                f"retry-period ({self.retry_period:g}) must be positive and shorter than "
                f"renew-deadline ({self.renew_deadline:g})"
            )
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics port out of range: {self.metrics_port}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log level must be one of {', '.join(LOG_LEVELS)}")


def parse_pool(cidr: str, mask_size: int) -> CIDRPool:
    """The cluster pool from flag values (ConfigError with one line when invalid)."""
    try:
        return CIDRPool(parse_cidr(cidr), mask_size)
    except ModelError as exc:
        raise ConfigError(f"cluster pool: {exc}") from None


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too); port 0 means any free port."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"metrics address must be HOST:PORT, got {text!r}")
    host = host.strip("[]") or "127.0.0.1"
    value = int(port)
    if value > 65535:
        raise ConfigError(f"metrics port out of range: {value}")
    return host, value
