"""cp-operator in CRD mode: a Lease election and the leader's tasks over the Kubernetes API.

Every replica first installs or upgrades the CRDs (idempotent, safe when replicas start
together), then campaigns for the ``coordination.k8s.io/v1`` Lease
(:class:`~controlplane.crd.election.LeaseElection`) and serves /metrics, /healthz and
/readyz. The leader runs one TaskGroup per term:

- per-node CIDR allocation from the cluster pool: restore the claims from the PodCIDR
  list, watch the Node objects, and for each node without a claim create one (a
  ``PodCIDR`` named by the CIDR: the create is the claim), then write
  ``Node.spec.podCIDRs`` with a merge patch guarded by the resourceVersion it read; a node
  whose ``spec.podCIDRs`` was edited by hand is set back to its claim;
- identity GC every ``gc_interval`` (:class:`~controlplane.crd.identities.CrdIdentityCollector`,
  two rounds, uid and resourceVersion preconditions);
- GC of the PodCIDR claims and Endpoints of nodes gone for ``node_gc_grace`` (deletes
  guarded by uid and resourceVersion).

There is no heartbeat in CRD mode. Every leader write is fenced twice: a local check right
before it is sent (the term is active and its last Lease renewal is younger than the renew
deadline by our monotonic clock: :meth:`LeaseTerm.check`), and a form the API server
refuses when anything changed (a create of a uniquely named object, or an update or
delete with resourceVersion, and uid for deletes, preconditions). A task whose write is
refused locally ends the term; any other failure is logged and the task restarts after
``retry_period``: bad objects or an API server outage never crash the daemon.

In a double-write mode (``operator/doublewrite.py``) the same leader runs with the kvstore
as an :class:`~controlplane.operator.term.OtherStore` (doublewrite-readcrd), or is the
other store of the kvstore daemon's leader (:meth:`CrdOperator.other_store`,
doublewrite-readkvstore): then it adds its identity GC and ``Node.spec.podCIDRs`` (from
the kvstore leader's allocations) to that term.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from controlplane.crd.client import KubeClient
from controlplane.crd.election import LeaseElection, LeaseSettings, LeaseTerm, NotLeader
from controlplane.crd.errors import Conflict, CrdError, NotFound
from controlplane.crd.identities import CrdIdentityCollector
from controlplane.crd.install import install_crds
from controlplane.crd.ipam import CrdCIDRStore
from controlplane.crd.kubeconfig import KubeConnection
from controlplane.crd.nodes import CrdNodeStore
from controlplane.crd.resources import ENDPOINTS, NODES
from controlplane.ipam.cidr import ClusterPoolAllocator, PoolExhausted
from controlplane.metrics import DoubleWriteMetrics
from controlplane.model import IPNetwork, ModelError, Node, NodeName, parse_node_name
from controlplane.operator.doublewrite_cidrs import DoubleWriteCIDRs
from controlplane.operator.metrics import OperatorMetrics
from controlplane.operator.migration_drift import drift_monitor
from controlplane.operator.settings import OperatorSettings
from controlplane.operator.term import Job, OtherStore, ReadSide, Task, run_term, serve_until
from controlplane.store import CIDRStore
from controlplane.store_types import DoubleWriteConflict, EventKind
from controlplane.telemetry import Check, TelemetryServer

log = logging.getLogger("cp-operator")

_INSTALL_BACKOFF_MAX = 10.0
_PATCH_ATTEMPTS = 8


@dataclass(slots=True)
class _TermState:
    """What the leader tasks of one term share."""

    allocator: ClusterPoolAllocator | None = None
    restored: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once ``allocator`` holds the claims as listed at the start of the term."""
    present: set[NodeName] = field(default_factory=set)
    """Readable Node objects that exist now (from the watch; a malformed one reads as
    absent, and the node GC reads the object itself before collecting anything)."""
    synced: bool = False
    """The node watch delivered its initial list."""
    absent_since: dict[NodeName, float] = field(default_factory=dict)
    """Node -> local monotonic time it was first seen absent while holding state."""
    allocated: asyncio.Event = field(default_factory=asyncio.Event)
    """Set after each allocation (double-write: the other store's view of it)."""

    def cidr_of(self, node: NodeName) -> IPNetwork | None:
        return self.allocator.cidr_of(node) if self.allocator is not None else None


@dataclass(frozen=True, slots=True)
class _EndpointRef:
    namespace: str
    name: str
    uid: str
    resource_version: str


class CrdOperator:
    """One cp-operator replica in CRD mode; ``await run(stop, on_listening)``."""

    def __init__(
        self,
        settings: OperatorSettings,
        connection: KubeConnection,
        *,
        request_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        metrics: OperatorMetrics | None = None,
    ) -> None:
        settings.validate()
        self.settings = settings
        self.connection = connection
        self.request_timeout = request_timeout
        self.clock = clock
        self.metrics = metrics or OperatorMetrics.create()
        self.election: LeaseElection | None = None
        self.telemetry: TelemetryServer | None = None
        self.crds_installed = False
        self._install_error = "not installed yet"

    # -- lifecycle -------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, on_listening: Callable[[int], None]) -> None:
        settings = self.settings
        async with KubeClient(
            self.connection, request_timeout=self.request_timeout, user_agent="cp-operator"
        ) as client:
            tasks: dict[str, Task] = {"operator": functools.partial(self._main, client)}
            monitor = drift_monitor(settings, self.metrics.registry, self.connection)
            if monitor is not None:
                tasks["migration-drift"] = monitor.run
            await serve_until(
                stop,
                tasks,
                metrics=self.metrics,
                health=self.health,
                address=(settings.metrics_host, settings.metrics_port),
                on_listening=lambda server: self._listening(server, on_listening),
                farewell="releasing the Lease",
            )

    def _listening(self, server: TelemetryServer, on_listening: Callable[[int], None]) -> None:
        self.telemetry = server
        on_listening(server.port)

    async def _main(self, client: KubeClient) -> None:
        await self.install(client)
        election = self.election_for(client)
        await election.run(lambda term: self.lead(client, term))

    def election_for(self, client: KubeClient) -> LeaseElection:
        settings = self.settings
        election = LeaseElection(
            client,
            settings.id,
            LeaseSettings(
                namespace=settings.lease_namespace,
                name=settings.lease_name,
                lease_duration=settings.lease_duration,
                renew_deadline=settings.renew_deadline,
                retry_period=settings.retry_period,
            ),
            clock=self.clock,
            on_renewal=lambda result: self.metrics.lease_renewals.labels(result).inc(),
        )
        self.election = election
        return election

    async def install(self, client: KubeClient) -> None:
        """Install or upgrade the CRDs, retrying (with backoff) until it succeeds."""
        delay = self.settings.retry_period
        while True:
            try:
                done = await install_crds(client)
            except CrdError as exc:
                self._install_error = str(exc)
                log.warning("installing the CRDs failed: %s; retrying in %gs", exc, delay)
            except Exception as exc:  # a bad definition or answer: never a crash loop
                self._install_error = f"{type(exc).__name__}: {exc}"
                log.exception("installing the CRDs crashed; retrying in %gs", delay)
            else:
                self.crds_installed = True
                self._install_error = ""
                log.info("CRDs ready: %s", ", ".join(done))
                return
            await asyncio.sleep(delay)
            delay = min(_INSTALL_BACKOFF_MAX, delay * 2)

    def health(self) -> Mapping[str, Check]:
        election = self.election
        if not self.crds_installed:
            api = Check(False, f"CRDs: {self._install_error}")
        elif election is None or election.reachable is None:
            api = Check(False, "not probed yet")
        elif election.reachable:
            api = Check(False, election.reachable)
        else:
            api = Check(True, f"{self.connection.server} reachable")
        if election is None:
            elected = Check(False, "not started")
        elif election.is_leader and election.term is not None:
            elected = Check(True, f"leader (Lease transitions {election.term.epoch})")
        elif (leader := election.leader_id) is not None and leader != self.settings.id:
            elected = Check(True, f"following {leader}")
        else:
            elected = Check(False, "no leader known")
        return {"apiserver": api, "election": elected}

    # -- one term --------------------------------------------------------------------

    def _fence(self, term: LeaseTerm, resource: str) -> Callable[[], Awaitable[None]]:
        """The local half of the fence (awaited right before each write), counted when it
        refuses."""
        refused = self.metrics.fenced_writes.labels(resource)

        async def check() -> None:
            try:
                term.check()
            except NotLeader:
                refused.inc()
                raise

        return check

    async def lead(
        self, client: KubeClient, term: LeaseTerm, other: OtherStore | None = None
    ) -> None:
        """One term; in doublewrite-readcrd with the kvstore as ``other``."""
        state = _TermState()
        elsewhere = other.identities_in_use if other is not None else None
        jobs: dict[str, Job] = {
            "cidr-allocation": lambda: self._allocate(client, term, state, other),
            "identity-gc": lambda: self._identity_gc(client, term, elsewhere),
            "node-gc": lambda: self._node_gc(client, term, state, other),
            "cidr-claim-repair": lambda: self._repair_claims(client, term, state),
        }
        if other is not None:
            read = ReadSide(state.cidr_of, self._identities_in_use(client), state.allocated)
            jobs.update({f"other:{name}": job for name, job in other.jobs(read).items()})
        await run_term(
            term,
            jobs,
            metrics=self.metrics,
            retry_period=self.settings.retry_period,
            fenced=NotLeader,
            other=other,
        )

    # -- CIDR allocation -------------------------------------------------------------

    async def _allocate(
        self, client: KubeClient, term: LeaseTerm, state: _TermState, other: OtherStore | None
    ) -> None:
        store: CIDRStore = self._cidr_store(client, term)
        if other is not None:
            store = other.double_write(store)
        allocator = ClusterPoolAllocator(store, self.settings.pool)
        await allocator.restore()
        if isinstance(store, DoubleWriteCIDRs):
            await store.reconcile(self.settings.pool.name)
        state.allocator = allocator
        state.restored.set()
        state.present.clear()
        state.synced = False
        self.metrics.cidrs_in_use.set(allocator.in_use)
        log.info("CIDR allocator restored: %d CIDR(s) in use", allocator.in_use)
        fence = self._fence(term, "node")
        # Malformed Node objects are counted and skipped by the store's codec (for
        # readers, a node turning malformed is a delete; the node GC reads the object
        # itself before collecting anything, so a malformed node loses nothing).
        async for event in CrdNodeStore(client, self.metrics.store).watch():
            if event.kind is EventKind.SYNCED:
                state.synced = True
                continue
            name = NodeName(event.name)
            if event.kind is EventKind.DELETE:
                state.present.discard(name)
                continue
            node = event.value
            assert node is not None
            state.present.add(name)
            state.absent_since.pop(name, None)
            cidr = allocator.cidr_of(name)
            if cidr is None:
                try:
                    # A node that shows a CIDR but has no claim (lost while no operator
                    # ran) keeps it when it is still free.
                    cidr = await allocator.allocate(name, prefer=next(iter(node.pod_cidrs), None))
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
                log.info("allocated CIDR %s to node %s (term %d)", cidr, name, term.epoch)
            if node.pod_cidrs != (cidr,):
                await self._write_pod_cidrs(client, node, event.version, cidr, fence)

    def _cidr_store(self, client: KubeClient, term: LeaseTerm) -> CrdCIDRStore:
        return CrdCIDRStore(client, self.metrics.store, fence=self._fence(term, "pod-cidr"))

    async def _pod_cidrs(self, client: KubeClient, term: LeaseTerm, read: ReadSide) -> None:
        """doublewrite-readkvstore: set each Node's ``spec.podCIDRs`` to the CIDR the
        kvstore leader allocated it (as :meth:`_allocate` does in CRD mode), after each
        allocation and each change of a Node."""
        nodes: dict[NodeName, tuple[Node, int]] = {}
        fence = self._fence(term, "node")

        async def write() -> None:
            while True:
                await read.allocated.wait()
                read.allocated.clear()
                for name, (node, version) in list(nodes.items()):
                    cidr = read.cidr_of(name)
                    if cidr is not None and node.pod_cidrs != (cidr,):
                        await self._write_pod_cidrs(client, node, version, cidr, fence)

        async with asyncio.TaskGroup() as group:
            group.create_task(write(), name="pod-cidrs:write")
            async for event in CrdNodeStore(client, self.metrics.store).watch():
                if event.kind is EventKind.SYNCED:
                    continue
                if event.kind is EventKind.DELETE or event.value is None:
                    nodes.pop(NodeName(event.name), None)
                    continue
                nodes[NodeName(event.name)] = (event.value, event.version)
                read.allocated.set()

    async def _write_pod_cidrs(
        self,
        client: KubeClient,
        node: Node,
        version: int,
        cidr: IPNetwork,
        fence: Callable[[], Awaitable[None]],
    ) -> None:
        """Set ``spec.podCIDRs`` with a merge patch guarded by the resourceVersion read;
        on 409 read the node again (its agent may have written its status) and retry."""
        name = str(node.name)
        current = node.pod_cidrs
        for _ in range(_PATCH_ATTEMPTS):
            patch = {
                "metadata": {"resourceVersion": str(version)},
                "spec": {"podCIDRs": [str(cidr)]},
            }
            await fence()
            try:
                await client.patch(NODES, name, patch)
            except NotFound:
                return
            except Conflict:
                self.metrics.write_conflicts.labels("node").inc()
                obj = await client.get_or_none(NODES, name)
                if obj is None:
                    return
                meta = obj.get("metadata") or {}
                spec = obj.get("spec")
                cidrs = spec.get("podCIDRs") if isinstance(spec, dict) else None
                if cidrs == [str(cidr)]:
                    return
                version = int(meta.get("resourceVersion") or 0)
                continue
            if current:
                log.warning(
                    "node %s had pod CIDRs %s; set back to its claim %s",
                    name,
                    ",".join(map(str, current)),
                    cidr,
                )
            return
        raise CrdError(f"node {name} kept changing; its pod CIDRs are not written yet")

    async def _repair_claims(self, client: KubeClient, term: LeaseTerm, state: _TermState) -> None:
        """Re-create the PodCIDR claim of a present node when someone else deletes it
        (kubectl delete): the node keeps its CIDR, and the CIDR stays claimed. The
        create is the usual create-only claim, so it cannot take a CIDR from anyone."""
        await state.restored.wait()
        allocator = state.allocator
        assert allocator is not None
        store = CrdCIDRStore(client, self.metrics.store, fence=self._fence(term, "pod-cidr"))
        async for event in store.watch(self.settings.pool.name):
            claim = event.value
            if event.kind is not EventKind.DELETE or claim is None:
                continue
            if claim.node not in state.present or allocator.cidr_of(claim.node) != claim.cidr:
                continue  # a gone node's claim (the GC) or one the node does not use
            if await store.claim(claim):
                self.metrics.store.repairs.labels("cidr-claim", "deleted").inc()
                log.warning(
                    "the PodCIDR claim %s of node %s was deleted by someone else; re-created",
                    claim.cidr,
                    claim.node,
                )

    # -- identity GC -----------------------------------------------------------------

    def _identities_in_use(self, client: KubeClient) -> Callable[[], Awaitable[set[int]]]:
        return CrdIdentityCollector(client, self.metrics.store).in_use

    async def _identity_gc(
        self,
        client: KubeClient,
        term: LeaseTerm,
        elsewhere: Callable[[], Awaitable[set[int]]] | None = None,
    ) -> None:
        """``elsewhere``: double-write mode, the identities the other store uses (kept)."""
        collector = CrdIdentityCollector(
            client,
            self.metrics.store,
            deletes_per_second=self.settings.identity_gc_rate,
            fence=self._fence(term, "identity"),
            in_use_elsewhere=elsewhere,
        )
        while True:
            stats = await collector.collect()
            if stats.deleted or stats.skipped:
                log.info(
                    "identity GC: %d deleted, %d skipped, %d candidate(s)",
                    stats.deleted,
                    stats.skipped,
                    stats.candidates,
                )
            await asyncio.sleep(self.settings.gc_interval)

    # -- GC of gone nodes ------------------------------------------------------------

    async def _node_gc(
        self, client: KubeClient, term: LeaseTerm, state: _TermState, other: OtherStore | None
    ) -> None:
        while True:
            await asyncio.sleep(self.settings.gc_interval)
            if not state.synced or state.allocator is None:
                continue
            started = self.clock()
            await self._node_gc_sweep(client, term, state, state.allocator, other)
            self.metrics.node_gc_duration.observe(self.clock() - started)

    async def _node_gc_sweep(
        self,
        client: KubeClient,
        term: LeaseTerm,
        state: _TermState,
        allocator: ClusterPoolAllocator,
        other: OtherStore | None = None,
    ) -> None:
        """``other``: double-write mode; a node listed there is present, and a gone
        node's state there is collected too."""
        endpoints = await self._endpoints_by_node(client)
        holders = set(allocator.allocations()) | set(endpoints)
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
        fence = self._fence(term, "endpoint")
        for node in expired:
            if node in state.present or await client.get_or_none(NODES, node) is not None:
                state.absent_since.pop(node, None)
                continue  # it came back
            claims = len(allocator.allocations())
            await allocator.release(node)
            freed = claims - len(allocator.allocations())
            deleted.labels("cidr-claim").inc(freed)
            self.metrics.cidrs_in_use.set(allocator.in_use)
            for ref in endpoints.get(node, ()):
                if await self._delete_endpoint(client, ref, fence):
                    deleted.labels("endpoint").inc()
            if other is not None:
                await other.collect(node)
            state.absent_since.pop(node, None)
            log.info("collected the state of gone node %s", node)

    async def _endpoints_by_node(self, client: KubeClient) -> dict[NodeName, list[_EndpointRef]]:
        out: dict[NodeName, list[_EndpointRef]] = {}
        for obj in (await client.list(ENDPOINTS)).items:
            meta = obj.get("metadata") or {}
            spec = obj.get("spec")
            try:
                node = parse_node_name(spec.get("node") if isinstance(spec, dict) else None)
            except ModelError as exc:
                self.metrics.store.malformed.labels("endpoint").inc()
                log.warning(
                    "skipping malformed Endpoint %s/%s: %s",
                    meta.get("namespace"),
                    meta.get("name"),
                    exc,
                )
                continue
            out.setdefault(node, []).append(
                _EndpointRef(
                    str(meta.get("namespace", "")),
                    str(meta.get("name", "")),
                    str(meta.get("uid", "")),
                    str(meta.get("resourceVersion", "")),
                )
            )
        return out

    async def _delete_endpoint(
        self, client: KubeClient, ref: _EndpointRef, fence: Callable[[], Awaitable[None]]
    ) -> bool:
        await fence()
        try:
            return await client.delete(
                ENDPOINTS,
                ref.name,
                namespace=ref.namespace,
                uid=ref.uid or None,
                resource_version=ref.resource_version or None,
            )
        except Conflict:
            self.metrics.write_conflicts.labels("endpoint").inc()
            log.info("endpoint %s/%s changed since it was listed; kept", ref.namespace, ref.name)
            return False

    def other_store(
        self, client: KubeClient, term: LeaseTerm, metrics: DoubleWriteMetrics
    ) -> OtherStore:
        """The CRD store as the other store of doublewrite-readkvstore, fenced by ``term``."""
        return _CrdOther(self, client, term, metrics)


@dataclass(frozen=True, slots=True)
class _CrdOther:
    """The CRD store under a kvstore leader (doublewrite-readkvstore): its PodCIDR claims
    and ``Node.spec.podCIDRs``, its identity GC and the objects of gone nodes, every write
    fenced by the Lease's term."""

    op: CrdOperator
    client: KubeClient
    term: LeaseTerm
    metrics: DoubleWriteMetrics
    fenced: type[Exception] = NotLeader

    def double_write(self, read: CIDRStore) -> DoubleWriteCIDRs:
        return DoubleWriteCIDRs(read, self.op._cidr_store(self.client, self.term), self.metrics)

    def jobs(self, read: ReadSide) -> Mapping[str, Job]:
        op, client, term = self.op, self.client, self.term
        return {
            "identity-gc": lambda: op._identity_gc(client, term, read.identities_in_use),
            "pod-cidrs": lambda: op._pod_cidrs(client, term, read),
        }

    async def identities_in_use(self) -> set[int]:
        return await self.op._identities_in_use(self.client)()

    async def nodes(self) -> set[NodeName]:
        return {v.value.name for v in await CrdNodeStore(self.client, self.op.metrics.store).list()}

    async def holders(self) -> set[NodeName]:
        op = self.op
        claims = await op._cidr_store(self.client, self.term).list(op.settings.pool.name)
        return {c.value.node for c in claims} | set(await op._endpoints_by_node(self.client))

    async def collect(self, node: NodeName) -> None:
        op, client = self.op, self.client
        if await client.get_or_none(NODES, node) is not None:
            return  # it is back
        deleted = op.metrics.node_gc_deleted
        store = op._cidr_store(client, self.term)
        for claim in await store.list(op.settings.pool.name):
            if claim.value.node == node and await store.free(claim):
                deleted.labels("cidr-claim").inc()
        fence = op._fence(self.term, "endpoint")
        for ref in (await op._endpoints_by_node(client)).get(node, ()):
            if await op._delete_endpoint(client, ref, fence):
                deleted.labels("endpoint").inc()
