"""The relay's peers: one per node record, each an Observer API client with a state.

A node's address is its record's ``flows_address`` (the agent publishes it with
``--flows-listen``), else its first IP and ``--peer-port``. Each peer checks its server
with ``ServerStatus`` every ``check_interval`` while it answers (CONNECTED) and, once it
fails, retries after a jittered exponential backoff (UNAVAILABLE) until it answers again;
a node whose record goes away is GONE (its channel closed). Every state change bumps
:attr:`PeerManager.version` and wakes :meth:`PeerManager.changed` waiters, so a
following ``GetFlows`` starts streaming from a node as soon as it connects and reports
the ones it loses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import grpc
import grpc.aio

from controlplane.flows.client import ObserverClient
from controlplane.flows.proto import observer_pb2 as obs
from controlplane.flows.proto import relay_pb2 as rpb
from controlplane.model import Node

__all__ = ["Peer", "PeerManager", "PeerSettings", "node_address"]

log = logging.getLogger(__name__)

DEFAULT_PEER_PORT: Final = 4244


@dataclass(frozen=True, slots=True)
class PeerSettings:
    port: int = DEFAULT_PEER_PORT
    """The Observer API port of a node whose record has no ``flows_address``."""
    check_interval: float = 5.0
    """Seconds between ServerStatus checks of a connected peer."""
    backoff_min: float = 0.2
    backoff_max: float = 10.0
    """Reconnect delays: doubling from min to max, with up to 50% jitter."""
    timeout: float = 2.0
    """Deadline of one ServerStatus check."""
    channel_options: tuple[tuple[str, Any], ...] = ()
    credentials: grpc.ChannelCredentials | None = None
    """TLS toward the agents (None: plain)."""


def node_address(node: Node, port: int) -> str | None:
    """Where ``node``'s Observer API is: its published address, else IP:port; None when
    it has neither."""
    if node.flows_address:
        return node.flows_address
    if not node.ips:
        return None
    ip = str(node.ips[0])
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


@dataclass(eq=False)
class Peer:
    name: str
    address: str
    client: ObserverClient
    state: int = rpb.NODE_UNAVAILABLE
    message: str = "not checked yet"
    status: obs.ServerStatusResponse | None = None
    failures: int = 0
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class PeerManager:
    def __init__(self, settings: PeerSettings) -> None:
        self.settings = settings
        self.peers: dict[str, Peer] = {}
        self.version = 0
        self._changed = asyncio.Event()
        self.on_state: Callable[[Peer], None] | None = None

    # -- what the store says ------------------------------------------------------------

    def upsert(self, name: str, node: Node) -> None:
        address = node_address(node, self.settings.port)
        peer = self.peers.get(name)
        if peer is not None and peer.address == address:
            return
        if peer is not None:
            self._drop(peer)
        if address is None:
            return
        s = self.settings
        client = ObserverClient(address, list(s.channel_options), credentials=s.credentials)
        peer = Peer(name, address, client)
        self.peers[name] = peer
        peer.task = asyncio.create_task(self._check(peer), name=f"relay-peer:{name}")
        self._bump(peer)

    async def remove(self, name: str) -> None:
        peer = self.peers.pop(name, None)
        if peer is not None:
            peer.state, peer.message = rpb.NODE_GONE, "node record removed"
            self._bump(peer)
            await self._close(peer)

    def _drop(self, peer: Peer) -> None:
        self.peers.pop(peer.name, None)
        asyncio.create_task(self._close(peer), name=f"relay-peer-close:{peer.name}")  # noqa: RUF006

    async def _close(self, peer: Peer) -> None:
        if peer.task is not None:
            peer.task.cancel()
            await asyncio.gather(peer.task, return_exceptions=True)
        await peer.client.close()

    async def close(self) -> None:
        peers, self.peers = list(self.peers.values()), {}
        await asyncio.gather(*(self._close(p) for p in peers), return_exceptions=True)

    # -- health of each peer --------------------------------------------------------------

    async def _check(self, peer: Peer) -> None:
        s = self.settings
        while True:
            try:
                peer.status = await peer.client.server_status(timeout=s.timeout)
            except grpc.aio.AioRpcError as exc:
                self.mark(peer, rpb.NODE_UNAVAILABLE, exc.details() or exc.code().name)
            else:
                self.mark(peer, rpb.NODE_CONNECTED, "")
            if peer.state == rpb.NODE_CONNECTED:
                peer.failures = 0
                await asyncio.sleep(s.check_interval)
            else:
                peer.failures += 1
                delay = min(s.backoff_max, s.backoff_min * 2 ** min(peer.failures - 1, 16))
                await asyncio.sleep(delay * (1 + random.random() / 2))

    def mark(self, peer: Peer, state: int, message: str) -> None:
        """Set ``peer``'s state (a failed stream marks it unavailable too)."""
        if peer.state == state and peer.message == message:
            return
        if state != peer.state:
            level = logging.INFO if state == rpb.NODE_CONNECTED else logging.WARNING
            log.log(level, "peer %s (%s): %s %s", peer.name, peer.address,
                    rpb.NodeState.Name(state), message)  # fmt: skip
        peer.state, peer.message = state, message
        self._bump(peer)

    def recheck(self, peer: Peer) -> None:
        """Check ``peer`` again now (a stream to it broke), instead of at its next turn."""
        if peer.task is not None and self.peers.get(peer.name) is peer:
            peer.task.cancel()
            peer.task = asyncio.create_task(self._check(peer), name=f"relay-peer:{peer.name}")

    def _bump(self, peer: Peer) -> None:
        self.version += 1
        event, self._changed = self._changed, asyncio.Event()
        event.set()
        if self.on_state is not None:
            self.on_state(peer)

    async def changed(self, version: int, timeout: float | None = None) -> None:
        """Return once :attr:`version` differs from ``version`` (or after ``timeout``)."""
        if self.version != version:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    def connected(self) -> list[Peer]:
        return [p for p in self.peers.values() if p.state == rpb.NODE_CONNECTED]

    def counts(self) -> dict[int, int]:
        out: dict[int, int] = {rpb.NODE_CONNECTED: 0, rpb.NODE_UNAVAILABLE: 0}
        for p in self.peers.values():
            out[p.state] = out.get(p.state, 0) + 1
        return out
