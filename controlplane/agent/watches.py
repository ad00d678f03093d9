"""The agent's view of the cluster: one session's watches into its cache and the ipcache.

Each session lists and watches identities, endpoints, nodes, policies and services from
its stores.
Events go into the :class:`AgentCache` (which outlives sessions) and, for endpoints and
nodes, into the ipcache reconciler. A session starts a resync: the names cached before it
are stale until its lists deliver them again, and those that do not come back are swept
at the list's end (from the cache and the ipcache), never by flushing. The ipcache's
resync ends once endpoints and nodes are both listed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from controlplane.agent.endpoint_mirror import EndpointMirror, sweep_stale
from controlplane.agent.routes import RouteSyncer
from controlplane.agent.store_session import Stores
from controlplane.datapath.ipcache import FLAG_LOCAL, FLAG_NODE, IpcacheEntry
from controlplane.datapath.reconciler import IpcacheReconciler
from controlplane.model import (
    IDENTITY_HOST,
    IDENTITY_REMOTE_NODE,
    Identity,
    IPIdentity,
    IPNetwork,
    NetworkPolicy,
    Node,
    NodeName,
    NumericIdentity,
    Service,
)
from controlplane.store_types import EventKind, StoreEvent

V = TypeVar("V")

NODE_PRIORITY = 1
OWN_NODE_PRIORITY = 3
"""This node's own IPs are the host, whatever another record claims (a recycled node's
stale record with the same IP, a bogus endpoint): host traffic keeps its identity."""


@dataclass(slots=True)
class AgentCache:
    """The agent's view of the cluster, fed by the watches."""

    identities: dict[str, Identity] = field(default_factory=dict)
    endpoints: dict[str, IPIdentity] = field(default_factory=dict)
    nodes: dict[str, Node] = field(default_factory=dict)
    policies: dict[str, NetworkPolicy] = field(default_factory=dict)
    services: dict[str, Service] = field(default_factory=dict)


class CacheWatches:
    """One session's watches: store events into the cache and the ipcache reconciler."""

    def __init__(
        self,
        cache: AgentCache,
        reconciler: IpcacheReconciler,
        stores: Stores,
        node: NodeName,
        *,
        policy_changed: Callable[[], None],
        services_changed: Callable[[str | None], None],
        routes: RouteSyncer,
    ) -> None:
        self.cache = cache
        self.reconciler = reconciler
        self.stores = stores
        self.node = node
        self.policy_changed = policy_changed
        self.services_changed = services_changed
        self.routes = routes
        self.synced: set[str] = set()
        """The streams listed in this session."""
        reconciler.begin_resync()
        self._stale: dict[str, set[str]] = {
            "identities": set(cache.identities),
            "endpoints": set(cache.endpoints),
            "nodes": set(cache.nodes),
            "policies": set(cache.policies),
            "services": set(cache.services),
        }

    def tasks(self) -> dict[str, Callable[[], Awaitable[None]]]:
        tasks: dict[str, Callable[[], Awaitable[None]]] = {
            "watch-identities": self._watch_identities,
            "watch-endpoints": self._watch_endpoints,
            "watch-nodes": self._watch_nodes,
            "watch-policies": self._watch_policies,
        }
        if self.stores.services is not None:
            tasks["watch-services"] = self._watch_services
        else:  # no service source in this mode: listed, and empty
            self._sweep("services", self.cache.services)
            self._synced_stream("services")
            self.services_changed(None)
        return tasks

    async def _watch_identities(self) -> None:
        await self._watch_into("identities", self.stores.identities.watch(), self.cache.identities)

    async def _watch_policies(self) -> None:
        await self._watch_into("policies", self.stores.policies.watch(), self.cache.policies)

    async def _watch_services(self) -> None:
        assert self.stores.services is not None
        await self._watch_into(
            "services", self.stores.services.watch(), self.cache.services, self.services_changed
        )

    async def _watch_into(
        self,
        stream: str,
        events: AsyncIterator[StoreEvent[V]],
        cache: dict[str, V],
        changed: Callable[[str | None], None] | None = None,
    ) -> None:
        """Mirror a store watch into a cache. Every event calls ``changed`` with the
        object's name (None for the list's end, after the sweep); without it, every event
        may change the policy."""
        async for event in events:
            if changed is None:
                self.policy_changed()
            if event.kind is EventKind.SYNCED:
                self._sweep(stream, cache)
                self._synced_stream(stream)
                if changed is not None:
                    changed(None)
                continue
            self._stale[stream].discard(event.name)
            if event.kind is EventKind.UPSERT and event.value is not None:
                cache[event.name] = event.value
            else:
                cache.pop(event.name, None)
            if changed is not None:
                changed(event.name)

    async def _watch_endpoints(self) -> None:
        mirror = EndpointMirror(
            self.cache.endpoints, self._stale["endpoints"], self.reconciler, self.node
        )
        async for batch in self.stores.endpoints.watch_ip_identities():
            if mirror.apply(batch):
                self._synced_stream("endpoints")

    async def _watch_nodes(self) -> None:
        async for event in self.stores.nodes.watch():
            node = self._mirror("nodes", "node", self.cache.nodes, event)
            if event.kind is EventKind.SYNCED:
                self.routes.nodes_listed = True
            elif node is not None:
                self.reconciler.set(
                    f"node:{event.name}",
                    node_entries(node, self.node),
                    priority=OWN_NODE_PRIORITY if event.name == self.node else NODE_PRIORITY,
                )
            self.routes.changed()  # after every (re)sync too: the swept nodes' routes go

    def _mirror(
        self, stream: str, source: str, cache: dict[str, V], event: StoreEvent[V]
    ) -> V | None:
        """Mirror an event of ``stream`` into ``cache`` and the resync bookkeeping; the
        ipcache entries of removed or swept objects (sources ``<source>:<name>``) go too.
        Returns the upserted object, whose entries the caller sets; else None."""
        if event.kind is EventKind.SYNCED:
            for name in self._sweep(stream, cache):
                self.reconciler.remove(f"{source}:{name}")
            self._synced_stream(stream)
            return None
        self._stale[stream].discard(event.name)
        if event.kind is EventKind.UPSERT and event.value is not None:
            cache[event.name] = event.value
            return event.value
        cache.pop(event.name, None)
        self.reconciler.remove(f"{source}:{event.name}")
        return None

    def _sweep(self, resource: str, cache: dict[str, Any]) -> set[str]:
        return sweep_stale(cache, self._stale.setdefault(resource, set()))

    def _synced_stream(self, stream: str) -> None:
        self.synced.add(stream)
        if {"endpoints", "nodes"} <= self.synced and self.reconciler.resyncing:
            self.reconciler.end_resync()


def node_entries(node: Node, me: NodeName) -> dict[IPNetwork, IpcacheEntry]:
    """A node's ipcache entries: its IPs as the host (our own) or as a remote node."""
    own = node.name == me
    ident = NumericIdentity(IDENTITY_HOST if own else IDENTITY_REMOTE_NODE)
    flags = FLAG_NODE | (FLAG_LOCAL if own else 0)
    out: dict[IPNetwork, IpcacheEntry] = {}
    for ip in node.ips:
        out[ipaddress.ip_network((ip, ip.max_prefixlen))] = IpcacheEntry(ident, ip, flags)
    return out
