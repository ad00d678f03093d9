"""The agent: registers its node, owns its endpoints, mirrors the cluster into the ipcache.

One :class:`Agent` per node; several can run in one process (each with its own
connections, cache, maps and metrics). Its control-plane side lives in a
:class:`_Session`: one generation of etcd connections, leases (``Owners``), stores,
heartbeat monitors, watches and status checks, all in one ``TaskGroup``. When the kvstore
turns unhealthy (see :mod:`controlplane.agent.health`) the session is torn down and,
after a per-node jittered delay, a new one reconnects, re-lists, reconciles the maps by
mark-and-sweep (never flushing them) and re-publishes what the agent owns. What the agent
owns (its endpoints and their labels) is kept in memory across sessions; a new process
rebuilds it from its own records in etcd (IP leases, endpoint records, identity labels).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

from prometheus_client import CollectorRegistry
from tenacity import AsyncRetrying, retry_if_exception_type, wait_random_exponential

from controlplane.agent.api import APIError, LocalAPI
from controlplane.agent.datapath import (
    DatapathChoice,
    choose_datapath,
    close_ipcache,
    open_ipcache,
    open_policy_maps,
    unpin_ipcache,
)
from controlplane.agent.endpoint_mirror import EndpointMirror, sweep_stale
from controlplane.agent.health import Failure, Observation, RestartArm, ShardHealth
from controlplane.agent.metrics import AgentMetrics, DatapathCounters
from controlplane.agent.settings import EXIT_RESTART, AgentSettings, RestartMode
from controlplane.config import KvstoreConfig
from controlplane.datapath.ipcache import (
    FLAG_LOCAL,
    FLAG_NODE,
    Ipcache,
    IpcacheEntry,
)
from controlplane.datapath.kernel import KernelMap
from controlplane.datapath.policymap import PolicyMaps, close_policy_maps, unpin_policy_maps
from controlplane.datapath.reconciler import IpcacheReconciler, describe
from controlplane.datapath.routes import RouteManager
from controlplane.identity.allocator import IdentityAllocator
from controlplane.ipam.node_ips import CIDRExhausted, NodeIPAllocator
from controlplane.kvstore.endpoints import IPConflict, KvEndpointStore
from controlplane.kvstore.errors import KvstoreError, NoLeader, Timeout, Unreachable
from controlplane.kvstore.heartbeat import HeartbeatMonitor
from controlplane.kvstore.identities import KvIdentityStore
from controlplane.kvstore.ipam import KvCIDRStore, KvIPLeaseStore
from controlplane.kvstore.keys import KeyLayout
from controlplane.kvstore.nodes import KvNodeStore
from controlplane.kvstore.owner import Owners
from controlplane.kvstore.policies import KvPolicyStore
from controlplane.kvstore.shards import ShardMap
from controlplane.model import (
    IDENTITY_HOST,
    IDENTITY_REMOTE_NODE,
    RESERVED_IDENTITIES,
    Endpoint,
    EndpointID,
    Identity,
    IPAddress,
    IPIdentity,
    IPNetwork,
    Labels,
    ModelError,
    NetworkPolicy,
    Node,
    NodeName,
    NumericIdentity,
    parse_endpoint_id,
)
from controlplane.policy.compute import NOT_ENFORCED, EndpointPolicy, Subject, compute
from controlplane.policy.endpoint_id import EndpointIDError, check_cidr, endpoint_id
from controlplane.store_types import CIDRClaim, EventKind, StoreEvent
from controlplane.telemetry import Check, TelemetryServer

log = logging.getLogger(__name__)
T = TypeVar("T")
V = TypeVar("V")

_NODE_PRIORITY = 1
_OWN_NODE_PRIORITY = 3
"""This node's own IPs are the host, whatever another record claims (a recycled node's
stale record with the same IP, a bogus endpoint): host traffic keeps its identity."""


class AgentExit(Exception):
    """The agent stops with this exit status (``--restart-mode=exit``)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"exiting with status {status}: {reason}")
        self.status = status
        self.reason = reason


class NotReady(APIError):
    def __init__(self, why: str) -> None:
        super().__init__(503, f"agent not ready: {why}")


class _Restart(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Stopped(Exception):
    pass


@dataclass(slots=True)
class LocalEndpoint:
    """An endpoint this agent owns: what it was asked for, and what it got."""

    namespace: str
    name: str
    labels: Labels
    ip: IPAddress | None = None
    identity: Identity | None = None

    @property
    def id(self) -> EndpointID:
        return EndpointID(f"{self.namespace}/{self.name}")

    def to_json(self, node: NodeName, cidr: IPNetwork | None = None) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "name": self.name,
            "labels": self.labels.to_strings(),
            "ip": None if self.ip is None else str(self.ip),
            "identity": None if self.identity is None else int(self.identity.id),
            "node": str(node),
            "endpoint_id": self.endpoint_id(cidr),
        }

    def endpoint_id(self, cidr: IPNetwork | None) -> int | None:
        """The u32 id the tc program keys this endpoint's policy by (its IP's offset in the
        node's pod CIDR; see :mod:`controlplane.policy.endpoint_id`), None when unknown."""
        if cidr is None or self.ip is None:
            return None
        try:
            return endpoint_id(cidr, self.ip)
        except EndpointIDError:
            return None


@dataclass(slots=True)
class AgentCache:
    """The agent's view of the cluster, fed by the watches."""

    identities: dict[str, Identity]
    endpoints: dict[str, IPIdentity]
    nodes: dict[str, Node]
    policies: dict[str, NetworkPolicy] = field(default_factory=dict)


class Agent:
    """A node agent. ``await agent.run()`` until :meth:`stop` (or cancellation)."""

    def __init__(
        self,
        settings: AgentSettings,
        kvstore: KvstoreConfig,
        *,
        registry: CollectorRegistry | None = None,
        ipcache: Ipcache | None = None,
        policy_maps: PolicyMaps | None = None,
    ) -> None:
        self.settings = settings
        self.kvstore = kvstore
        self.layout = KeyLayout(kvstore.prefix)
        self.metrics = AgentMetrics.create(registry)
        if ipcache is None:
            # auto/kernel: detect, then open (or create and pin) the kernel ipcache;
            # raises DatapathUnavailable (main: one line, exit 2)
            self.datapath = choose_datapath(settings.datapath)
            self.ipcache = open_ipcache(self.datapath, settings.bpf_pin_dir)
            self._own_ipcache = True
        else:
            self._own_ipcache = False
            kernel = isinstance(ipcache.map, KernelMap)
            self.datapath = DatapathChoice(kernel, "ipcache given by the caller")
            self.ipcache = ipcache
        self.datapath_mode = self.datapath.mode
        if self.datapath.kernel:
            self.metrics.registry.register(DatapathCounters(settings.bpf_pin_dir))
        self.reconciler = IpcacheReconciler(self.ipcache)
        # cp_policy/cp_endpoints: pinned beside an ipcache this agent opened, else userspace
        self._own_policy_maps = policy_maps is None
        if policy_maps is None:
            choice = self.datapath if self._own_ipcache else DatapathChoice(False, "")
            try:
                policy_maps = open_policy_maps(choice, settings.bpf_pin_dir)
            except BaseException:
                if self._own_ipcache:
                    close_ipcache(self.ipcache)
                raise
        self.policy_maps = policy_maps
        self.policy: dict[EndpointID, EndpointPolicy] = {}
        """Each local endpoint's computed ingress policy (what the policy maps hold)."""
        self.policy_error: str | None = None
        self.policy_computes = 0
        self._policy_synced_once = False
        self._policy_wake = asyncio.Event()
        self.routes: RouteManager | None = (
            RouteManager(netns=settings.routes_netns) if settings.routes else None
        )
        """Routes to the other nodes' pod CIDRs (``--routes``), None when off."""
        self.routes_error: str | None = None
        self.routes_synced = 0
        self._nodes_synced_once = False
        self._routes_wake = asyncio.Event()
        if self.datapath.kernel:
            log.info(
                "%s: datapath: kernel maps (%s), ipcache pinned at %s",
                settings.node,
                self.datapath.reason,
                settings.bpf_pin_dir,
            )
        else:
            log.info("%s: datapath: userspace maps (%s)", settings.node, self.datapath.reason)
        # a restart on a pinned map: keep every entry, sweep only after the first sync
        self.reconciler.adopt_map()
        self.cache = AgentCache({}, {}, {})
        self.endpoints: dict[EndpointID, LocalEndpoint] = {}
        """The endpoints this agent owns (the desired state, kept across sessions)."""
        self.cidr: IPNetwork | None = None
        self.restarts = 0
        self.last_restart_reason: str | None = None
        self.last_restart_at: float | None = None
        self.started = asyncio.Event()
        """Set once the local API and the telemetry endpoint listen."""
        self.telemetry: TelemetryServer | None = None
        self.api = LocalAPI(self, settings.api_socket, count=self._count_request)
        self._arms: dict[str, RestartArm] = {}
        self.last_monitors: dict[str, HeartbeatMonitor] = {}
        self.last_health: dict[str, ShardHealth] = {}
        """The latest session's heartbeat monitors: a new session carries their evidence."""
        self._session: _Session | None = None
        self._generation = 0
        self._rebuilt = False
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._restart_now: str | None = None
        self._reported_writes: dict[str, int] = {}
        self._ready = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------------

    def stop(self) -> None:
        """Ask :meth:`run` to shut down (signal-handler safe)."""
        self._stop.set()

    def restart(self, reason: str = "requested") -> None:
        """Restart the control-plane side now (as the health check would)."""
        self._restart_now = reason
        if self._session is not None:
            self._session.kick.set()

    @property
    def ready(self) -> bool:
        """Registered, CIDR known, owned endpoints re-published in the current session."""
        return self._session is not None and self._session.ready.is_set()

    async def wait_ready(self) -> None:
        await self._ready.wait()

    async def run(self) -> None:
        """Serve until :meth:`stop`; raises :class:`AgentExit` in ``--restart-mode=exit``."""
        await self.api.start()
        try:
            if self.settings.telemetry_port is not None:
                self.telemetry = TelemetryServer(
                    self.metrics.registry,
                    self.health_checks,
                    host=self.settings.telemetry_host,
                    port=self.settings.telemetry_port,
                )
                await self.telemetry.start()
            self.started.set()
            async with asyncio.TaskGroup() as group:
                flusher = group.create_task(self.reconciler.run(), name="ipcache-flush")
                policies = group.create_task(self._policy_flusher(), name="policy-flush")
                routes = group.create_task(self._route_syncer(), name="routes")
                sessions = group.create_task(self._sessions(), name=f"agent:{self.settings.node}")
                await sessions  # returns on stop, raises AgentExit
                flusher.cancel()
                policies.cancel()
                routes.cancel()
            self.reconciler.flush()
            if self.settings.cleanup_on_exit and self.routes is not None:
                await self._flush_routes()
            if self.settings.cleanup_on_exit and self._own_policy_maps:
                unpin_policy_maps(self.policy_maps, self.settings.bpf_pin_dir)
            # The pinned map outlives the agent (forwarding goes on while it is down);
            # only --cleanup-on-exit, which withdraws the node, removes the pin.
            if (
                self.settings.cleanup_on_exit
                and self._own_ipcache
                and unpin_ipcache(self.ipcache, self.settings.bpf_pin_dir)
            ):
                log.info("%s: unpinned the kernel ipcache", self.settings.node)
        except* AgentExit as group:
            raise group.exceptions[0] from None
        finally:
            await self.api.close()
            if self.telemetry is not None:
                await self.telemetry.close()
            if self._own_ipcache:
                close_ipcache(self.ipcache)  # the pin keeps the map and its entries
            if self._own_policy_maps:
                close_policy_maps(self.policy_maps)

    async def _sessions(self) -> None:
        while not self._stop.is_set():
            self._generation += 1
            session = _Session(self, self._generation)
            self._session = session
            try:
                reason = await session.run()
            finally:
                self._session = None
                self._ready.clear()
            if reason is None:
                return
            self.restarts += 1
            self.last_restart_reason = reason
            self.last_restart_at = time.time()
            self.metrics.restarts.labels(reason).inc()
            if self.settings.restart_mode is RestartMode.EXIT:
                log.error("kvstore unhealthy (%s): exiting with status %d", reason, EXIT_RESTART)
                raise AgentExit(EXIT_RESTART, reason)
            delay = self.settings.restart_jitter()
            log.warning(
                "kvstore unhealthy (%s): restarting the control plane in %.2fs (restart %d)",
                reason,
                delay,
                self.restarts,
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):  # not wait_for: it can swallow a cancel
                    await self._stop.wait()

    def _arm(self, shard: str) -> RestartArm:
        return self._arms.setdefault(shard, RestartArm())

    # -- endpoints (the local API's service) -----------------------------------------

    async def create_endpoint(
        self, namespace: str, name: str, labels: Sequence[str]
    ) -> tuple[dict[str, Any], bool]:
        try:
            eid = parse_endpoint_id(f"{namespace}/{name}")
            wanted = Labels.from_strings(labels)
            Endpoint(  # validate names before touching the store
                ip=self.settings.node_ips[0],
                identity=IDENTITY_HOST,
                node=self.settings.node,
                host_ip=self.settings.node_ips[0],
                name=name,
                namespace=namespace,
            )
        except ModelError as exc:
            raise APIError(400, str(exc)) from None
        session = self._ready_session()
        async with self._lock:
            session = self._ready_session()
            existing = self.endpoints.get(eid)
            if existing is not None:
                if existing.labels != wanted:
                    raise APIError(
                        409, f"endpoint {eid} exists with other labels ({existing.labels})"
                    )
                return existing.to_json(self.settings.node, self.cidr), False
            local = LocalEndpoint(namespace, name, wanted)
            try:
                issued = await session.publish(local)
            except CIDRExhausted as exc:
                raise APIError(503, str(exc)) from None
            except KvstoreError as exc:
                raise APIError(503, f"kvstore: {exc}") from None
            self.endpoints[eid] = local
            self.metrics.endpoints.set(len(self.endpoints))
            self.policy_changed()
            # When the endpoint's etcd write was issued, on the host-wide monotonic clock
            # (benchmarks compare it with other agents' map write times).
            return {**local.to_json(self.settings.node, self.cidr), "write_issued_at": issued}, True

    async def delete_endpoint(self, namespace: str, name: str) -> bool:
        eid = EndpointID(f"{namespace}/{name}")
        if eid not in self.endpoints:
            return False
        async with self._lock:
            session = self._ready_session()
            local = self.endpoints.get(eid)
            if local is None:
                return False
            try:
                await session.withdraw(local)
            except KvstoreError as exc:
                raise APIError(503, f"kvstore: {exc}") from None
            del self.endpoints[eid]
            self.metrics.endpoints.set(len(self.endpoints))
            self.policy_changed()
            return True

    def list_endpoints(self) -> list[dict[str, Any]]:
        node, cidr = self.settings.node, self.cidr
        return [e.to_json(node, cidr) for _, e in sorted(self.endpoints.items())]

    # -- policy ----------------------------------------------------------------------

    def policy_changed(self) -> None:
        """An input of the policy computation changed: recompute soon (at once when idle;
        changes that arrive during a computation form the next batch)."""
        self._policy_wake.set()

    async def _policy_flusher(self) -> None:
        while True:
            await self._policy_wake.wait()
            await asyncio.sleep(0)
            self._policy_wake.clear()
            if self.flush_policy() is None:  # a map write failed: retry after a pause
                await asyncio.sleep(1.0)
                self._policy_wake.set()

    # -- routes to other nodes ------------------------------------------------------

    def routes_changed(self) -> None:
        """The node cache changed: re-sync the routes soon."""
        self._routes_wake.set()

    def desired_routes(self) -> dict[IPNetwork, IPAddress]:
        """Every other node's pod CIDRs → that node's first IP of the CIDR's family."""
        desired: dict[IPNetwork, IPAddress] = {}
        for node in self.cache.nodes.values():
            if node.name == self.settings.node:
                continue
            for cidr in node.pod_cidrs:
                gateway = next((ip for ip in node.ips if ip.version == cidr.version), None)
                if gateway is not None:
                    desired[cidr] = gateway
        return desired

    async def _route_syncer(self) -> None:
        if self.routes is None:
            return
        failures = 0
        while True:
            await self._routes_wake.wait()
            self._routes_wake.clear()
            # Not before the node list is known once: a new process would otherwise delete
            # the routes of nodes not listed yet (forwarding keeps them while it starts).
            if not self._nodes_synced_once:
                continue
            ok = await self.sync_routes()
            failures = 0 if ok else failures + 1
            if (
                failures and not self._stop.is_set()
            ):  # retry (gateway not reachable yet, netns missing, ...)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(30.0, 0.5 * 2 ** min(failures, 6))):
                        await self._stop.wait()
                self._routes_wake.set()

    async def sync_routes(self) -> bool:
        """Make the routes match the node cache now; False when something failed."""
        if self.routes is None:
            return True
        try:
            result = await self.routes.sync_async(self.desired_routes())
        except Exception as exc:  # RouteError, NetlinkError, LoaderError (setns), OSError
            error = f"{type(exc).__name__}: {exc}"
            if error != self.routes_error:
                log.error("%s: routes not programmed: %s", self.settings.node, error)
            self.routes_error = error
            return False
        self.routes_synced += 1
        if result.errors:
            self.routes_error = "; ".join(f"{k}: {v}" for k, v in sorted(
                result.errors.items(), key=lambda kv: str(kv[0])))  # fmt: skip
            return False
        self.routes_error = None
        return True

    async def _flush_routes(self) -> None:
        assert self.routes is not None
        try:
            removed = await asyncio.to_thread(self.routes.flush)
        except Exception as exc:
            log.error("%s: removing the routes failed: %s", self.settings.node, exc)
        else:
            log.info("%s: removed %d routes to other nodes", self.settings.node, removed)

    def _policy_inputs_ready(self) -> bool:
        """Every input listed once: before that (a new process on pinned maps, a first
        session) the maps keep what they hold rather than a half-known truth."""
        if not self._policy_synced_once:
            session = self._session
            self._policy_synced_once = (
                session is not None
                and session.ready.is_set()
                and {"identities", "policies"} <= session._synced
            )
        return self._policy_synced_once

    def flush_policy(self) -> bool | None:
        """Recompute every local endpoint's policy and write the differences to the maps.

        False when the inputs are not known yet (nothing written), None when a map write
        failed (the caller retries)."""
        if not self._policy_inputs_ready():
            return False
        subjects = {
            eid: Subject(local.namespace, local.labels)
            for eid, local in self.endpoints.items()
            if local.ip is not None
        }
        identities: dict[int, Labels] = {int(i): lbls for i, lbls in RESERVED_IDENTITIES.items()}
        for identity in self.cache.identities.values():
            identities[int(identity.id)] = identity.labels
        self.policy = compute(subjects, identities, self.cache.policies.values())
        self.policy_computes += 1
        desired: dict[int, tuple[bool, frozenset[tuple[int, int, int]]]] = {}
        if self.cidr is not None:
            try:
                check_cidr(self.cidr)
            except EndpointIDError as exc:
                if self.policy_error is None:
                    log.error("%s: policy not programmed: %s", self.settings.node, exc)
                self.policy_error = str(exc)
                return False
        for eid, result in self.policy.items():
            ep = self.endpoints[eid].endpoint_id(self.cidr)
            if ep is not None:
                desired[ep] = (result.enforced, result.allowed)
        if not self.policy_maps.sync(desired):
            return None
        return True

    def endpoint_policy(self, namespace: str, name: str) -> dict[str, Any]:
        """``GET /v1/policy/<namespace>/<name>``: the endpoint's computed policy and what
        the maps hold for it."""
        local = self.endpoints.get(EndpointID(f"{namespace}/{name}"))
        if local is None:
            raise APIError(404, f"no endpoint {namespace}/{name}")
        ep = local.endpoint_id(self.cidr)
        result = self.policy.get(local.id, NOT_ENFORCED)
        flags = None if ep is None else self.policy_maps.flags().get(ep)
        rows = [] if ep is None else self.policy_maps.rows(ep)
        return {
            "endpoint": str(local.id),
            "endpoint_id": ep,
            "identity": None if local.identity is None else int(local.identity.id),
            "enforced": result.enforced,
            "selected_by": list(result.selected_by),
            "allowed": [
                {"identity": i, "port": port, "proto": proto}
                for i, port, proto in sorted(result.allowed)
            ],
            "map": {
                "flags": flags,
                "entries": [
                    {"identity": r.identity, "port": r.port, "proto": r.proto, "allow": r.allow}
                    for r in rows
                ],
            },
        }

    def ipcache_entries(self) -> list[dict[str, object]]:
        return describe(self.ipcache, self.reconciler.written_at)

    def _ready_session(self) -> _Session:
        session = self._session
        if session is None:
            raise NotReady("the control plane is restarting")
        if not session.ready.is_set():
            raise NotReady(session.phase)
        return session

    # -- status ----------------------------------------------------------------------

    def shard_health(self) -> list[ShardHealth]:
        session = self._session
        return [] if session is None else list(session.health.values())

    def health_checks(self) -> Mapping[str, Check]:
        shards = self.shard_health()
        session = self._session
        if session is None:
            down = Check(False, "restarting the control plane")
            return {"etcd": down, "heartbeat": down, "agent": down}
        unreachable = [s for s in shards if s.failure is not None and s.failure.is_connection]
        stale = [s for s in shards if s.failure is Failure.HEARTBEAT_STALE]
        etcd = Check(
            not any(not s.healthy for s in unreachable),
            "; ".join(f"{s.name}: {s.reason}" for s in unreachable) or "reachable, quorum",
        )
        heartbeat = Check(
            not any(not s.healthy for s in stale),
            "; ".join(f"{s.name}: {s.reason}" for s in stale) or "fresh",
        )
        agent = Check(session.ready.is_set(), session.phase)
        return {"etcd": etcd, "heartbeat": heartbeat, "agent": agent}

    def status(self) -> dict[str, Any]:
        shards = self.shard_health()
        session = self._session
        healthy = session is not None and all(s.healthy for s in shards)
        stats = self.reconciler.stats
        return {
            "node": str(self.settings.node),
            "cluster": self.settings.cluster,
            "node_ips": [str(ip) for ip in self.settings.node_ips],
            "cidr": None if self.cidr is None else str(self.cidr),
            "ready": self.ready,
            "phase": "restarting" if session is None else session.phase,
            "endpoints": len(self.endpoints),
            "kvstore": {
                "healthy": healthy,
                "state": "healthy"
                if healthy
                else "unhealthy: " + ("restarting" if session is None else _first_reason(shards)),
                "shards": [s.to_json() for s in shards],
            },
            "restarts": {
                "count": self.restarts,
                "last_reason": self.last_restart_reason,
                "last_at": self.last_restart_at,
                "mode": self.settings.restart_mode.value,
                "generation": self._generation,
            },
            "cache": {
                "identities": len(self.cache.identities),
                "endpoints": len(self.cache.endpoints),
                "nodes": len(self.cache.nodes),
            },
            "datapath": {
                "mode": self.datapath_mode,
                "reason": self.datapath.reason,
                "pin_dir": str(self.settings.bpf_pin_dir) if self.datapath.kernel else None,
                "adopted": stats.adopted,
                "maps": {
                    self.ipcache.map.name: {
                        "entries": self.reconciler.map_entries,
                        "updates": stats.updates,
                        "deletes": stats.deletes,
                        "resyncs": stats.resyncs,
                    },
                    self.policy_maps.policy.name: {"entries": len(self.policy_maps.policy)},
                    self.policy_maps.endpoints.name: {"entries": len(self.policy_maps.endpoints)},
                },
            },
            "policy": {
                "policies": len(self.cache.policies),
                "enforced_endpoints": sum(1 for p in self.policy.values() if p.enforced),
                "computes": self.policy_computes,
                "map_updates": self.policy_maps.stats.updates,
                "map_deletes": self.policy_maps.stats.deletes,
                "error": self.policy_error,
            },
            "routes": {
                "enabled": self.routes is not None,
                "netns": self.settings.routes_netns,
                "desired": len(self.desired_routes()) if self.routes is not None else 0,
                "syncs": self.routes_synced,
                "error": self.routes_error,
            },
            "malformed_skipped": _sample_sum(
                self.metrics.registry, "cp_store_malformed_values_total"
            ),
        }

    def _count_request(self, route: str, code: int) -> None:
        self.metrics.api_requests.labels(route, str(code)).inc()

    def _update_gauges(self) -> None:
        self.metrics.endpoints.set(len(self.endpoints))
        self.metrics.cache_objects.labels("identities").set(len(self.cache.identities))
        self.metrics.cache_objects.labels("endpoints").set(len(self.cache.endpoints))
        self.metrics.cache_objects.labels("nodes").set(len(self.cache.nodes))
        self.metrics.map_entries.labels(self.ipcache.map.name).set(self.reconciler.map_entries)
        stats = self.reconciler.stats
        name = self.ipcache.map.name
        for op, total in (("update", stats.updates), ("delete", stats.deletes)):
            seen = self._reported_writes.get(op, 0)
            if total > seen:
                self.metrics.map_writes.labels(name, op).inc(total - seen)
                self._reported_writes[op] = total


class _Session:
    """One generation of connections, leases, stores, monitors and watches."""

    def __init__(self, agent: Agent, generation: int) -> None:
        self.agent = agent
        self.generation = generation
        s = agent.settings
        metrics = agent.metrics.store
        self.shards = ShardMap(agent.kvstore, own_connection=True)
        layout = agent.layout
        self.owners = Owners(metrics, ttl=s.lease_ttl)
        self.nodes = KvNodeStore(self.shards, layout, metrics, self.owners, node=s.node,
                                 cluster=s.cluster)  # fmt: skip
        self.endpoints = KvEndpointStore(
            self.shards, layout, metrics, self.owners, node=s.node, cluster=s.cluster
        )
        self.identity_store = KvIdentityStore(
            self.shards, layout, metrics, self.owners, node=s.node
        )
        self.identities = IdentityAllocator(self.identity_store)
        self.identity_store.changed.append(self._identity_changed)
        self.leases = KvIPLeaseStore(self.shards, layout, metrics, self.owners, node=s.node)
        self.cidrs = KvCIDRStore(self.shards, layout, metrics)
        self.policies = KvPolicyStore(self.shards, layout, metrics)
        self.ips: NodeIPAllocator | None = None
        self.monitors = {
            b.name: HeartbeatMonitor(
                b,
                layout,
                interval=s.heartbeat_interval,
                metrics_malformed=metrics.malformed.labels("heartbeat").inc,
                previous=agent.last_monitors.get(b.name),
            )
            for b in self.shards.all()
        }
        agent.last_monitors = dict(self.monitors)
        self.health = {
            name: ShardHealth(name, s.max_consecutive_quorum_errors, agent._arm(name)).carry(
                agent.last_health.get(name)
            )
            for name in self.monitors
        }
        agent.last_health = dict(self.health)
        self.ready = asyncio.Event()
        self.kick = asyncio.Event()
        self._republish = asyncio.Event()
        self.phase = "connecting"
        self._synced: set[str] = set()
        self._stale: dict[str, set[str]] = {}

    # -- run -------------------------------------------------------------------------

    async def run(self) -> str | None:
        """Run until the kvstore is unhealthy (returns the reason) or the agent stops
        (returns None)."""
        agent = self.agent
        agent.reconciler.begin_resync()
        self._stale = {
            "identities": set(agent.cache.identities),
            "endpoints": set(agent.cache.endpoints),
            "nodes": set(agent.cache.nodes),
            "policies": set(agent.cache.policies),
        }
        stopped = False
        reason: str | None = None
        try:
            await self.shards.connect()
            async with asyncio.TaskGroup() as group:
                tasks: dict[str, Callable[[], Awaitable[None]]] = {
                    "owners": self.owners.run,
                    "checks": self._checks,
                    "watch-identities": self._watch_identities,
                    "watch-endpoints": self._watch_endpoints,
                    "watch-nodes": self._watch_nodes,
                    "watch-policies": self._watch_policies,
                    "startup": self._startup,
                    "republish": self._republisher,
                    "stop": self._wait_stop,
                }
                for name, fn in tasks.items():
                    group.create_task(self._guard(name, fn), name=f"{agent.settings.node}:{name}")
                for name, monitor in self.monitors.items():
                    group.create_task(
                        self._guard(f"heartbeat:{name}", monitor.run), name=f"heartbeat:{name}"
                    )
        except* _Restart as group:
            exc = group.exceptions[0]
            assert isinstance(exc, _Restart)
            reason = exc.reason
        except* _Stopped:
            stopped = True
        finally:
            self.phase = "stopped"
            try:
                if stopped and agent.settings.cleanup_on_exit:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._cleanup(), 10)
            finally:
                await self.shards.close()
        return None if stopped else reason

    async def _guard(self, name: str, fn: Callable[[], Awaitable[None]]) -> None:
        try:
            await fn()
        except (_Restart, _Stopped):
            raise
        except Exception as exc:
            log.exception("%s: task %s failed", self.agent.settings.node, name)
            raise _Restart(f"task-failed:{name}") from exc
        else:
            if name != "startup":
                raise _Restart(f"task-ended:{name}")

    async def _wait_stop(self) -> None:
        stop = asyncio.create_task(self.agent._stop.wait())
        kick = asyncio.create_task(self.kick.wait())
        try:
            await asyncio.wait({stop, kick}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            kick.cancel()
        if self.agent._stop.is_set():
            raise _Stopped()
        reason = self.agent._restart_now or "requested"
        self.agent._restart_now = None
        raise _Restart(reason)

    # -- startup: register, CIDR, restore -------------------------------------------

    async def _startup(self) -> None:
        agent = self.agent
        s = agent.settings
        boot_id = _boot_id()
        if agent.cidr is None:
            # A restarted process must not publish its node without the CIDR it already
            # has: other nodes would withdraw their route to it until the claim is seen.
            agent.cidr = await _retrying(self._claimed_cidr)
        node = Node(
            name=s.node,
            ips=s.node_ips,
            pod_cidrs=(agent.cidr,) if agent.cidr is not None else (),
            boot_id=boot_id,
        )
        self.phase = "registering the node"
        await _retrying(lambda: self.nodes.register(node))
        self.phase = f"waiting for a pod CIDR from pool {s.pool!r} (the operator allocates it)"
        cidr = await self._wait_cidr()
        if agent.cidr is not None and agent.cidr != cidr:
            log.warning("%s: pod CIDR changed from %s to %s", s.node, agent.cidr, cidr)
        agent.cidr = cidr
        if node.pod_cidrs != (cidr,):
            await _retrying(
                lambda: self.nodes.register(
                    Node(name=s.node, ips=s.node_ips, pod_cidrs=(cidr,), boot_id=boot_id)
                )
            )
        self.ips = NodeIPAllocator(self.leases, cidr, s.node)
        self.phase = "restoring endpoints"
        await _retrying(self._restore)
        self.phase = "ready"
        self.ready.set()
        agent._ready.set()
        agent.policy_changed()
        log.info(
            "%s: ready (generation %d, CIDR %s, %d endpoints)",
            s.node,
            self.generation,
            cidr,
            len(agent.endpoints),
        )

    async def _claimed_cidr(self) -> IPNetwork | None:
        """The CIDR the operator already gave this node, if any."""
        node = self.agent.settings.node
        for claim in await self.cidrs.list(self.agent.settings.pool):
            if claim.value.node == node:
                return claim.value.cidr
        return None

    async def _wait_cidr(self) -> IPNetwork:
        node = self.agent.settings.node
        watch = cast(
            AsyncGenerator[StoreEvent[CIDRClaim], None], self.cidrs.watch(self.agent.settings.pool)
        )
        async with contextlib.aclosing(watch) as events:
            async for event in events:
                if event.kind is EventKind.SYNCED:
                    log.info("%s: no pod CIDR yet; waiting for the operator", node)
                elif (
                    event.kind is EventKind.UPSERT
                    and event.value is not None
                    and event.value.node == node
                ):
                    return event.value.cidr
        raise KvstoreError("the CIDR watch ended")

    async def _restore(self) -> None:
        """Re-attach leases, rebuild (new process) and re-publish what the agent owns."""
        agent = self.agent
        node = agent.settings.node
        assert self.ips is not None
        async with agent._lock:
            await self.ips.restore()
            self.identities = IdentityAllocator(self.identity_store)  # idempotent on retry
            mine = [v.value for v in await self.endpoints.list() if v.value.node == node]
            if not agent._rebuilt:
                leased = set(self.ips.leases().values())
                for record in mine:
                    eid = record.endpoint_id
                    if eid in agent.endpoints or eid not in leased:
                        continue
                    found = await self.identity_store.get(record.identity)
                    if found is None:
                        log.warning("%s: identity %d of %s is gone", node, record.identity, eid)
                        continue
                    agent.endpoints[eid] = LocalEndpoint(
                        record.namespace, record.name, found.value.labels, record.ip
                    )
                agent._rebuilt = True
                log.info("%s: rebuilt %d endpoints from the store", node, len(agent.endpoints))
            for _, local in sorted(agent.endpoints.items()):
                try:
                    await self.publish(local)
                except IPConflict as exc:  # another node publishes the IP: keep going
                    log.error("%s: endpoint %s not re-published: %s", node, local.id, exc)
            for ip, owner in self.ips.leases().items():
                held = agent.endpoints.get(owner)
                if held is None or held.ip != ip:
                    await self.ips.release(ip)
            for record in mine:
                held = agent.endpoints.get(record.endpoint_id)
                if held is None or held.ip != record.ip:
                    await self.endpoints.remove(record.ip)
            agent.metrics.endpoints.set(len(agent.endpoints))
            agent.policy_changed()

    async def publish(self, local: LocalEndpoint) -> float:
        """Lease the IP, take the identity reference, publish the record (idempotent).

        Returns when the endpoint's write to etcd was issued (host-wide monotonic clock).
        """
        assert self.ips is not None
        s = self.agent.settings
        ip = await self.ips.allocate(local.id)
        try:
            identity = await self.identities.acquire(local.labels)
        except Exception:
            if local.ip is None:
                with contextlib.suppress(KvstoreError):
                    await self.ips.release(ip)
            raise
        if local.ip is not None and local.ip != ip:
            log.warning("%s: endpoint %s moved from %s to %s", s.node, local.id, local.ip, ip)
        endpoint = Endpoint(
            ip=ip,
            identity=identity.id,
            node=s.node,
            host_ip=s.node_ips[0],
            name=local.name,
            namespace=local.namespace,
        )
        issued = time.monotonic()
        try:
            await self.endpoints.upsert(endpoint)
        except Exception:
            if local.ip is None:
                with contextlib.suppress(KvstoreError):
                    await self.identities.release(local.labels)
                    await self.ips.release(ip)
            raise
        local.ip = ip
        local.identity = identity
        return issued

    async def withdraw(self, local: LocalEndpoint) -> None:
        assert self.ips is not None
        if local.ip is not None:
            await self.endpoints.remove(local.ip)
            await self.ips.release(local.ip)
        await self.identities.release(local.labels)

    def _identity_changed(self, old: Identity, new: Identity) -> None:
        self.identities.identity_changed(old, new)
        for local in self.agent.endpoints.values():
            if local.identity == old:
                local.identity = new
        self._republish.set()  # re-publish the endpoints with their new identity

    async def _republisher(self) -> None:
        await self.ready.wait()
        while True:
            await self._republish.wait()
            self._republish.clear()
            await _retrying(self._restore)

    async def _cleanup(self) -> None:
        """--cleanup-on-exit: withdraw everything and revoke the leases."""
        agent = self.agent
        if self.ips is not None:
            for local in list(agent.endpoints.values()):
                with contextlib.suppress(KvstoreError):
                    await self.withdraw(local)
        with contextlib.suppress(KvstoreError):
            await self.nodes.deregister()
        for owner in self.owners.all():
            await owner.leases.revoke_all()

    # -- watches -> cache -> ipcache -------------------------------------------------

    async def _watch_identities(self) -> None:
        await self._watch_into(
            "identities", self.identity_store.watch(), self.agent.cache.identities
        )

    async def _watch_policies(self) -> None:
        await self._watch_into("policies", self.policies.watch(), self.agent.cache.policies)

    async def _watch_into(
        self, stream: str, events: AsyncIterator[StoreEvent[V]], cache: dict[str, V]
    ) -> None:
        """Mirror a store watch into a cache; every change may change the policy."""
        async for event in events:
            self.agent.policy_changed()
            if event.kind is EventKind.SYNCED:
                self._sweep(stream, cache)
                self._synced_stream(stream)
                continue
            self._stale[stream].discard(event.name)
            if event.kind is EventKind.UPSERT and event.value is not None:
                cache[event.name] = event.value
            else:
                cache.pop(event.name, None)

    async def _watch_endpoints(self) -> None:
        agent = self.agent
        mirror = EndpointMirror(
            agent.cache.endpoints, self._stale["endpoints"], agent.reconciler, agent.settings.node
        )
        async for batch in self.endpoints.watch_ip_identities():
            if mirror.apply(batch):
                self._synced_stream("endpoints")

    async def _watch_nodes(self) -> None:
        agent = self.agent
        async for event in self.nodes.watch():
            node = self._mirror("nodes", "node", agent.cache.nodes, event)
            if event.kind is EventKind.SYNCED:
                agent._nodes_synced_once = True
            elif node is not None:
                me = agent.settings.node
                agent.reconciler.set(
                    f"node:{event.name}",
                    _node_entries(node, me),
                    priority=_OWN_NODE_PRIORITY if event.name == me else _NODE_PRIORITY,
                )
            agent.routes_changed()  # after every (re)sync too: the swept nodes' routes go

    def _mirror(
        self, stream: str, source: str, cache: dict[str, V], event: StoreEvent[V]
    ) -> V | None:
        """Mirror an event of ``stream`` into ``cache`` and the resync bookkeeping; the
        ipcache entries of removed or swept objects (sources ``<source>:<name>``) go too.
        Returns the upserted object, whose entries the caller sets; else None."""
        if event.kind is EventKind.SYNCED:
            for name in self._sweep(stream, cache):
                self.agent.reconciler.remove(f"{source}:{name}")
            self._synced_stream(stream)
            return None
        self._stale[stream].discard(event.name)
        if event.kind is EventKind.UPSERT and event.value is not None:
            cache[event.name] = event.value
            return event.value
        cache.pop(event.name, None)
        self.agent.reconciler.remove(f"{source}:{event.name}")
        return None

    def _sweep(self, resource: str, cache: dict[str, Any]) -> set[str]:
        return sweep_stale(cache, self._stale.setdefault(resource, set()))

    def _synced_stream(self, stream: str) -> None:
        self._synced.add(stream)
        if {"endpoints", "nodes"} <= self._synced and self.agent.reconciler.resyncing:
            self.agent.reconciler.end_resync()

    # -- status checks ---------------------------------------------------------------

    async def _checks(self) -> None:
        interval = self.agent.settings.status_check_interval
        while True:
            await asyncio.sleep(interval)
            failures = await asyncio.gather(*(self._check(name) for name in self.health))
            self.agent._update_gauges()
            for name, failure in zip(self.health, failures, strict=True):
                if failure is not None:
                    log.warning(
                        "%s: kvstore shard %s unhealthy: %s",
                        self.agent.settings.node,
                        name,
                        self.health[name].reason,
                    )
                    raise _Restart(failure.value)

    async def _check(self, name: str) -> Failure | None:
        s = self.agent.settings
        backend = self.shards.backends[name]
        monitor = self.monitors[name]
        quorum: Failure | None = None
        detail = ""
        try:
            async with asyncio.timeout(s.quorum_check_timeout):
                await backend.current_revision()
        except TimeoutError:
            quorum, detail = Failure.NO_QUORUM, f"quorum read timed out ({s.quorum_check_timeout}s)"
        except (NoLeader, Timeout) as exc:
            quorum, detail = Failure.NO_QUORUM, str(exc)
        except (Unreachable, KvstoreError) as exc:
            quorum, detail = Failure.UNREACHABLE, str(exc)
        beat = monitor.last
        obs = Observation(
            quorum_error=quorum,
            error_detail=detail,
            heartbeat_age=monitor.age(),
            heartbeat_threshold=monitor.threshold,
            heartbeat_stale=monitor.stale(),
            beat=None if beat is None else (beat.writer, beat.seq),
        )
        health = self.health[name]
        failure = health.record(obs)
        m = self.agent.metrics
        m.heartbeat_age.labels(name).set(obs.heartbeat_age)
        m.kvstore_healthy.labels(name).set(1 if health.healthy else 0)
        m.kvstore_errors.labels(name).set(health.consecutive_errors)
        return failure


def _node_entries(node: Node, me: NodeName) -> dict[IPNetwork, IpcacheEntry]:
    own = node.name == me
    ident = NumericIdentity(IDENTITY_HOST if own else IDENTITY_REMOTE_NODE)
    flags = FLAG_NODE | (FLAG_LOCAL if own else 0)
    out: dict[IPNetwork, IpcacheEntry] = {}
    for ip in node.ips:
        out[ipaddress.ip_network((ip, ip.max_prefixlen))] = IpcacheEntry(ident, ip, flags)
    return out


async def _retrying(call: Callable[[], Awaitable[T]]) -> T:
    """Repeat ``call`` on kvstore errors (backoff with jitter) until it succeeds; the status
    checks restart the session if the kvstore stays broken."""
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type(KvstoreError),
        wait=wait_random_exponential(multiplier=0.1, max=2.0),
        reraise=True,
    ):
        with attempt:
            return await call()
    raise AssertionError("unreachable")


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:128]
    except OSError:
        return ""


def _first_reason(shards: list[ShardHealth]) -> str:
    return next((f"{s.name}: {s.reason}" for s in shards if not s.healthy), "unknown")


def _sample_sum(registry: CollectorRegistry, name: str) -> float:
    total = 0.0
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name == name:
                total += sample.value
    return total
