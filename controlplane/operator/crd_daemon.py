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
"""

from __future__ import annotations

import asyncio
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
from controlplane.model import IPNetwork, ModelError, Node, NodeName, parse_node_name
from controlplane.operator.metrics import OperatorMetrics
from controlplane.operator.settings import OperatorSettings
from controlplane.operator.term import Job, run_term
from controlplane.store_types import EventKind
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
    ) -> None:
        settings.validate()
        self.settings = settings
        self.connection = connection
        self.request_timeout = request_timeout
        self.clock = clock
        self.metrics = OperatorMetrics.create()
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
            server = TelemetryServer(
                self.metrics.registry,
                self.health,
                host=settings.metrics_host,
                port=settings.metrics_port,
            )
            await server.start()
            self.telemetry = server
            on_listening(server.port)
            try:
                async with asyncio.TaskGroup() as group:
                    main = group.create_task(self._main(client), name="operator")
                    await stop.wait()
                    log.info("shutting down: releasing the Lease")
                    main.cancel()
            finally:
                await server.close()
        log.info("stopped")

    async def _main(self, client: KubeClient) -> None:
        await self._install(client)
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
        await election.run(lambda term: self._lead(client, term))

    async def _install(self, client: KubeClient) -> None:
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

    async def _lead(self, client: KubeClient, term: LeaseTerm) -> None:
        state = _TermState()
        jobs: dict[str, Job] = {
            "cidr-allocation": lambda: self._allocate(client, term, state),
            "identity-gc": lambda: self._identity_gc(client, term),
            "node-gc": lambda: self._node_gc(client, term, state),
            "cidr-claim-repair": lambda: self._repair_claims(client, term, state),
        }
        await run_term(
            term,
            jobs,
            metrics=self.metrics,
            retry_period=self.settings.retry_period,
            fenced=NotLeader,
        )

    # -- CIDR allocation -------------------------------------------------------------

    async def _allocate(self, client: KubeClient, term: LeaseTerm, state: _TermState) -> None:
        store = CrdCIDRStore(client, self.metrics.store, fence=self._fence(term, "pod-cidr"))
        allocator = ClusterPoolAllocator(store, self.settings.pool)
        await allocator.restore()
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
                self.metrics.cidr_allocations.labels("ok").inc()
                self.metrics.cidrs_in_use.set(allocator.in_use)
                log.info("allocated CIDR %s to node %s (term %d)", cidr, name, term.epoch)
            if node.pod_cidrs != (cidr,):
                await self._write_pod_cidrs(client, node, event.version, cidr, fence)

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

    async def _identity_gc(self, client: KubeClient, term: LeaseTerm) -> None:
        collector = CrdIdentityCollector(
            client,
            self.metrics.store,
            deletes_per_second=self.settings.identity_gc_rate,
            fence=self._fence(term, "identity"),
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

    async def _node_gc(self, client: KubeClient, term: LeaseTerm, state: _TermState) -> None:
        while True:
            await asyncio.sleep(self.settings.gc_interval)
            if not state.synced or state.allocator is None:
                continue
            started = self.clock()
            await self._node_gc_sweep(client, term, state, state.allocator)
            self.metrics.node_gc_duration.observe(self.clock() - started)

    async def _node_gc_sweep(
        self,
        client: KubeClient,
        term: LeaseTerm,
        state: _TermState,
        allocator: ClusterPoolAllocator,
    ) -> None:
        endpoints = await self._endpoints_by_node(client)
        holders = set(allocator.allocations()) | set(endpoints)
        now = self.clock()
        for node in list(state.absent_since):
            if node in state.present or node not in holders:
                del state.absent_since[node]
        for node in holders - state.present:
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
