"""The agent's flow server (issue 14): its flow maps, the resolver over the agent's cache,
and the Observer API's listeners.

The resolver names an address from what the watches keep: an endpoint (pod, namespace,
identity and that identity's labels) by its IP, else a node's IP (``reserved:host`` for
ours, ``reserved:remote-node`` for the others), else nothing (the converter then says
``reserved:world``, as the datapath decides for an address the ipcache does not know).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry

from controlplane.agent.watches import AgentCache
from controlplane.datapath.bpf_syscall import KernelMapError
from controlplane.datapath.flowevents import FlowMaps, pinned_flow_maps
from controlplane.flows.convert import PeerInfo
from controlplane.flows.observer import ObserverServer
from controlplane.flows.server import FlowServer, FlowSettings
from controlplane.model import (
    IDENTITY_HOST,
    IDENTITY_REMOTE_NODE,
    RESERVED_IDENTITIES,
    NodeName,
    NumericIdentity,
)

__all__ = ["AgentFlows", "CacheResolver"]

log = logging.getLogger(__name__)

_NODE_INDEX_TTL = 1.0
"""Seconds a node-IP index is used before it is rebuilt from the cache."""


class CacheResolver:
    def __init__(self, cache: AgentCache, node: NodeName) -> None:
        self.cache = cache
        self.node = node
        self._nodes: dict[str, PeerInfo] = {}
        self._nodes_at = -_NODE_INDEX_TTL

    def labels(self, identity: int) -> tuple[str, ...]:
        reserved = RESERVED_IDENTITIES.get(NumericIdentity(identity))
        if reserved is not None:
            return tuple(reserved.to_strings())
        found = self.cache.identities.get(str(identity))
        return tuple(found.labels.to_strings()) if found is not None else ()

    def peer(self, address: str) -> PeerInfo | None:
        ep = self.cache.endpoints.get(address)
        if ep is not None:
            ident = int(ep.identity)
            return PeerInfo(ident, self.labels(ident), ep.namespace, ep.name)
        now = time.monotonic()
        if now - self._nodes_at > _NODE_INDEX_TTL:
            self._nodes = self._node_index()
            self._nodes_at = now
        return self._nodes.get(address)

    def _node_index(self) -> dict[str, PeerInfo]:
        index: dict[str, PeerInfo] = {}
        for node in self.cache.nodes.values():
            ident = IDENTITY_HOST if node.name == self.node else IDENTITY_REMOTE_NODE
            info = PeerInfo(int(ident), self.labels(ident))
            for ip in node.ips:
                index[str(ip)] = info
        return index


class AgentFlows:
    """The flow server of one agent and its listeners; ``maps`` None without kernel maps."""

    def __init__(
        self,
        node: NodeName,
        cache: AgentCache,
        settings: FlowSettings,
        registry: CollectorRegistry,
        *,
        kernel: bool,
        pin_dir: Path,
    ) -> None:
        self.maps: FlowMaps | None = None
        self.error: str | None = None
        if kernel:
            try:
                self.maps = pinned_flow_maps(pin_dir)
            except (KernelMapError, OSError) as exc:
                self.error = f"flow maps under {pin_dir}: {exc}"
                log.warning("%s: flow events off: %s", node, self.error)
        self.server = FlowServer(node, settings, CacheResolver(cache, node), registry, self.maps)
        self.api = ObserverServer(self.server)

    async def start(
        self, socket: Path | None, listen: str | None, tls: tuple[Path, Path] | None = None
    ) -> None:
        """Serve the Observer API (TCP with TLS when ``tls`` = (certificate, key) files); a
        socket, address or certificate it cannot use is one warning (the
        agent's other work goes on, and its status says why there is no API)."""
        if socket is None and listen is None:
            return
        try:
            credentials = None
            if tls is not None and listen is not None:
                cert, key = tls
                credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
            await self.api.start(socket, listen, credentials)
        except (OSError, RuntimeError) as exc:  # grpc: RuntimeError("Failed to bind ...")
            self.error = f"Observer API on {socket or listen}: {exc}"
            log.warning("%s: flows: %s", self.server.node, self.error)
            await self.api.close()
            self.api.socket = None

    async def close(self) -> None:
        await self.api.close()
        if self.maps is not None:
            self.maps.close()
            self.maps = None
