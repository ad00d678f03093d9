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
- identity GC every ``gc_interval`` (:class:`~controlplane.crd.identity_gc.CrdIdentityCollector`,
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

from controlplane.crd.client import JSON, KubeClient
from controlplane.crd.election import LeaseElection, LeaseSettings, LeaseTerm, NotLeader
from controlplane.crd.errors import Conflict, CrdError, NotFound
from controlplane.crd.identity_gc import CrdIdentityCollector
from controlplane.crd.install import install_crds
from controlplane.crd.ipam import CrdCIDRStore
from controlplane.crd.kubeconfig import KubeConnection
from controlplane.crd.listwatch import EventType, KubeListWatcher
from controlplane.crd.resources import ENDPOINTS, NODES
from controlplane.ipam.cidr import ClusterPoolAllocator, PoolExhausted
from controlplane.model import (
    IPNetwork,
    ModelError,
    Node,
    NodeName,
    parse_cidr,
    parse_ip,
    parse_node_name,
)
from controlplane.operator.metrics import OperatorMetrics
from controlplane.operator.settings import OperatorSettings
from controlplane.telemetry import Check, TelemetryServer

log = logging.getLogger("cp-operator")

_INSTALL_BACKOFF_MAX = 10.0


@dataclass(slots=True)
class _TermState:
    """What the leader tasks of one term share."""

    allocator: ClusterPoolAllocator | None = None
    present: set[NodeName] = field(default_factory=set)
    """Node objects that exist now (from the watch), readable or not."""
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


def parse_node(obj: JSON) -> Node:
    """The Node an object describes (as the agent writes it); ModelError/ValueError when
    anything in it is malformed."""
    meta = obj.get("metadata") or {}
    name = parse_node_name(meta.get("name"))
    spec = obj.get("spec") or {}
    if not isinstance(spec, dict):
        raise ValueError("spec is not an object")
    addresses = spec.get("addresses") or []
    cidrs = spec.get("podCIDRs") or []
    if not isinstance(addresses, list) or not isinstance(cidrs, list):
        raise ValueError("addresses and podCIDRs must be lists")
    ips = []
    for entry in addresses:
        if not isinstance(entry, dict) or not isinstance(entry.get("ip"), str):
            raise ValueError(f"bad address {entry!r}")
        ips.append(parse_ip(entry["ip"]))
    return Node(
        name=name,
        ips=tuple(ips),
        pod_cidrs=tuple(parse_cidr(str(c)) for c in cidrs),
        boot_id=spec.get("bootID") or "",
    )


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
                await asyncio.sleep(delay)
                delay = min(_INSTALL_BACKOFF_MAX, delay * 2)
                continue
            self.crds_installed = True
            self._install_error = ""
            log.info("CRDs ready: %s", ", ".join(done))
            return

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

    def _fence(self, term: LeaseTerm, resource: str) -> Callable[[], None]:
        """The local half of the fence, counted when it refuses."""
        refused = self.metrics.fenced_writes.labels(resource)

        def check() -> None:
            try:
                term.check()
            except NotLeader:
                refused.inc()
                raise

        return check

    async def _lead(self, client: KubeClient, term: LeaseTerm) -> None:
        metrics = self.metrics
        metrics.leader.set(1)
        metrics.epoch.set(term.epoch)
        metrics.leader_transitions.labels("elected").inc()
        log.info("leading (Lease transitions %d): starting leader tasks", term.epoch)
        state = _TermState()
        try:
            async with asyncio.TaskGroup() as group:
                jobs: dict[str, Callable[[], Awaitable[None]]] = {
                    "cidr-allocation": lambda: self._allocate(client, term, state),
                    "identity-gc": lambda: self._identity_gc(client, term),
                    "node-gc": lambda: self._node_gc(client, term, state),
                }
                for name, job in jobs.items():
                    group.create_task(self._leader_task(name, term, job), name=name)
        finally:
            metrics.leader.set(0)
            metrics.epoch.set(0)
            metrics.leader_transitions.labels("lost").inc()
            log.info("leader tasks of term %d stopped", term.epoch)

    async def _leader_task(
        self, name: str, term: LeaseTerm, body: Callable[[], Awaitable[None]]
    ) -> None:
        while True:
            try:
                await body()
                return
            except NotLeader as exc:
                log.warning("%s: write refused (%s); ending the term", name, exc)
                term.lose(f"{name}: {exc}")
                return
            except CrdError as exc:
                log.warning("%s: %s; retrying in %gs", name, exc, self.settings.retry_period)
            except Exception:
                log.exception("%s: crashed; restarting", name)
            await asyncio.sleep(self.settings.retry_period)

    # -- CIDR allocation -------------------------------------------------------------

    async def _allocate(self, client: KubeClient, term: LeaseTerm, state: _TermState) -> None:
        check_claim = self._fence(term, "pod-cidr")

        async def claim_fence() -> None:
            check_claim()

        store = CrdCIDRStore(client, self.metrics.store, fence=claim_fence)
        allocator = ClusterPoolAllocator(store, self.settings.pool)
        await allocator.restore()
        state.allocator = allocator
        state.present.clear()
        state.synced = False
        self.metrics.cidrs_in_use.set(allocator.in_use)
        log.info("CIDR allocator restored: %d CIDR(s) in use", allocator.in_use)
        fence = self._fence(term, "node")
        async for event in KubeListWatcher(client, NODES).events():
            if event.type is EventType.LIST_DONE:
                state.synced = True
                continue
            name = NodeName(event.key)
            if event.type is EventType.DELETE:
                state.present.discard(name)
                continue
            state.present.add(name)
            state.absent_since.pop(name, None)
            assert event.object is not None
            try:
                node = parse_node(event.object)
            except (ModelError, ValueError) as exc:
                self.metrics.store.malformed.labels("node").inc()
                log.warning("skipping malformed Node %r: %s", event.key, exc)
                continue
            cidr = allocator.cidr_of(node.name)
            if cidr is None:
                try:
                    cidr = await allocator.allocate(node.name)
                except PoolExhausted as exc:
                    self.metrics.cidr_allocations.labels("exhausted").inc()
                    log.error("no CIDR for node %s: %s", node.name, exc)
                    continue
                self.metrics.cidr_allocations.labels("ok").inc()
                self.metrics.cidrs_in_use.set(allocator.in_use)
                log.info("allocated CIDR %s to node %s (term %d)", cidr, node.name, term.epoch)
            if node.pod_cidrs != (cidr,):
                await self._write_pod_cidrs(client, event.object, node, cidr, fence)

    async def _write_pod_cidrs(
        self,
        client: KubeClient,
        obj: JSON,
        node: Node,
        cidr: IPNetwork,
        fence: Callable[[], None],
    ) -> None:
        """Set ``spec.podCIDRs``, guarded by the resourceVersion ``obj`` was read at."""
        version = str((obj.get("metadata") or {}).get("resourceVersion", ""))
        patch = {"metadata": {"resourceVersion": version}, "spec": {"podCIDRs": [str(cidr)]}}
        fence()
        try:
            await client.patch(NODES, str(node.name), patch)
        except Conflict:
            # Changed since this event: the watch brings the newer version, decided then.
            self.metrics.write_conflicts.labels("node").inc()
            return
        except NotFound:
            return
        if node.pod_cidrs:
            log.warning(
                "node %s had pod CIDRs %s; set back to its claim %s",
                node.name,
                ",".join(map(str, node.pod_cidrs)),
                cidr,
            )

    # -- identity GC -----------------------------------------------------------------

    async def _identity_gc(self, client: KubeClient, term: LeaseTerm) -> None:
        collector = CrdIdentityCollector(
            client,
            self.metrics.store,
            deletes_per_second=self.settings.identity_gc_rate,
            fence=self._fence(term, "identity"),
            clock=self.clock,
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
        self, client: KubeClient, ref: _EndpointRef, fence: Callable[[], None]
    ) -> bool:
        fence()
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
