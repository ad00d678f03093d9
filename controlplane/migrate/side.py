"""One side of a migration: a store that can be read whole and written copies into.

:func:`open_side` builds it from the store settings (either mode); the backends' copiers
(:class:`~controlplane.kvstore.copier.KvCopier`, :class:`~controlplane.crd.copier.CrdCopier`)
implement :class:`Copier`.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Protocol

from controlplane.config import CrdConfig, KvstoreConfig
from controlplane.crd.client import KubeClient
from controlplane.crd.copier import CrdCopier
from controlplane.crd.kubeconfig import KubeConnection, load_connection
from controlplane.kvstore.copier import KvCopier
from controlplane.kvstore.keys import KeyLayout
from controlplane.kvstore.shards import ShardMap
from controlplane.metrics import StoreMetrics
from controlplane.model import (
    Endpoint,
    Identity,
    IPLease,
    NetworkPolicy,
    Node,
    NodeName,
    Service,
)
from controlplane.store_types import CIDRClaim

__all__ = ["Copier", "open_side"]


class Copier(Protocol):
    """Every record of one store, read whole; copies written create-only. Each write
    returns None when the record is there now (written, or found equal), else one line
    saying what the store holds instead (nothing was overwritten)."""

    @property
    def mode(self) -> str: ...

    @property
    def describe(self) -> str: ...

    async def list_identities(self) -> builtins.list[Identity]: ...

    async def list_endpoints(self) -> builtins.list[Endpoint]: ...

    async def list_nodes(self) -> builtins.list[Node]: ...

    async def list_claims(self, pool: str) -> builtins.list[CIDRClaim]: ...

    async def list_leases(self) -> builtins.list[IPLease]: ...

    async def list_policies(self) -> builtins.list[NetworkPolicy]: ...

    async def list_services(self) -> builtins.list[Service] | None:
        """None when this mode has no service store."""
        ...

    async def namespaces(self) -> set[str] | None:
        """The namespaces a namespaced copy may go to; None: any."""
        ...

    async def operator_leading(self) -> str | None:
        """Who leads this mode's operators now (its election record names a holder), or
        None: an operator that leads while claims are copied in would not know them."""
        ...

    def placement_error(self, identity: Identity) -> str | None:
        """Why ``identity`` cannot keep its number in this store, or None."""
        ...

    async def write_identity(self, identity: Identity, users: Sequence[NodeName]) -> str | None:
        """``users``: the nodes whose endpoints use it (kvstore mode writes references)."""
        ...

    async def write_node(self, node: Node) -> str | None: ...

    async def write_claim(self, claim: CIDRClaim) -> str | None: ...

    async def write_leases(self, node: NodeName, leases: Sequence[IPLease]) -> str | None: ...

    async def write_endpoints(self, endpoints: Sequence[Endpoint]) -> str | None:
        """The addresses of one pod."""
        ...

    async def write_policy(self, policy: NetworkPolicy) -> str | None: ...

    async def write_service(self, service: Service) -> str | None: ...


@asynccontextmanager
async def open_side(
    config: KvstoreConfig | CrdConfig | KubeConnection,
    metrics: StoreMetrics,
    *,
    cluster: str = "default",
    lease_ttl: int = 900,
    user_agent: str = "cpctl-migrate",
) -> AsyncIterator[Copier]:
    """The store ``config`` names, as a :class:`Copier` (connections closed on exit)."""
    if isinstance(config, CrdConfig | KubeConnection):
        if isinstance(config, CrdConfig):
            connection = load_connection(config.kubeconfig, config.context)
            timeout = config.request_timeout
        else:
            connection, timeout = config, 10.0
        async with KubeClient(connection, request_timeout=timeout, user_agent=user_agent) as client:
            yield CrdCopier(client, metrics, server=connection.server)
        return
    async with ShardMap(config) as shards:
        yield KvCopier(
            shards, KeyLayout(config.prefix), metrics, cluster=cluster, lease_ttl=lease_ttl
        )
