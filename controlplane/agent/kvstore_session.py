"""The agent's store session in kvstore mode: etcd clusters (shards), leases, heartbeats.

One :class:`KvstoreSession` per generation holds its own connections to every cluster of
the :class:`~controlplane.kvstore.shards.ShardMap` (``own_connection``: never shared with
another agent of the process), the leases of the keys this node owns (``Owners``), the
kvstore implementations of every store, one heartbeat monitor per cluster and the status
checks: every ``status_check_interval`` a quorum read per cluster and the heartbeat's age
feed :class:`~controlplane.agent.health.ShardHealth`, which decides (with the
:class:`~controlplane.agent.health.RestartArm` the connector keeps across sessions)
whether the session must restart.

The connector carries the last session's heartbeat monitors and health into the next, so
a restart never makes an outage look healthy (the same old heartbeat re-listed is no
news) and one outage costs one restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping

from controlplane.agent.health import Failure, Observation, RestartArm, ShardHealth
from controlplane.agent.metrics import AgentMetrics
from controlplane.agent.settings import AgentSettings
from controlplane.agent.store_session import RestartNeeded, Stores
from controlplane.config import KvstoreConfig
from controlplane.kvstore.endpoints import KvEndpointStore
from controlplane.kvstore.errors import KvstoreError, NoLeader, Timeout, Unreachable
from controlplane.kvstore.heartbeat import HeartbeatMonitor
from controlplane.kvstore.identities import KvIdentityStore
from controlplane.kvstore.ipam import KvCIDRStore, KvIPLeaseStore
from controlplane.kvstore.keys import KeyLayout
from controlplane.kvstore.nodes import KvNodeStore
from controlplane.kvstore.owner import Owners
from controlplane.kvstore.policies import KvPolicyStore
from controlplane.kvstore.services import KvServiceStore
from controlplane.kvstore.shards import ShardMap
from controlplane.model import Identity, Labels, reserved_identity_for

log = logging.getLogger(__name__)


class KvstoreConnector:
    """Opens kvstore sessions for one node; keeps restart arms and heartbeat evidence."""

    def __init__(
        self, config: KvstoreConfig, settings: AgentSettings, metrics: AgentMetrics
    ) -> None:
        self.config = config
        self.settings = settings
        self.metrics = metrics
        self.layout = KeyLayout(config.prefix)
        self.arms: dict[str, RestartArm] = {}
        self.last_monitors: dict[str, HeartbeatMonitor] = {}
        self.last_health: dict[str, ShardHealth] = {}
        self.raft_terms: dict[str, int] = {}
        """Each cluster's raft term at the last successful status check."""

    @property
    def describe(self) -> str:
        n = len(self.config.clusters)
        return f"kvstore: {n} etcd cluster{'s' if n != 1 else ''}"

    def open(self, generation: int) -> KvstoreSession:
        if generation > 1:  # the previous session ended: a restart
            for arm in self.arms.values():
                arm.restarted()
        return KvstoreSession(self, generation)


class KvstoreSession:
    """One generation of etcd connections, leases, stores, monitors and checks."""

    def __init__(self, connector: KvstoreConnector, generation: int) -> None:
        self.connector = connector
        self.generation = generation
        s = connector.settings
        layout = connector.layout
        metrics = connector.metrics.store
        self.shards = ShardMap(connector.config, own_connection=True)
        self.owners = Owners(metrics, ttl=s.lease_ttl)
        self.identity_store = KvIdentityStore(
            self.shards, layout, metrics, self.owners, node=s.node
        )
        self._stores = Stores(
            identities=self.identity_store,
            endpoints=KvEndpointStore(
                self.shards, layout, metrics, self.owners, node=s.node, cluster=s.cluster
            ),
            nodes=KvNodeStore(
                self.shards, layout, metrics, self.owners, node=s.node, cluster=s.cluster
            ),
            cidrs=KvCIDRStore(self.shards, layout, metrics),
            leases=KvIPLeaseStore(self.shards, layout, metrics, self.owners, node=s.node),
            policies=KvPolicyStore(self.shards, layout, metrics),
            services=KvServiceStore(self.shards, layout, metrics),
        )
        self.monitors = {
            b.name: HeartbeatMonitor(
                b,
                layout,
                interval=s.heartbeat_interval,
                metrics_malformed=metrics.malformed.labels("heartbeat").inc,
                previous=connector.last_monitors.get(b.name),
            )
            for b in self.shards.all()
        }
        connector.last_monitors = dict(self.monitors)
        self._health = {
            name: ShardHealth(
                name, s.max_consecutive_quorum_errors, connector.arms.setdefault(name, RestartArm())
            ).carry(connector.last_health.get(name))
            for name in self.monitors
        }
        connector.last_health = dict(self._health)
        self._started = False

    @property
    def stores(self) -> Stores:
        return self._stores

    async def connect(self) -> None:
        await self.shards.connect()

    def tasks(self) -> Mapping[str, Callable[[], Awaitable[None]]]:
        tasks: dict[str, Callable[[], Awaitable[None]]] = {
            "owners": self.owners.run,
            "checks": self._checks,
        }
        for name, monitor in self.monitors.items():
            tasks[f"heartbeat:{name}"] = monitor.run
        return tasks

    def health(self) -> list[ShardHealth]:
        return list(self._health.values())

    def started(self) -> None:
        self._started = True

    def unavailable(self, labels: Labels) -> str | None:
        node = self.connector.settings.node
        needed = {
            self.shards.shard_for("endpoints", node).name,
            self.shards.shard_for("ipam", node).name,
        }
        if reserved_identity_for(labels) is None:
            needed.add(self.shards.shard_for("identities", labels.canonical()).name)
        for name in sorted(needed):
            health = self._health[name]
            if health.failing:
                return f"kvstore shard {name}: {health.reason}"
        return None

    def on_identity_changed(self, callback: Callable[[Identity, Identity], None]) -> None:
        self.identity_store.changed.append(callback)

    async def release_all(self) -> None:
        for owner in self.owners.all():
            await owner.leases.revoke_all()

    async def close(self) -> None:
        await self.shards.close()

    # -- status checks ---------------------------------------------------------------

    async def _checks(self) -> None:
        interval = self.connector.settings.status_check_interval
        while True:
            await asyncio.sleep(interval)
            failures = await asyncio.gather(*(self._check(name) for name in self._health))
            failed = {
                name: failure
                for name, failure in zip(self._health, failures, strict=True)
                if failure is not None
            }
            for name in failed:
                log.warning(
                    "%s: kvstore shard %s unhealthy: %s",
                    self.connector.settings.node,
                    name,
                    self._health[name].reason,
                )
            if not failed:
                continue
            if all(not h.healthy for h in self._health.values()):
                raise RestartNeeded(next(iter(failed.values())).value)
            for name, failure in failed.items():
                await self._recover(name, failure)

    async def _recover(self, name: str, failure: Failure) -> None:
        """One shard of several is unhealthy, the others are well: restart only that
        shard's part (a fresh connection; its watches resume and its owned keys are
        re-created or repaired on it), so the healthy shards' watches, owned keys and
        maps carry on untouched."""
        arm = self._health[name].arm
        arm.restarted()
        arm.recoveries += 1
        self.connector.metrics.shard_recoveries.labels(name, failure.value).inc()
        log.warning(
            "%s: restarting kvstore shard %s alone (%s); the other shards carry on",
            self.connector.settings.node,
            name,
            failure.value,
        )
        await self.shards.backends[name].reconnect()

    async def _check(self, name: str) -> Failure | None:
        s = self.connector.settings
        backend = self.shards.backends[name]
        monitor = self.monitors[name]
        quorum: Failure | None = None
        detail = ""
        try:
            # The quorum read is the heartbeat's key: what etcd holds counts as seen even
            # while the watch catches up (after a member it was connected to died).
            async with asyncio.timeout(s.quorum_check_timeout):
                read = await backend.quorum_read(self.connector.layout.heartbeat)
        except TimeoutError:
            quorum, detail = Failure.NO_QUORUM, f"quorum read timed out ({s.quorum_check_timeout}s)"
        except (NoLeader, Timeout) as exc:
            quorum, detail = Failure.NO_QUORUM, str(exc)
        except (Unreachable, KvstoreError) as exc:
            quorum, detail = Failure.UNREACHABLE, str(exc)
        else:
            term = self.connector.raft_terms.get(name)
            self.connector.raft_terms[name] = read.raft_term
            if term is not None and term != read.raft_term:
                monitor.disturbed()  # etcd elected a leader since the last check
            if read.kv is not None:
                monitor.note(read.kv.value, read.kv.mod_revision)
        if quorum is not None:
            monitor.disturbed()
        obs = Observation(
            quorum_error=quorum,
            error_detail=detail,
            heartbeat_age=monitor.age(),
            heartbeat_threshold=monitor.threshold,
            heartbeat_stale=monitor.stale(),
            read_revision=None if quorum is not None else read.revision,
            beat_revision=monitor.revision or None,
        )
        health = self._health[name]
        failure = health.record(obs, ready=self._started)
        m = self.connector.metrics
        m.heartbeat_age.labels(name).set(obs.heartbeat_age)
        m.kvstore_healthy.labels(name).set(1 if health.healthy else 0)
        m.kvstore_errors.labels(name).set(health.consecutive_errors)
        return failure
