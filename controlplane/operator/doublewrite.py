"""cp-operator in a double-write mode (``--store doublewrite-readcrd`` or
``doublewrite-readkvstore``): a migration step between CRD mode and kvstore mode, as the
agents take it.

**One leader across the modes.** A replica leads only while it holds *both* elections:
the CRD store's Lease and the kvstore's leader key, always taken in that order (the Lease
first, whatever the read store: two double-write replicas of different read stores never
wait for each other's second election). A CRD-mode operator needs the Lease and a
kvstore-mode operator the leader key, so neither can lead beside a double-write leader,
and a double-write replica cannot lead while either does: every rolling step of the
runbook (crd -> doublewrite-readcrd -> doublewrite-readkvstore -> kvstore and back) hands
leadership over through the election the two steps share. (A CRD-mode and a
kvstore-mode operator hold different elections: they must never run together, as
before.) The work of a term runs inside the kvstore term, inside the Lease term: losing
either cancels it before either lease could expire, and each write stays fenced by its
own store's election (etcd compares; the Lease's local check and the API server's
preconditions), so a paused ex-leader's late write is refused by the store it targets.

**The work** is the read store's daemon's (:mod:`~controlplane.operator.daemon`,
:mod:`~controlplane.operator.crd_daemon`) with the other store as an
:class:`~controlplane.operator.term.OtherStore`:

- CIDRs are allocated in the read store and written under the same CIDR to the other
  (:class:`~controlplane.operator.doublewrite_cidrs.DoubleWriteCIDRs`: a conflict refuses
  the allocation, counted in ``cp_doublewrite_conflicts_total{resource="cidr"}``); in
  doublewrite-readkvstore the CRD Nodes' ``spec.podCIDRs`` follow the kvstore's claims;
- identity GC runs on both stores, each deleting only identities unused in both;
- the node GC judges a node gone when neither store lists it and collects its state in
  both;
- the kvstore heartbeat is written in both modes, so agents judging it (kvstore mode,
  doublewrite-readkvstore) never see it stale across a switch.

Every replica exports the drift between the stores (``cp_migration_drift``): both are at
hand, no ``--migration-peer-*`` flag is needed (nor taken).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Mapping

from controlplane.config import CrdConfig, KvstoreConfig
from controlplane.crd.client import KubeClient
from controlplane.crd.election import LeaseTerm
from controlplane.crd.kubeconfig import KubeConnection
from controlplane.kvstore.election import Term
from controlplane.kvstore.shards import ShardMap
from controlplane.metrics import DoubleWriteMetrics
from controlplane.operator.crd_daemon import CrdOperator
from controlplane.operator.daemon import Operator
from controlplane.operator.metrics import OperatorMetrics
from controlplane.operator.migration_drift import DriftMonitor
from controlplane.operator.settings import OperatorSettings
from controlplane.operator.term import Task, serve_until
from controlplane.telemetry import Check, TelemetryServer

__all__ = ["DoubleWriteOperator"]

log = logging.getLogger("cp-operator")


class DoubleWriteOperator:
    """One cp-operator replica in a double-write mode; ``await run(stop, on_listening)``."""

    def __init__(
        self,
        settings: OperatorSettings,
        kvstore: KvstoreConfig,
        connection: KubeConnection,
        crd: CrdConfig,
        *,
        request_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        settings.validate()
        self.settings = settings
        self.read_kvstore = settings.store == "doublewrite-readkvstore"
        self.metrics = OperatorMetrics.create()
        self.doublewrite = DoubleWriteMetrics(self.metrics.registry)
        self.kv = Operator(settings, kvstore, clock=clock, metrics=self.metrics)
        self.crd = CrdOperator(
            settings, connection, request_timeout=request_timeout, clock=clock, metrics=self.metrics
        )
        self.drift = DriftMonitor(
            self.metrics.registry,
            kvstore,
            crd,
            interval=settings.migration_drift_interval,
            pools=(settings.pool.name,),
            cluster=settings.cluster_name,
        )
        self.telemetry: TelemetryServer | None = None

    @property
    def is_leader(self) -> bool:
        """Both elections held."""
        return bool(
            self.kv.election is not None
            and self.kv.election.is_leader
            and self.crd.election is not None
            and self.crd.election.is_leader
        )

    async def run(self, stop: asyncio.Event, on_listening: Callable[[int], None]) -> None:
        settings = self.settings
        async with (
            ShardMap(self.kv.kvstore) as shards,
            KubeClient(
                self.crd.connection,
                request_timeout=self.crd.request_timeout,
                user_agent="cp-operator",
            ) as client,
        ):
            tasks: dict[str, Task] = {
                "elections": functools.partial(self._elect, shards, client),
                "etcd-probe": functools.partial(self.kv.probe, shards),
                "migration-drift": self.drift.run,
                **self.kv.heartbeat_monitors(shards),
            }
            await serve_until(
                stop,
                tasks,
                metrics=self.metrics,
                health=self.health,
                address=(settings.metrics_host, settings.metrics_port),
                on_listening=lambda server: self._listening(server, on_listening),
                farewell="resigning leadership (kvstore, then the Lease)",
            )

    def _listening(self, server: TelemetryServer, on_listening: Callable[[int], None]) -> None:
        self.telemetry = server
        on_listening(server.port)

    async def _elect(self, shards: ShardMap, client: KubeClient) -> None:
        """The Lease first, then (while it is held) the kvstore's election, then the work."""
        await self.crd.install(client)
        lease = self.crd.election_for(client)
        etcd = self.kv.election_for(shards)

        async def with_lease(lease_term: LeaseTerm) -> None:
            log.info("holding the Lease (term %d): campaigning in the kvstore", lease_term.epoch)
            await etcd.run(lambda kv_term: self._lead(shards, client, lease_term, kv_term))

        await lease.run(with_lease)

    async def _lead(
        self, shards: ShardMap, client: KubeClient, lease_term: LeaseTerm, kv_term: Term
    ) -> None:
        if self.read_kvstore:
            other = self.crd.other_store(client, lease_term, self.doublewrite)
            await self.kv.lead(shards, kv_term, other)
        else:
            other = self.kv.other_store(shards, kv_term, self.doublewrite)
            await self.crd.lead(client, lease_term, other)

    def health(self) -> Mapping[str, Check]:
        kv, crd = self.kv.health(), self.crd.health()
        if self.is_leader:
            elected = Check(True, "leader (the Lease and the kvstore's election)")
        else:
            ok = kv["election"].ok or crd["election"].ok
            elected = Check(
                ok, f"kvstore: {kv['election'].detail}; Lease: {crd['election'].detail}"
            )
        return {"etcd": kv["etcd"], "apiserver": crd["apiserver"], "election": elected}
