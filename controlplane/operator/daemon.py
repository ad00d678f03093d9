"""cp-operator's control loop: election, leader-only tasks, telemetry.

Every replica campaigns (:class:`~controlplane.kvstore.election.Election`), watches the
heartbeat on every shard (counting malformed values) and serves /metrics, /healthz and
/readyz. The leader runs one TaskGroup per term:

- heartbeat on every shard every ``heartbeat_interval``, each shard on its own loop with a
  deadline within the interval (a dead shard never delays another's beat);
- per-node CIDR allocation from the cluster pool (restore, then watch the nodes);
- identity GC every ``gc_interval`` (two rounds, rate limited);
- GC of the CIDR claims, IP leases and endpoints of nodes gone for ``node_gc_grace``.

Every write carries the term's fence, so a deposed leader's write is refused by etcd;
the election cancels the term before its lease could expire. A task that finds itself
fenced ends the term; any other failure is logged and the task restarts after
``retry_period``: bad data or an etcd outage never crashes the daemon.

In a double-write mode (``operator/doublewrite.py``) the same leader runs with the CRD
store as an :class:`~controlplane.operator.term.OtherStore` (doublewrite-readkvstore), or
is the other store of the CRD daemon's leader (:meth:`Operator.other_store`,
doublewrite-readcrd): then it adds the heartbeat and its identity GC to that term.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from controlplane import codec
from controlplane.config import KvstoreConfig
from controlplane.ipam.cidr import ClusterPoolAllocator, PoolExhausted
from controlplane.kvstore.backend import EtcdBackend
from controlplane.kvstore.election import Election, ElectionSettings, Term
from controlplane.kvstore.errors import KvstoreError
from controlplane.kvstore.heartbeat import Heartbeat, HeartbeatMonitor, write_heartbeat
from controlplane.kvstore.identities import KvIdentityCollector
from controlplane.kvstore.ipam import Fenced, KvCIDRStore
from controlplane.kvstore.keys import KeyLayout
from controlplane.kvstore.nodes import KvNodeStore
from controlplane.kvstore.shards import ShardMap
from controlplane.kvstore.types import Delete, Get, absent, mod_revision_is
from controlplane.metrics import DoubleWriteMetrics
from controlplane.model import Endpoint, IPNetwork, ModelError, NodeName, parse_node_name
from controlplane.operator.doublewrite_cidrs import DoubleWriteCIDRs
from controlplane.operator.metrics import OperatorMetrics
from controlplane.operator.migration_drift import drift_monitor
from controlplane.operator.settings import OperatorSettings
from controlplane.operator.term import Job, OtherStore, ReadSide, Task, run_term, serve_until
from controlplane.store import CIDRStore
from controlplane.store_types import DoubleWriteConflict, EventKind
from controlplane.telemetry import Check, TelemetryServer

log = logging.getLogger("cp-operator")


@dataclass(slots=True)
class _TermState:
    """What the leader tasks of one term share."""

    allocator: ClusterPoolAllocator | None = None
    present: set[NodeName] = field(default_factory=set)
    """Nodes in the node list now (from the watch)."""
    synced: bool = False
    """The node watch delivered its initial list."""
    absent_since: dict[NodeName, float] = field(default_factory=dict)
    """Node -> local monotonic time it was first seen absent while holding state."""
    allocated: asyncio.Event = field(default_factory=asyncio.Event)
    """Set after each allocation (double-write: the other store's view of it)."""

    def cidr_of(self, node: NodeName) -> IPNetwork | None:
        return self.allocator.cidr_of(node) if self.allocator is not None else None


class Operator:
    """One cp-operator replica; ``await run(stop)`` until ``stop`` is set."""

    def __init__(
        self,
        settings: OperatorSettings,
        kvstore: KvstoreConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        metrics: OperatorMetrics | None = None,
    ) -> None:
        settings.validate()
        self.settings = settings
        self.kvstore = kvstore
        self.layout = KeyLayout(kvstore.prefix)
        self.metrics = metrics or OperatorMetrics.create()
        self.clock = clock
        self.election: Election | None = None
        self.telemetry: TelemetryServer | None = None
        self._seq = 0
        self._etcd: dict[str, str] = {}
        """Cluster -> "" when the last probe succeeded, else the error."""

    # -- lifecycle -------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, on_listening: Callable[[int], None]) -> None:
        settings = self.settings
        async with ShardMap(self.kvstore) as shards:
            election = self.election_for(shards)
            tasks: dict[str, Task] = {
                "election": functools.partial(election.run, lambda term: self.lead(shards, term)),
                "etcd-probe": functools.partial(self.probe, shards),
                **self.heartbeat_monitors(shards),
            }
            drift = drift_monitor(settings, self.metrics.registry, self.kvstore)
            if drift is not None:
                tasks["migration-drift"] = drift.run
            await serve_until(
                stop,
                tasks,
                metrics=self.metrics,
                health=self.health,
                address=(settings.metrics_host, settings.metrics_port),
                on_listening=lambda server: self._listening(server, on_listening),
                farewell="resigning leadership",
            )

    def _listening(self, server: TelemetryServer, on_listening: Callable[[int], None]) -> None:
        self.telemetry = server
        on_listening(server.port)

    def election_for(self, shards: ShardMap) -> Election:
        settings = self.settings
        self.election = Election(
            shards,
            self.layout,
            settings.id,
            ElectionSettings(
                settings.lease_duration, settings.renew_deadline, settings.retry_period
            ),
            clock=self.clock,
        )
        return self.election

    def heartbeat_monitors(self, shards: ShardMap) -> dict[str, Task]:
        """A watch of the heartbeat on every shard (counting malformed values)."""
        jobs: dict[str, Task] = {}
        for backend in shards.all():
            monitor = HeartbeatMonitor(
                backend,
                self.layout,
                interval=self.settings.heartbeat_interval,
                metrics_malformed=self.metrics.store.malformed.labels("heartbeat").inc,
            )
            name = f"heartbeat-watch:{backend.name}"
            jobs[name] = functools.partial(self._forever, name, monitor.run)
        return jobs

    def health(self) -> Mapping[str, Check]:
        failing = {name: err for name, err in self._etcd.items() if err}
        if not self._etcd:
            etcd = Check(False, "not probed yet")
        elif failing:
            etcd = Check(False, "; ".join(f"{n}: {e}" for n, e in sorted(failing.items())))
        else:
            etcd = Check(True, f"{len(self._etcd)} cluster(s) reachable")
        election = self.election
        if election is None:
            elected = Check(False, "not started")
        elif election.is_leader:
            elected = Check(True, f"leader (epoch {election.epoch})")
        elif election.leader_id is not None:
            elected = Check(True, f"following {election.leader_id}")
        else:
            elected = Check(False, "no leader known")
        return {"etcd": etcd, "election": elected}

    async def probe(self, shards: ShardMap) -> None:
        period = max(1.0, self.settings.retry_period)
        while True:
            for backend in shards.all():
                try:
                    async with asyncio.timeout(backend.settings.request_timeout):
                        await backend.current_revision()
                    self._etcd[backend.name] = ""
                except (KvstoreError, TimeoutError) as exc:
                    self._etcd[backend.name] = str(exc) or "timed out"
            await asyncio.sleep(period)

    async def _forever(self, name: str, body: Callable[[], Awaitable[None]]) -> None:
        """Run a long-lived task; log an unexpected exit and restart it."""
        while True:
            try:
                await body()
                log.warning("%s: ended; restarting", name)
            except KvstoreError as exc:
                log.warning("%s: %s; restarting", name, exc)
            except Exception:
                log.exception("%s: crashed; restarting", name)
            await asyncio.sleep(self.settings.retry_period)

    # -- one term --------------------------------------------------------------------

    async def lead(self, shards: ShardMap, term: Term, other: OtherStore | None = None) -> None:
        """One term; in doublewrite-readkvstore with the CRD store as ``other``."""
        state = _TermState()
        elsewhere = other.identities_in_use if other is not None else None
        jobs: dict[str, Job] = {
            "heartbeat": lambda: self._heartbeats(shards, term),
            "cidr-allocation": lambda: self._allocate(shards, term, state, other),
            "identity-gc": lambda: self._identity_gc(shards, term, elsewhere),
            "node-gc": lambda: self._node_gc(shards, term, state, other),
        }
        if other is not None:
            read = ReadSide(state.cidr_of, self._identities_in_use(shards), state.allocated)
            jobs.update({f"other:{name}": job for name, job in other.jobs(read).items()})
        await run_term(
            term,
            jobs,
            metrics=self.metrics,
            retry_period=self.settings.retry_period,
            fenced=Fenced,
            other=other,
        )

    # -- (a) heartbeat ---------------------------------------------------------------

    async def _heartbeats(self, shards: ShardMap, term: Term) -> None:
        await _per_cluster("heartbeat", shards.all(), lambda b: self._heartbeat(b, term))

    async def _heartbeat(self, backend: EtcdBackend, term: Term) -> None:
        interval = self.settings.heartbeat_interval
        while True:
            started = self.clock()
            self._seq += 1
            beat = Heartbeat(time.time(), self._seq, self.settings.id, interval)
            await self._beat(backend, term, beat)  # Fenced ends the term
            await asyncio.sleep(max(0.0, interval - (self.clock() - started)))

    @property
    def _beat_deadline(self) -> float:
        return 0.8 * self.settings.heartbeat_interval

    async def _beat(self, backend: EtcdBackend, term: Term, beat: Heartbeat) -> None:
        counter = self.metrics.heartbeat_writes
        try:
            fence = term.fence(backend)
            # A deadline within the interval: the next beat is due on time, whatever this
            # one met (a write to a member that just died can wait for etcd's own timeout).
            async with asyncio.timeout(self._beat_deadline):
                written = await write_heartbeat(backend, self.layout, beat, fence)
        except Fenced:
            counter.labels(backend.name, "fenced").inc()
            raise
        except (KvstoreError, TimeoutError) as exc:
            counter.labels(backend.name, "error").inc()
            reason = str(exc) or f"no answer within {self._beat_deadline:g}s"
            log.warning("heartbeat %d on %s failed: %s", beat.seq, backend.name, reason)
            return
        if not written:
            counter.labels(backend.name, "fenced").inc()
            raise Fenced(f"heartbeat on {backend.name} refused: fence compares failed")
        counter.labels(backend.name, "ok").inc()
        log.debug("heartbeat %d written on %s", beat.seq, backend.name)

    # -- (b) CIDR allocation ---------------------------------------------------------

    def _cidr_store(self, shards: ShardMap, term: Term) -> KvCIDRStore:
        pool = self.settings.pool.name
        holder: list[KvCIDRStore] = []
        store = KvCIDRStore(
            shards,
            self.layout,
            self.metrics.store,
            fence=lambda: term.fence(holder[0].backend_for(pool)),
        )
        holder.append(store)
        return store

    async def _allocate(
        self, shards: ShardMap, term: Term, state: _TermState, other: OtherStore | None
    ) -> None:
        store: CIDRStore = self._cidr_store(shards, term)
        if other is not None:
            store = other.double_write(store)
        allocator = ClusterPoolAllocator(store, self.settings.pool)
        await allocator.restore()
        if isinstance(store, DoubleWriteCIDRs):
            await store.reconcile(self.settings.pool.name)
        state.allocator = allocator
        state.present.clear()
        state.synced = False
        self.metrics.cidrs_in_use.set(allocator.in_use)
        log.info("CIDR allocator restored: %d CIDR(s) in use", allocator.in_use)
        nodes = KvNodeStore(
            shards, self.layout, self.metrics.store, None, node=None,
            cluster=self.settings.cluster_name,
        )  # fmt: skip
        async for event in nodes.watch():
            if event.kind is EventKind.SYNCED:
                state.synced = True
                continue
            name = NodeName(event.name)
            if event.kind is EventKind.DELETE:
                state.present.discard(name)
                continue
            state.present.add(name)
            state.absent_since.pop(name, None)
            if allocator.cidr_of(name) is not None:
                continue
            try:
                cidr = await allocator.allocate(name)
            except PoolExhausted as exc:
                self.metrics.cidr_allocations.labels("exhausted").inc()
                log.error("no CIDR for node %s: %s", name, exc)
                continue
            except DoubleWriteConflict:
                self.metrics.cidr_allocations.labels("conflict").inc()
                continue  # logged and counted by the store; the node waits
            state.allocated.set()
            self.metrics.cidr_allocations.labels("ok").inc()
            self.metrics.cidrs_in_use.set(allocator.in_use)
            log.info("allocated CIDR %s to node %s (epoch %d)", cidr, name, term.epoch)

    # -- (c) identity GC -------------------------------------------------------------

    def _identities_in_use(self, shards: ShardMap) -> Callable[[], Awaitable[set[int]]]:
        return KvIdentityCollector(shards, self.layout, self.metrics.store).in_use

    async def _identity_gc(
        self,
        shards: ShardMap,
        term: Term,
        elsewhere: Callable[[], Awaitable[set[int]]] | None = None,
    ) -> None:
        """``elsewhere``: double-write mode, the identities the other store uses (kept)."""
        await _per_cluster(
            "identity-gc",
            shards.shards("identities"),
            lambda b: self._identity_gc_on(shards, b, term, elsewhere),
        )

    async def _identity_gc_on(
        self,
        shards: ShardMap,
        backend: EtcdBackend,
        term: Term,
        elsewhere: Callable[[], Awaitable[set[int]]] | None,
    ) -> None:
        collector = KvIdentityCollector(
            _one_cluster_view(shards, backend),
            self.layout,
            self.metrics.store,
            deletes_per_second=self.settings.identity_gc_rate,
            fence=functools.partial(term.fence, backend),
            in_use_elsewhere=elsewhere,
        )
        while True:
            try:
                stats = await collector.collect()
            except Fenced:
                raise
            except KvstoreError as exc:  # this cluster only; the others go on
                retry = self.settings.retry_period
                log.warning("identity GC on %s: %s; retrying in %gs", backend.name, exc, retry)
                await asyncio.sleep(retry)
                continue
            if stats.deleted or stats.skipped:
                log.info(
                    "identity GC on %s: %d deleted, %d skipped, %d candidate(s)",
                    backend.name,
                    stats.deleted,
                    stats.skipped,
                    stats.candidates,
                )
            await asyncio.sleep(self.settings.gc_interval)

    # -- (d) GC of gone nodes --------------------------------------------------------

    async def _node_gc(
        self, shards: ShardMap, term: Term, state: _TermState, other: OtherStore | None
    ) -> None:
        while True:
            await asyncio.sleep(self.settings.gc_interval)
            if not state.synced or state.allocator is None:
                continue
            started = self.clock()
            await self._node_gc_sweep(shards, term, state, state.allocator, other)
            self.metrics.node_gc_duration.observe(self.clock() - started)

    async def _node_gc_sweep(
        self,
        shards: ShardMap,
        term: Term,
        state: _TermState,
        allocator: ClusterPoolAllocator,
        other: OtherStore | None = None,
    ) -> None:
        """``other``: double-write mode; a node listed there is present, and a gone
        node's state there is collected too."""
        leases = await self._lease_holders(shards)
        endpoints = await self._endpoint_holders(shards)
        holders = set(allocator.allocations()) | set(leases) | set(endpoints)
        present = set(state.present)
        if other is not None:
            holders |= await other.holders()
            present |= await other.nodes()
        now = self.clock()
        for node in list(state.absent_since):
            if node in present or node not in holders:
                del state.absent_since[node]
        for node in holders - present:
            if node not in state.absent_since:
                log.info("node %s is gone but holds state; collecting after the grace", node)
                state.absent_since[node] = now
        grace = self.settings.node_gc_grace
        expired = [n for n, since in state.absent_since.items() if now - since >= grace]
        self.metrics.node_gc_pending.set(len(state.absent_since) - len(expired))
        deleted = self.metrics.node_gc_deleted
        for node in expired:
            if node in state.present:
                continue
            claims = len(allocator.allocations())
            await allocator.release(node)
            freed = claims - len(allocator.allocations())
            deleted.labels("cidr-claim").inc(freed)
            self.metrics.cidrs_in_use.set(allocator.in_use)
            for backend in leases.get(node, ()):
                deleted.labels("ip-lease").inc(await self._delete_leases(backend, term, node))
            for backend, key, revision in endpoints.get(node, ()):
                deleted.labels("endpoint").inc(
                    await self._delete_endpoint(backend, term, node, key, revision)
                )
            if other is not None:
                await other.collect(node)
            state.absent_since.pop(node, None)
            log.info("collected the state of gone node %s", node)

    async def _lease_holders(self, shards: ShardMap) -> dict[NodeName, list[EtcdBackend]]:
        """Node -> the ipam clusters holding IP leases of it."""
        root = self.layout.ipam_leases_prefix
        out: dict[NodeName, list[EtcdBackend]] = {}
        for backend in shards.shards("ipam"):
            result = await backend.list_prefix(root)
            seen: set[NodeName] = set()
            for kv in result.kvs:
                part, slash, _ = kv.key[len(root) :].partition(b"/")
                try:
                    if not slash:
                        raise ValueError("no node component")
                    node = parse_node_name(part.decode("utf-8"))
                except (ValueError, UnicodeDecodeError) as exc:
                    self.metrics.store.malformed.labels("ip-lease").inc()
                    log.warning("skipping malformed ip-lease key %r: %s", kv.key, exc)
                    continue
                if node not in seen:
                    seen.add(node)
                    out.setdefault(node, []).append(backend)
        return out

    async def _endpoint_holders(
        self, shards: ShardMap
    ) -> dict[NodeName, list[tuple[EtcdBackend, bytes, int]]]:
        """Node -> (cluster, key, mod revision) of each endpoint it publishes."""
        prefix = self.layout.ip_prefix(self.settings.cluster_name)
        out: dict[NodeName, list[tuple[EtcdBackend, bytes, int]]] = {}
        for backend in shards.shards("endpoints"):
            result = await backend.list_prefix(prefix)
            for kv in result.kvs:
                try:
                    node = Endpoint.from_dict(codec.decode("endpoint", kv.value)).node
                except (codec.DecodeError, ModelError) as exc:
                    self.metrics.store.malformed.labels("endpoint").inc()
                    log.warning("skipping malformed endpoint at %r: %s", kv.key, exc)
                    continue
                out.setdefault(node, []).append((backend, kv.key, kv.mod_revision))
        return out

    async def _delete_leases(self, backend: EtcdBackend, term: Term, node: NodeName) -> int:
        """Delete every IP lease of ``node`` on ``backend`` while the node is still gone."""
        node_key = self.layout.node(self.settings.cluster_name, node)
        result = await backend.txn(
            [absent(node_key), *term.fence(backend)],
            [Delete(self.layout.ipam_node_leases(node), prefix=True)],
            [Get(node_key)],
        )
        if result.succeeded:
            return result.results[0].deleted
        if result.results[0].kvs:
            log.info("node %s came back; its IP leases stay", node)
            return 0
        raise Fenced(f"deleting the IP leases of {node} refused: fence compares failed")

    async def _delete_endpoint(
        self, backend: EtcdBackend, term: Term, node: NodeName, key: bytes, revision: int
    ) -> int:
        node_key = self.layout.node(self.settings.cluster_name, node)
        result = await backend.txn(
            [mod_revision_is(key, revision), absent(node_key), *term.fence(backend)],
            [Delete(key)],
            [Get(node_key), Get(key)],
        )
        if result.succeeded:
            return result.results[0].deleted
        back, current = result.results[0].kvs, result.results[1].kvs
        if back or not current or current[0].mod_revision != revision:
            return 0  # the node came back, or the endpoint changed: leave it
        raise Fenced(f"deleting endpoint {key!r} refused: fence compares failed")

    def other_store(self, shards: ShardMap, term: Term, metrics: DoubleWriteMetrics) -> OtherStore:
        """The kvstore as the other store of doublewrite-readcrd, fenced by ``term``."""
        return _KvOther(self, shards, term, metrics)


@dataclass(frozen=True, slots=True)
class _KvOther:
    """The kvstore under a CRD-store leader (doublewrite-readcrd): its claims, heartbeat,
    identity GC and the state of gone nodes, every write fenced by the kvstore's term."""

    op: Operator
    shards: ShardMap
    term: Term
    metrics: DoubleWriteMetrics
    fenced: type[Exception] = Fenced

    def double_write(self, read: CIDRStore) -> DoubleWriteCIDRs:
        return DoubleWriteCIDRs(read, self.op._cidr_store(self.shards, self.term), self.metrics)

    def jobs(self, read: ReadSide) -> Mapping[str, Job]:
        op, shards, term = self.op, self.shards, self.term
        return {
            "heartbeat": lambda: op._heartbeats(shards, term),
            "identity-gc": lambda: op._identity_gc(shards, term, read.identities_in_use),
        }

    async def identities_in_use(self) -> set[int]:
        return await self.op._identities_in_use(self.shards)()

    def _nodes(self) -> KvNodeStore:
        op = self.op
        return KvNodeStore(
            self.shards, op.layout, op.metrics.store, None, node=None,
            cluster=op.settings.cluster_name,
        )  # fmt: skip

    async def nodes(self) -> set[NodeName]:
        return {v.value.name for v in await self._nodes().list()}

    async def holders(self) -> set[NodeName]:
        op = self.op
        claims = await op._cidr_store(self.shards, self.term).list(op.settings.pool.name)
        leases = await op._lease_holders(self.shards)
        endpoints = await op._endpoint_holders(self.shards)
        return {c.value.node for c in claims} | set(leases) | set(endpoints)

    async def collect(self, node: NodeName) -> None:
        op, term = self.op, self.term
        if await self._nodes().get(node) is not None:
            return  # it is back (the guarded deletes below check it again)
        deleted = op.metrics.node_gc_deleted
        store = op._cidr_store(self.shards, term)
        for claim in await store.list(op.settings.pool.name):
            if claim.value.node == node and await store.free(claim):
                deleted.labels("cidr-claim").inc()
        for backend in (await op._lease_holders(self.shards)).get(node, ()):
            deleted.labels("ip-lease").inc(await op._delete_leases(backend, term, node))
        for backend, key, revision in (await op._endpoint_holders(self.shards)).get(node, ()):
            deleted.labels("endpoint").inc(
                await op._delete_endpoint(backend, term, node, key, revision)
            )


def _one_cluster_view(shards: ShardMap, backend: EtcdBackend) -> ShardMap:
    """A ShardMap over one of ``shards``' connections (no new connection is opened).

    The identity collector takes one fence callable for all of its clusters, but a fence
    compares keys of one cluster only, so the operator runs one collector per cluster.
    """
    if len(shards.shards("identities")) == 1:
        return shards
    config = replace(shards.config, clusters=(shards.config.cluster(backend.name),), shards={})
    view = ShardMap(config)
    view.backends = {backend.name: backend}
    return view


async def _per_cluster(
    job: str,
    backends: list[EtcdBackend],
    body: Callable[[EtcdBackend], Coroutine[Any, Any, None]],
) -> None:
    """Run a leader job on each cluster as a task of its own, so a slow or dead cluster
    never delays another's work; the first Fenced (the term is over) ends them all."""
    try:
        async with asyncio.TaskGroup() as group:
            for backend in backends:
                group.create_task(body(backend), name=f"{job}:{backend.name}")
    except* Fenced as fenced:
        raise fenced.exceptions[0] from None
