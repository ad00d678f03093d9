"""The operator's view of a migration between CRD mode and kvstore mode: the drift
between its own store and the other mode's (the *peer*, named by the
``--migration-peer-*`` flags), as the gauges ``cp_migration_drift{resource,side}``.

Every replica computes it (it only reads), every ``--migration-drift-interval``: both
stores are read whole and compared as ``cpctl migrate status`` does. ``side`` is
``only_crd``, ``only_kvstore`` or ``different``; ``resource`` one of identities, nodes,
cidrs, leases, endpoints, policies (services once both modes have them). A round that
fails leaves the gauges as they were and counts ``cp_migration_drift_errors_total``;
``cp_migration_drift_last_success_timestamp_seconds`` says how fresh they are.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge

from controlplane.config import ConfigError, CrdConfig, KvstoreConfig, load_kvstore_config
from controlplane.crd.kubeconfig import KubeConnection
from controlplane.flags import positive_float
from controlplane.metrics import StoreMetrics
from controlplane.migrate.plan import SIDES, Drift, drift, read_snapshot
from controlplane.migrate.side import open_side
from controlplane.operator.settings import OperatorSettings

__all__ = ["DriftMonitor"]

log = logging.getLogger(__name__)


def drift_monitor(
    settings: OperatorSettings,
    registry: CollectorRegistry,
    own: KvstoreConfig | KubeConnection,
) -> DriftMonitor | None:
    """The monitor the operator's settings ask for (a migration peer), or None."""
    if settings.migration_peer is None:
        return None
    return DriftMonitor(
        registry,
        own,
        settings.migration_peer,
        interval=settings.migration_drift_interval,
        pools=(settings.pool.name,),
        cluster=settings.cluster_name,
    )


class DriftMonitor:
    """Compares ``own`` with ``peer`` every ``interval`` seconds into gauges on ``registry``."""

    def __init__(
        self,
        registry: CollectorRegistry,
        own: KvstoreConfig | KubeConnection | CrdConfig,
        peer: KvstoreConfig | CrdConfig,
        *,
        interval: float = 60.0,
        pools: tuple[str, ...] = ("default",),
        cluster: str = "default",
    ) -> None:
        self.own = own
        self.peer = peer
        self.interval = interval
        self.pools = pools
        self.cluster = cluster
        self.store_metrics = (
            StoreMetrics.create()
        )  # malformed counts of its reads: not the daemon's
        self.drift = Gauge(
            "cp_migration_drift",
            "Records only in one store or different in both (CRD vs kvstore), per resource",
            ["resource", "side"],
            registry=registry,
        )
        self.total = Gauge(
            "cp_migration_drift_total", "Sum of cp_migration_drift", registry=registry
        )
        self.errors = Counter(
            "cp_migration_drift_errors_total",
            "Drift rounds that could not read a store",
            registry=registry,
        )
        self.last_success = Gauge(
            "cp_migration_drift_last_success_timestamp_seconds",
            "Unix time of the last drift round that read both stores",
            registry=registry,
        )
        self.last: Drift | None = None

    async def run(self) -> None:
        """Until cancelled; store errors are logged and retried at the next round."""
        while True:
            try:
                await self.round()
            except Exception as exc:  # a read-only side job: never take the operator down
                self.errors.inc()
                log.warning("migration drift: could not read both stores: %s", exc)
            await asyncio.sleep(self.interval)

    async def round(self) -> Drift:
        async with (
            open_side(self.own, self.store_metrics, cluster=self.cluster) as own,
            open_side(self.peer, self.store_metrics, cluster=self.cluster) as peer,
        ):
            found = drift(
                await read_snapshot(own, self.pools), await read_snapshot(peer, self.pools)
            )
        for resource, counts in found.counts.items():
            for side in SIDES:
                self.drift.labels(resource, side).set(counts[side])
        self.total.set(found.total)
        self.last_success.set(time.time())
        self.last = found
        if found.total:
            log.info("migration drift: %d records differ: %s", found.total, found.counts)
        return found


def add_migration_peer_flags(parser: argparse.ArgumentParser) -> None:
    """cp-operator's ``--migration-peer-*`` flags: the other mode's store."""
    group = parser.add_argument_group(
        "migration",
        "the other mode's store while moving between CRD and kvstore mode: "
        "the operator exports cp_migration_drift{resource,side}",
    )
    group.add_argument(
        "--migration-peer-kubeconfig",
        metavar="FILE",
        help="kvstore-mode operator: the Kubernetes API of the CRD store",
    )
    group.add_argument("--migration-peer-kube-context", metavar="NAME")
    group.add_argument(
        "--migration-peer-kvstore-endpoints",
        metavar="URLS",
        help="CRD-mode operator: the etcd client URLs of the kvstore",
    )
    group.add_argument(
        "--migration-peer-kvstore-config",
        metavar="FILE",
        help="CRD-mode operator: the kvstore's config file (clusters, TLS, shards)",
    )
    group.add_argument(
        "--migration-drift-interval",
        type=positive_float,
        default=60.0,
        metavar="SECONDS",
        help="seconds between drift rounds, each reading both stores whole (default 60)",
    )


def migration_peer(args: argparse.Namespace) -> KvstoreConfig | CrdConfig | None:
    """The peer the flags name, or None (ConfigError with one line)."""
    kube = args.migration_peer_kubeconfig
    endpoints = args.migration_peer_kvstore_endpoints
    config_file = args.migration_peer_kvstore_config
    if kube and (endpoints or config_file):
        raise ConfigError("name one migration peer: a kubeconfig or a kvstore, not both")
    if kube:
        return CrdConfig(
            kubeconfig=kube,
            context=args.migration_peer_kube_context,
            request_timeout=getattr(args, "timeout", 10.0),
        )
    if endpoints or config_file:
        return load_kvstore_config(endpoints, config_file, env={})
    return None
