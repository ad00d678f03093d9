"""The store interfaces the agent and operator use, one per resource.

Each store returns small immutable objects that carry their store version (the etcd mod
revision in kvstore mode, the resourceVersion in CRD mode) for compare-and-set, and each
offers list-and-watch with a "synced" event. The kvstore implementations live in
``controlplane.kvstore``; the CRD ones will live in ``controlplane.crd``. Stores that own
keys (leases, self-repair) also have ``run()``, which the daemon runs in its TaskGroup.

As in Patroni's DCS layer, a store implements only the small atomic core (allocate or
reference in one step, claim if free, release); the logic above it (reference counts,
next-free choices, caches) is store-agnostic and lives in ``identity`` and ``ipam``.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from controlplane.model import (
    Endpoint,
    Identity,
    IPAddress,
    IPIdentity,
    IPLease,
    Labels,
    NetworkPolicy,
    Node,
    NodeName,
    NumericIdentity,
    Service,
)
from controlplane.store_types import (
    CIDRClaim,
    EventKind,
    GCStats,
    StoreEvent,
    Versioned,
)

__all__ = ["CIDRClaim", "EventKind", "GCStats", "StoreEvent", "Versioned"]


class IdentityStore(Protocol):
    """Security identities, as seen by one node."""

    async def acquire(self, labels: Labels) -> Identity:
        """Allocate an identity for ``labels`` or take a reference to the existing one.

        One atomic step; the node's reference is leased to it and comes back after a lease
        loss. Calling it again for labels the node already references is cheap and safe.
        """
        ...

    async def release(self, identity: Identity) -> None:
        """Drop this node's reference (the identity itself is left to the garbage collector)."""
        ...

    async def get(self, ident: NumericIdentity) -> Versioned[Identity] | None: ...

    async def lookup(self, labels: Labels) -> Versioned[Identity] | None: ...

    async def list(self) -> list[Versioned[Identity]]: ...

    def watch(self) -> AsyncIterator[StoreEvent[Identity]]: ...


class IdentityCollector(Protocol):
    """The operator's identity garbage collector (two rounds; never deletes a used one)."""

    async def collect(self) -> GCStats: ...


class EndpointStore(Protocol):
    """Endpoints (the ipcache source): every node's, written by their owners."""

    async def upsert(self, endpoint: Endpoint) -> float:
        """Publish one of this node's endpoints (leased, re-created, self-repaired).

        Returns when the write request that published it was issued (``time.monotonic()``,
        one clock for every process of a host): the start of propagation, after the reads
        that guard the write."""
        ...

    async def remove(self, ip: IPAddress) -> None: ...

    async def list(self) -> list[Versioned[Endpoint]]: ...

    def watch(self) -> AsyncIterator[StoreEvent[Endpoint]]: ...

    def watch_ip_identities(self) -> AsyncIterator[builtins.list[StoreEvent[IPIdentity]]]:
        """:meth:`watch`, each endpoint as the ipcache needs it (validated like an Endpoint,
        without building one), in batches as the store delivers them (a list page, a watch
        response): what an agent's cold sync goes through for every endpoint."""
        ...


class NodeStore(Protocol):
    """Node records: each node writes its own."""

    async def register(self, node: Node) -> None:
        """Publish (or update) this node's record (leased, re-created, self-repaired)."""
        ...

    async def deregister(self) -> None: ...

    async def get(self, name: NodeName) -> Versioned[Node] | None: ...

    async def list(self) -> list[Versioned[Node]]: ...

    def watch(self) -> AsyncIterator[StoreEvent[Node]]: ...


class CIDRStore(Protocol):
    """Pod CIDRs per node (written by the operator leader)."""

    async def list(self, pool: str) -> list[Versioned[CIDRClaim]]: ...

    async def claim(self, claim: CIDRClaim) -> bool:
        """Record the claim unless the CIDR is taken; False when it is."""
        ...

    async def free(self, claim: Versioned[CIDRClaim]) -> bool:
        """Delete the claim if it is unchanged since it was read."""
        ...

    def watch(self, pool: str) -> AsyncIterator[StoreEvent[CIDRClaim]]:
        """List-then-watch the claims of ``pool`` (each node's agent waits for its own)."""
        ...


class IPLeaseStore(Protocol):
    """One node's IP leases (written by its agent)."""

    async def list(self) -> list[Versioned[IPLease]]: ...

    async def claim(self, lease: IPLease) -> bool:
        """Record the lease unless the IP is leased already; False when it is."""
        ...

    async def adopt(self, leases: Sequence[IPLease]) -> None:
        """Take over leases this node wrote before a restart (re-attach them to its session)."""
        ...

    async def release(self, ip: IPAddress) -> None: ...


class PolicyStore(Protocol):
    """Network policies (written by operators and tools; read by every agent)."""

    async def put(self, policy: NetworkPolicy) -> None: ...

    async def delete(self, namespace: str, name: str) -> bool:
        """Remove the policy; False when it did not exist."""
        ...

    async def list(self) -> list[Versioned[NetworkPolicy]]: ...

    def watch(self) -> AsyncIterator[StoreEvent[NetworkPolicy]]:
        """Events named ``namespace/name``."""
        ...


class ServiceStore(Protocol):
    """Services (virtual IPs, frontends, backends): written by tools or derived from
    Kubernetes Services and EndpointSlices; read by every agent, which programs its
    load-balancing maps from them."""

    async def put(self, service: Service) -> None: ...

    async def delete(self, namespace: str, name: str) -> bool:
        """Remove the service; False when it did not exist."""
        ...

    async def list(self) -> list[Versioned[Service]]: ...

    def watch(self) -> AsyncIterator[StoreEvent[Service]]:
        """List-then-watch; events named ``namespace/name``; one SYNCED once listed."""
        ...
