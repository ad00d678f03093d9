"""The seven CRD stores of one node, built together, and the background work they need.

A convenience for the agent's CRD store session (and tests): every store of one node on
one :class:`KubeClient`, and :meth:`CrdNodeStores.tasks`, the self-repair loops to run
in the session's TaskGroup (each runs until cancelled; none raises on an outage).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from controlplane.crd.client import KubeClient
from controlplane.crd.endpoints import CrdEndpointStore
from controlplane.crd.identities import CrdIdentityStore
from controlplane.crd.ipam import CrdCIDRStore, CrdIPLeaseStore
from controlplane.crd.nodes import CrdNodeStore
from controlplane.crd.policies import CrdPolicyStore
from controlplane.crd.services import CrdServiceStore
from controlplane.metrics import StoreMetrics
from controlplane.model import IdentityRange, NodeName


@dataclass(frozen=True, slots=True)
class CrdNodeStores:
    identities: CrdIdentityStore
    endpoints: CrdEndpointStore
    nodes: CrdNodeStore
    cidrs: CrdCIDRStore
    leases: CrdIPLeaseStore
    policies: CrdPolicyStore
    services: CrdServiceStore

    def tasks(self) -> dict[str, Callable[[], Awaitable[None]]]:
        """The repair loops by name (identities held, endpoints, node record, IP leases)."""
        return {
            "crd-repair-identities": self.identities.run,
            "crd-repair-endpoints": self.endpoints.run,
            "crd-repair-node": self.nodes.run,
            "crd-repair-leases": self.leases.run,
        }


def node_stores(
    client: KubeClient,
    metrics: StoreMetrics,
    node: NodeName,
    *,
    id_range: IdentityRange | None = None,
) -> CrdNodeStores:
    """Every store of ``node`` on ``client``."""
    return CrdNodeStores(
        identities=CrdIdentityStore(client, metrics, node=node, id_range=id_range),
        endpoints=CrdEndpointStore(client, metrics, node=node),
        nodes=CrdNodeStore(client, metrics, node=node),
        cidrs=CrdCIDRStore(client, metrics),
        leases=CrdIPLeaseStore(client, metrics, node=node),
        policies=CrdPolicyStore(client, metrics),
        services=CrdServiceStore(client, metrics),
    )
