"""The stores cpctl reads and writes, in either mode: ``--store crd`` (the default: the
Kubernetes API named by ``--kubeconfig``) or ``--store kvstore`` (the etcd clusters the
kvstore flags name). Commands see only the Protocols of :mod:`controlplane.store`, plus
the two reads that differ by mode (who references an identity, every node's IP leases)."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass

from controlplane.config import CrdConfig, KvstoreConfig
from controlplane.crd.client import KubeClient
from controlplane.crd.endpoints import CrdEndpointStore
from controlplane.crd.identities import CrdIdentityStore
from controlplane.crd.ipam import CrdCIDRStore
from controlplane.crd.ipam import list_all_claims as list_crd_claims
from controlplane.crd.ipam import list_all_leases as list_crd_leases
from controlplane.crd.kubeconfig import load_connection
from controlplane.crd.nodes import CrdNodeStore
from controlplane.crd.policies import CrdPolicyStore
from controlplane.crd.services import CrdServiceStore
from controlplane.flags import add_kvstore_flags, add_store_flags, store_config
from controlplane.kvstore.endpoints import KvEndpointStore
from controlplane.kvstore.identities import KvIdentityStore
from controlplane.kvstore.ipam import KvCIDRStore, list_all_claims, list_all_leases
from controlplane.kvstore.keys import KeyLayout
from controlplane.kvstore.nodes import KvNodeStore
from controlplane.kvstore.policies import KvPolicyStore
from controlplane.kvstore.services import KvServiceStore
from controlplane.kvstore.shards import ShardMap
from controlplane.metrics import StoreMetrics
from controlplane.model import IPLease, NumericIdentity
from controlplane.store import (
    CIDRStore,
    EndpointStore,
    IdentityStore,
    NodeStore,
    PolicyStore,
    ServiceStore,
)
from controlplane.store_types import CIDRClaim, Versioned


def add_cluster_flags(parser: argparse.ArgumentParser) -> None:
    """Every flag that names the cluster's store (both modes)."""
    add_store_flags(parser)
    add_kvstore_flags(parser)


@dataclass(frozen=True)
class ClusterStores:
    """One mode's stores, not bound to a node (read everything; write policies)."""

    mode: str
    describe: str
    metrics: StoreMetrics
    identities: IdentityStore
    endpoints: EndpointStore
    nodes: NodeStore
    cidrs: CIDRStore
    policies: PolicyStore
    references: Callable[[], Awaitable[dict[NumericIdentity, list[str]]]]
    """Who uses each identity: nodes (kvstore mode's references) or endpoints (CRD mode)."""
    leases: Callable[[], Awaitable[list[Versioned[IPLease]]]]
    """Every node's IP leases."""
    claims: Callable[[str], Awaitable[list[Versioned[CIDRClaim]]]]
    """Every pod CIDR claim of a pool, sorted by CIDR (kvstore mode: from every shard)."""
    services: ServiceStore | None = None
    """Services: kvstore records, or Kubernetes Services and their EndpointSlices (CRD
    mode); None where a mode has none."""

    def malformed(self, resource: str) -> int:
        value = self.metrics.registry.get_sample_value(
            "cp_store_malformed_values_total", {"resource": resource}
        )
        return int(value or 0)


def open_stores(
    args: argparse.Namespace, *, cluster: str = "default"
) -> AbstractAsyncContextManager[ClusterStores]:
    """The stores the command's flags name (raises ConfigError with one line)."""
    return open_config_stores(store_config(args), cluster=cluster)


@asynccontextmanager
async def open_config_stores(
    config: KvstoreConfig | CrdConfig, *, cluster: str = "default"
) -> AsyncIterator[ClusterStores]:
    metrics = StoreMetrics.create()
    if isinstance(config, CrdConfig):
        connection = load_connection(config.kubeconfig, config.context)
        async with KubeClient(
            connection, request_timeout=config.request_timeout, user_agent="cpctl"
        ) as client:
            endpoints = CrdEndpointStore(client, metrics)

            async def users() -> dict[NumericIdentity, list[str]]:
                out: dict[NumericIdentity, list[str]] = {}
                for item in await endpoints.list():
                    out.setdefault(item.value.identity, []).append(item.value.endpoint_id)
                return {k: sorted(set(v)) for k, v in out.items()}

            async def crd_leases() -> list[Versioned[IPLease]]:
                return await list_crd_leases(client, metrics)

            cidrs = CrdCIDRStore(client, metrics)

            async def crd_claims(pool: str) -> list[Versioned[CIDRClaim]]:
                return await list_crd_claims(client, metrics, pool)

            yield ClusterStores(
                mode="crd",
                describe=f"crd: Kubernetes API {connection.server}",
                metrics=metrics,
                identities=CrdIdentityStore(client, metrics),
                endpoints=endpoints,
                nodes=CrdNodeStore(client, metrics),
                cidrs=cidrs,
                policies=CrdPolicyStore(client, metrics),
                services=CrdServiceStore(client, metrics),
                references=users,
                leases=crd_leases,
                claims=crd_claims,
            )
        return
    layout = KeyLayout(config.prefix)
    async with ShardMap(config) as shards:
        identities = KvIdentityStore(shards, layout, metrics)

        async def references() -> dict[NumericIdentity, list[str]]:
            return {k: [str(n) for n in v] for k, v in (await identities.references()).items()}

        async def leases() -> list[Versioned[IPLease]]:
            return await list_all_leases(shards, layout, metrics)

        async def claims(pool: str) -> list[Versioned[CIDRClaim]]:
            return await list_all_claims(shards, layout, metrics, pool)

        n = len(config.clusters)
        yield ClusterStores(
            mode="kvstore",
            describe=f"kvstore: {n} etcd cluster{'s' if n != 1 else ''}",
            metrics=metrics,
            identities=identities,
            endpoints=KvEndpointStore(shards, layout, metrics, None, node=None, cluster=cluster),
            nodes=KvNodeStore(shards, layout, metrics, None, node=None, cluster=cluster),
            cidrs=KvCIDRStore(shards, layout, metrics),
            policies=KvPolicyStore(shards, layout, metrics),
            services=KvServiceStore(shards, layout, metrics),
            references=references,
            leases=leases,
            claims=claims,
        )
