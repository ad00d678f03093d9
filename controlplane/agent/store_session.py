"""The seam between the agent and the store it runs on.

The agent's control-plane side runs in generations (sessions). A :class:`StoreConnector`
opens one :class:`StoreSession` per generation: its connections, its stores (the
Protocols of :mod:`controlplane.store`), its background work (lease keepalives, heartbeat
monitors, health checks) and its health report. Everything above the seam (endpoint
lifecycle, watches into the cache and the ipcache, policy, routes, status) sees only
these Protocols, so a session over another store (the Kubernetes API) slots in beside the
kvstore one without touching that code.

A store session's background task raises :class:`RestartNeeded` when the store turned
unhealthy in a way that a new session (reconnect, re-list, re-publish) should mend; the
agent then tears the session down and opens the next one. What must outlive sessions so
that one outage costs one restart (restart arms, heartbeat evidence) lives in the
connector, not in the session.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from controlplane.agent.health import ShardHealth
from controlplane.model import Identity, Labels
from controlplane.store import (
    CIDRStore,
    EndpointStore,
    IdentityStore,
    IPLeaseStore,
    NodeStore,
    PolicyStore,
    ServiceStore,
)


class RestartNeeded(Exception):
    """The store is unhealthy: end this session and start the next one."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Stores:
    """One session's stores, each bound to this node."""

    identities: IdentityStore
    endpoints: EndpointStore
    nodes: NodeStore
    cidrs: CIDRStore
    leases: IPLeaseStore
    policies: PolicyStore
    services: ServiceStore | None = None
    """None where the mode has no service source yet (CRD mode, until it reads Kubernetes
    Services and EndpointSlices): the node then balances no service."""


class StoreSession(Protocol):
    """One generation of a store's connections and stores."""

    @property
    def stores(self) -> Stores: ...

    async def connect(self) -> None:
        """Open the connections (before any task of :meth:`tasks` runs)."""
        ...

    def tasks(self) -> Mapping[str, Callable[[], Awaitable[None]]]:
        """The session's background work by name; any of it may raise
        :class:`RestartNeeded`. Each runs until the session ends."""
        ...

    def health(self) -> list[ShardHealth]:
        """The latest health of each part of the store (a kvstore shard, the API server)."""
        ...

    def started(self) -> None:
        """The session finished its startup (registered, listed, restored): from now on
        its successful health checks may re-arm the restart triggers."""
        ...

    def unavailable(self, labels: Labels) -> str | None:
        """Why a new endpoint with ``labels`` on this node cannot be published now (a part
        of the store it needs failed its last check: which and why), else None."""
        ...

    def on_identity_changed(self, callback: Callable[[Identity, Identity], None]) -> None:
        """Call ``callback(old, new)`` when an identity this node references was replaced
        (its labels now have another number): the node's endpoints must be re-published."""
        ...

    async def release_all(self) -> None:
        """``--cleanup-on-exit``: give up everything this node holds (leases, owned keys)."""
        ...

    async def close(self) -> None: ...


class StoreConnector(Protocol):
    """Opens a node's store sessions; keeps what outlives them."""

    @property
    def describe(self) -> str:
        """The store in a few words, for logs and status (``kvstore: 2 clusters``)."""
        ...

    def open(self, generation: int) -> StoreSession: ...
