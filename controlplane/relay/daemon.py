"""The relay daemon: node records from the store -> peers -> one Observer API.

It watches the node records through the store's :class:`~controlplane.store.NodeStore`
seam (``watch``: the kvstore's, or a CRD store's), keeps a peer per node
(:mod:`.peers`), serves the merged API (:mod:`.observer`), and exports its own metrics and
health on ``/metrics``, ``/healthz`` and ``/readyz`` (ready once the node list is synced
and at least one node is connected).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

from controlplane.flows.proto import relay_pb2 as rpb
from controlplane.model import Node
from controlplane.relay.observer import MergeSettings, RelayObserver
from controlplane.relay.peers import Peer, PeerManager, PeerSettings
from controlplane.relay.ui import FlowUI
from controlplane.store_types import EventKind, StoreEvent
from controlplane.telemetry import Check, TelemetryServer

__all__ = ["Relay", "RelaySettings"]

log = logging.getLogger(__name__)

_PEER_DEFAULTS = PeerSettings()
_MERGE_DEFAULTS = MergeSettings()
NodeWatch = Callable[[], AsyncIterator[StoreEvent[Node]]]


@dataclass(frozen=True, slots=True)
class RelaySettings:
    listen: str | None = "127.0.0.1:4245"
    """HOST:PORT of the relay's Observer API (None: only ``socket``)."""
    socket: Path | None = None
    """Also serve on this unix socket."""
    peers: PeerSettings = _PEER_DEFAULTS
    merge: MergeSettings = _MERGE_DEFAULTS
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = 9966
    """/metrics, /healthz, /readyz (0: ephemeral; None: off)."""
    server_credentials: grpc.ServerCredentials | None = None
    """TLS of the relay's own listener (None: plain)."""
    watch_retry: float = 2.0
    """Seconds before watching the node records again after the watch failed."""
    ui_host: str = "127.0.0.1"
    ui_port: int | None = None
    """The web UI (0: ephemeral; None: off)."""


class RelayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.nodes = Gauge(
            "cp_relay_nodes", "Nodes the relay knows, by state", ["state"], registry=registry
        )
        self.changes = Counter(
            "cp_relay_node_state_changes_total",
            "Node state changes seen by the relay",
            ["state"],
            registry=registry,
        )
        self.streams = Gauge(
            "cp_relay_get_flows_streams", "GetFlows calls being served", registry=registry
        )
        self.watch_errors = Counter(
            "cp_relay_node_watch_errors_total",
            "Failures of the relay's watch of the node records",
            registry=registry,
        )


class Relay:
    def __init__(
        self, settings: RelaySettings, watch_nodes: NodeWatch, registry: CollectorRegistry
    ) -> None:
        self.settings = settings
        self.watch_nodes = watch_nodes
        self.metrics = RelayMetrics(registry)
        self.peers = PeerManager(settings.peers)
        self.peers.on_state = self._state
        self.observer = RelayObserver(self.peers, settings.merge)
        self.telemetry: TelemetryServer | None = None
        self.ui = FlowUI(self.observer)
        self.synced = False
        self.started = asyncio.Event()
        self._stop = asyncio.Event()

    def _state(self, peer: Peer) -> None:
        self.metrics.changes.labels(rpb.NodeState.Name(peer.state)).inc()
        counts = {name: 0 for name in rpb.NodeState.keys()}  # noqa: SIM118
        for p in self.peers.peers.values():
            counts[rpb.NodeState.Name(p.state)] += 1
        for name, n in counts.items():
            self.metrics.nodes.labels(name).set(n)

    def health(self) -> Mapping[str, Check]:
        connected = len(self.peers.connected())
        total = len(self.peers.peers)
        return {
            "nodes": Check(connected > 0, f"{connected}/{total} nodes connected"),
            "store": Check(self.synced, "node records listed" if self.synced else "listing"),
        }

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        s = self.settings
        await self.observer.start(s.listen, s.socket, s.server_credentials)
        try:
            if s.metrics_port is not None:
                self.telemetry = TelemetryServer(
                    self.metrics.registry, self.health, host=s.metrics_host, port=s.metrics_port
                )
                await self.telemetry.start()
            if s.ui_port is not None:
                await self.ui.start(s.ui_host, s.ui_port)
            self.started.set()
            async with asyncio.TaskGroup() as group:
                watch = group.create_task(self._watch(), name="relay-node-watch")
                gauge = group.create_task(self._gauges(), name="relay-gauges")
                await self._stop.wait()
                watch.cancel()
                gauge.cancel()
        finally:
            try:
                await self.ui.close()
                await self.observer.close()
            finally:
                await self.peers.close()
                if self.telemetry is not None:
                    await self.telemetry.close()

    async def _watch(self) -> None:
        while True:
            try:
                async for event in self.watch_nodes():
                    if event.kind is EventKind.SYNCED:
                        self.synced = True
                    elif event.kind is EventKind.UPSERT and event.value is not None:
                        self.peers.upsert(event.name, event.value)
                    else:
                        await self.peers.remove(event.name)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store's errors: keep the peers, watch again
                self.metrics.watch_errors.inc()
                log.warning(
                    "relay: node watch failed (%s); again in %ss", exc, self.settings.watch_retry
                )
            await asyncio.sleep(self.settings.watch_retry)

    async def _gauges(self) -> None:
        while True:
            self.metrics.streams.set(self.observer.streams)
            await asyncio.sleep(1.0)
