"""The agent: one node's control plane, from its store to its datapath.

One :class:`Agent` per node; several can run in one process (each with its own
connections, cache, maps and metrics). It wires the parts, each in a module of its own:

- the datapath: the ipcache and policy maps (kernel or userspace, :mod:`.datapath`) and
  the ipcache reconciler;
- what the node owns: its endpoints and pod CIDR (:mod:`.endpoints`), kept in memory
  across sessions; a new process rebuilds them from its own records in the store;
- the control-plane side, in generations (:mod:`.session`): one :class:`Session` at a
  time over a store session (:mod:`.store_session`; kvstore mode in
  :mod:`.kvstore_session`), with the watches into the cache and the ipcache
  (:mod:`.watches`);
- policy (:mod:`.policy`), service load balancing (:mod:`.services`) and routes to other
  nodes (:mod:`.routes`), following the cache;
- the local API (:mod:`.api`), metrics and health.

When the store turns unhealthy (see :mod:`controlplane.agent.health`) the session is torn
down and, after a per-node jittered delay, a new one reconnects, re-lists, reconciles the
maps by mark-and-sweep (never flushing them) and re-publishes what the agent owns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry

from controlplane.agent.api import LocalAPI
from controlplane.agent.cni_runner import CNIRunner
from controlplane.agent.datapath import (
    DatapathChoice,
    SockLbState,
    choose_datapath,
    close_ipcache,
    open_ipcache,
    open_lb_maps,
    open_policy_maps,
    start_sock_lb,
    unpin_ipcache,
)
from controlplane.agent.endpoints import EndpointPublisher, NotReady, OwnedEndpoints
from controlplane.agent.flows import AgentFlows
from controlplane.agent.health import Failure, ShardHealth
from controlplane.agent.metrics import AgentMetrics, DatapathCounters
from controlplane.agent.policy import PolicyFlusher
from controlplane.agent.routes import RouteSyncer
from controlplane.agent.services import ServiceCounters, ServiceFlusher
from controlplane.agent.session import Session
from controlplane.agent.settings import EXIT_RESTART, AgentSettings, RestartMode
from controlplane.agent.stores import StoreConfig, store_connector
from controlplane.agent.watches import AgentCache
from controlplane.datapath.ipcache import Ipcache
from controlplane.datapath.kernel import KernelMap
from controlplane.datapath.lbmap import LbMaps, close_lb_maps, unpin_lb_maps
from controlplane.datapath.policymap import PolicyMaps, close_policy_maps, unpin_policy_maps
from controlplane.datapath.reconciler import IpcacheReconciler, describe
from controlplane.datapath.routes import RouteManager
from controlplane.datapath.sock_lb import detach_sock_lb
from controlplane.datapath.sysctls import apply as apply_sysctls
from controlplane.datapath.sysctls import summary as sysctl_summary
from controlplane.datapath.sysctls import wanted as wanted_sysctls
from controlplane.datapath.sysctls import warning as sysctl_warning
from controlplane.model import IPNetwork
from controlplane.telemetry import Check, TelemetryServer

log = logging.getLogger(__name__)

__all__ = ["Agent", "AgentExit", "NotReady"]


class AgentExit(Exception):
    """The agent stops with this exit status (``--restart-mode=exit``)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"exiting with status {status}: {reason}")
        self.status = status
        self.reason = reason


class Agent:
    """A node agent. ``await agent.run()`` until :meth:`stop` (or cancellation)."""

    def __init__(
        self,
        settings: AgentSettings,
        store: StoreConfig,
        *,
        registry: CollectorRegistry | None = None,
        ipcache: Ipcache | None = None,
        policy_maps: PolicyMaps | None = None,
        lb_maps: LbMaps | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = AgentMetrics.create(registry)
        self.store = store_connector(store, settings, self.metrics)
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
        # cp_lb_*: the service maps, owned like the policy maps; the socket LB programs
        # on --lb-cgroup (kernel mode)
        self._own_lb_maps = lb_maps is None
        if lb_maps is None:
            choice = self.datapath if self._own_ipcache else DatapathChoice(False, "")
            try:
                lb_maps = open_lb_maps(choice, settings.bpf_pin_dir)
            except BaseException:
                if self._own_ipcache:
                    close_ipcache(self.ipcache)
                if self._own_policy_maps:
                    close_policy_maps(policy_maps)
                raise
            self.sock_lb = start_sock_lb(choice, settings.bpf_pin_dir, settings.lb_cgroup)
            if choice.kernel and settings.lb_cgroup is not None and not self.sock_lb.attached:
                log.error("%s: services not balanced: %s", settings.node, self.sock_lb.detail)
            elif self.sock_lb.attached:
                log.info("%s: socket load balancer: %s", settings.node, self.sock_lb.detail)
            elif choice.kernel and settings.lb_cgroup is None:
                log.info("%s: service maps kept, not balanced: no --lb-cgroup", settings.node)
        else:
            self.sock_lb = SockLbState(False, "load-balancer maps given by the caller")
        self.lb_maps = lb_maps
        if self.datapath.kernel:
            log.info(
                "%s: datapath: kernel maps (%s), ipcache pinned at %s",
                settings.node,
                self.datapath.reason,
                settings.bpf_pin_dir,
            )
        else:
            log.info("%s: datapath: userspace maps (%s)", settings.node, self.datapath.reason)
        # forwarding (IPv4; IPv6 too on a node with an IPv6 address): checked (set with
        # --set-sysctls) once; a wrong value is one warning
        self.sysctls = apply_sysctls(
            set_values=settings.set_sysctls,
            root=settings.sysctl_root,
            wants=wanted_sysctls(ipv6=any(ip.version == 6 for ip in settings.node_ips)),
        )
        if (wrong := sysctl_warning(self.sysctls)) is not None:
            log.warning("%s: %s", settings.node, wrong)
        # a restart on a pinned map: keep every entry, sweep only after the first sync
        self.reconciler.adopt_map()
        self.cache = AgentCache()
        self.owned = OwnedEndpoints(settings.node, settings.node_ips[0], self._owned_changed)
        """The endpoints this agent owns (the desired state, kept across sessions)."""
        self.policy = PolicyFlusher(
            self.owned,
            self.cache.identities,
            self.cache.policies,
            self.policy_maps,
            lambda: (
                self._session is not None and self._session.inputs_listed("identities", "policies")
            ),
        )
        self.services = ServiceFlusher(
            self.cache.services,
            self.lb_maps,
            lambda: self._session is not None and self._session.inputs_listed("services"),
        )
        if self.lb_maps.metrics is not None:
            self.metrics.registry.register(ServiceCounters(self.services))
        self.routes = RouteSyncer(
            settings.node,
            self.cache.nodes,
            RouteManager(netns=settings.routes_netns) if settings.routes else None,
            netns=settings.routes_netns,
        )
        """Routes to the other nodes' pod CIDRs (``--routes``)."""
        self.flows: AgentFlows | None = None
        """The flow server (``--flows``): kernel flow events when this agent drives the
        kernel maps, else an empty ring."""
        if settings.flows_enabled:
            self.flows = AgentFlows(
                settings.node,
                self.cache,
                settings.flows,
                self.metrics.registry,
                kernel=self.datapath.kernel and self._own_ipcache,
                pin_dir=settings.bpf_pin_dir,
            )
        self.restarts = 0
        self.last_restart_reason: str | None = None
        self.last_restart_at: float | None = None
        self.started = asyncio.Event()
        """Set once the local API and the telemetry endpoint listen."""
        self.stopping = asyncio.Event()
        self.telemetry: TelemetryServer | None = None
        self.cni = CNIRunner(
            netns=settings.cni_netns,
            timeout=settings.cni_timeout,
            concurrency=settings.cni_concurrency,
            count=self._count_cni,
        )
        """Runs the CNI plugin for the node's ``cp-cni`` launcher (``POST /v1/cni``)."""
        self.api = LocalAPI(self, settings.api_socket, count=self._count_request, cni=self.cni)
        self._session: Session | None = None
        self._generation = 0
        self._ready = asyncio.Event()
        self._reported_writes: dict[str, int] = {}

    # -- what other code reads -------------------------------------------------------

    @property
    def cidr(self) -> IPNetwork | None:
        return self.owned.cidr

    @property
    def policy_computes(self) -> int:
        return self.policy.computes

    @property
    def routes_synced(self) -> int:
        return self.routes.synced

    # -- lifecycle -------------------------------------------------------------------

    def stop(self) -> None:
        """Ask :meth:`run` to shut down (signal-handler safe)."""
        self.stopping.set()

    def restart(self, reason: str = "requested") -> None:
        """Restart the control-plane side now (as the health check would)."""
        if self._session is not None:
            self._session.request_restart(reason)

    @property
    def ready(self) -> bool:
        """Registered, CIDR known, owned endpoints re-published in the current session."""
        return self._session is not None and self._session.ready.is_set()

    async def wait_ready(self) -> None:
        await self._ready.wait()

    def session_ready(self) -> None:
        self._ready.set()

    async def run(self) -> None:
        """Serve until :meth:`stop`; raises :class:`AgentExit` in ``--restart-mode=exit``."""
        await self.api.start()
        try:
            if self.flows is not None:
                await self.flows.start(
                    self.settings.flows_socket, self.settings.flows_listen, self.settings.flows_tls
                )
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
                helpers = [
                    group.create_task(self.reconciler.run(), name="ipcache-flush"),
                    group.create_task(self.policy.run(), name="policy-flush"),
                    group.create_task(self.services.run(), name="services-flush"),
                    group.create_task(self.routes.run(self.stopping), name="routes"),
                    group.create_task(self._gauges(), name="gauges"),
                ]
                if self.flows is not None:
                    helpers.append(group.create_task(self.flows.server.run(), name="flows"))
                sessions = group.create_task(self._sessions(), name=f"agent:{self.settings.node}")
                await sessions  # returns on stop, raises AgentExit
                for task in helpers:
                    task.cancel()
            self.reconciler.flush()
            if self.settings.cleanup_on_exit:
                await self._clean_up_node()
        except* AgentExit as group:
            raise group.exceptions[0] from None
        finally:
            await self.api.close()
            if self.flows is not None:
                await self.flows.close()
            if self.telemetry is not None:
                await self.telemetry.close()
            if self._own_ipcache:
                close_ipcache(self.ipcache)  # the pin keeps the map and its entries
            if self._own_policy_maps:
                close_policy_maps(self.policy_maps)
            if self._own_lb_maps:
                close_lb_maps(self.lb_maps)

    async def _clean_up_node(self) -> None:
        """``--cleanup-on-exit`` (the node is withdrawn): routes, then the pinned maps,
        which otherwise outlive the agent so that forwarding goes on while it is down."""
        await self.routes.remove_all()
        if self._own_policy_maps:
            unpin_policy_maps(self.policy_maps, self.settings.bpf_pin_dir)
        if self._own_lb_maps and self.datapath.kernel:
            detach_sock_lb(self.settings.bpf_pin_dir)  # the programs go with their links
            unpin_lb_maps(self.settings.bpf_pin_dir)
        if self._own_ipcache and unpin_ipcache(self.ipcache, self.settings.bpf_pin_dir):
            log.info("%s: unpinned the kernel maps", self.settings.node)

    async def _sessions(self) -> None:
        while not self.stopping.is_set():
            self._generation += 1
            session = Session(self, self.store.open(self._generation), self._generation)
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
                    await self.stopping.wait()

    # -- the local API's service ----------------------------------------------------

    def _ready_publisher(self) -> EndpointPublisher:
        session = self._session
        if session is None:
            raise NotReady("the control plane is restarting")
        if not session.ready.is_set():
            raise NotReady(session.phase)
        return session.publisher

    def _owned_changed(self) -> None:
        self.metrics.endpoints.set(len(self.owned.items))
        self.policy.changed()

    async def create_endpoint(
        self, namespace: str, name: str, labels: Sequence[str]
    ) -> tuple[dict[str, Any], bool]:
        return await self.owned.create(namespace, name, labels, self._ready_publisher)

    async def delete_endpoint(self, namespace: str, name: str) -> bool:
        return await self.owned.delete(namespace, name, self._ready_publisher)

    def list_endpoints(self) -> list[dict[str, Any]]:
        return self.owned.to_json()

    def endpoint_policy(self, namespace: str, name: str) -> dict[str, Any]:
        return self.policy.endpoint_policy(namespace, name)

    def ipcache_entries(self) -> list[dict[str, object]]:
        return describe(self.ipcache, self.reconciler.written_at)

    # -- status, health, metrics ----------------------------------------------------

    def shard_health(self) -> list[ShardHealth]:
        session = self._session
        return [] if session is None else session.store.health()

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

    def flows_address(self) -> str:
        """Where a relay reaches this node's Observer API: ``--flows-listen``'s address with
        the port it got, the node's first IP when it listens on every address; "" when
        it serves none over TCP."""
        if self.flows is None or self.flows.api.port is None or self.settings.flows_listen is None:
            return ""
        host = self.settings.flows_listen.rpartition(":")[0].strip("[]")
        if host in ("", "0.0.0.0", "::"):
            host = str(self.settings.node_ips[0])
        return f"[{host}]:{self.flows.api.port}" if ":" in host else f"{host}:{self.flows.api.port}"

    def _flows_status(self) -> dict[str, Any] | None:
        if self.flows is None:
            return None
        s = self.flows.server.status()
        return {
            "source": s.source,
            "error": self.flows.error,
            "flows": s.num_flows,
            "capacity": s.max_flows,
            "seen": s.seen_flows,
            "lost_ring_buffer": s.lost_ring_buffer,
            "lost_rate_limit": s.lost_rate_limit,
            "aggregation": self.settings.flows.aggregation.name.lower(),
            "socket": None if self.flows.api.socket is None else str(self.flows.api.socket),
            "port": self.flows.api.port,
        }

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
            "endpoints": len(self.owned.items),
            # the store's mode and health ("kvstore" keeps its name for the kvstore mode's
            # users and scripts; in CRD mode its one part is the "apiserver")
            "store": {
                "mode": self.store.describe.split(":", 1)[0],
                "describe": self.store.describe,
            },
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
                "services": len(self.cache.services),
            },
            "flows": self._flows_status(),
            "datapath": {
                "mode": self.datapath_mode,
                "reason": self.datapath.reason,
                "pin_dir": str(self.settings.bpf_pin_dir) if self.datapath.kernel else None,
                "adopted": stats.adopted,
                "sysctls": sysctl_summary(self.sysctls, self.settings.sysctl_root),
                "maps": {
                    self.ipcache.map.name: {
                        "entries": self.reconciler.map_entries,
                        "updates": stats.updates,
                        "deletes": stats.deletes,
                        "resyncs": stats.resyncs,
                    },
                    self.policy_maps.policy.name: {"entries": len(self.policy_maps.policy)},
                    self.policy_maps.endpoints.name: {"entries": len(self.policy_maps.endpoints)},
                    self.lb_maps.services.name: {"entries": len(self.lb_maps.services)},
                    self.lb_maps.slots.name: {"entries": len(self.lb_maps.slots)},
                },
                "socket_lb": {"attached": self.sock_lb.attached, "detail": self.sock_lb.detail},
            },
            "policy": self.policy.status(),
            "services": self.services.status(),
            "routes": self.routes.status(),
            "malformed_skipped": _sample_sum(
                self.metrics.registry, "cp_store_malformed_values_total"
            ),
        }

    def _count_request(self, route: str, code: int) -> None:
        self.metrics.api_requests.labels(route, str(code)).inc()

    def _count_cni(self, command: str, result: str) -> None:
        self.metrics.cni_requests.labels(command, result).inc()

    async def _gauges(self) -> None:
        while True:
            await asyncio.sleep(self.settings.status_check_interval)
            self._update_gauges()

    def _update_gauges(self) -> None:
        self.metrics.endpoints.set(len(self.owned.items))
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


def _first_reason(shards: list[ShardHealth]) -> str:
    return next((f"{s.name}: {s.reason}" for s in shards if not s.healthy), "unknown")


def _sample_sum(registry: CollectorRegistry, name: str) -> float:
    total = 0.0
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name == name:
                total += sample.value
    return total
