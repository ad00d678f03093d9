"""Records copied into the kvstore from another store (``cpctl migrate``, drift checks).

A copy keeps what the source says: an identity's number, an endpoint's IP, identity and
node, a node's CIDR, an IP's owner. Every write is create-only (or guarded by the value
it expects): a key that exists is never overwritten; the write reports the record it
found instead (a one-line reason), so a caller that checked the target beforehand sees a
conflict only when the target changed in between.

Ownership. Endpoints, node records, IP leases and identity references are owned by an
agent session in kvstore mode (leased; see :mod:`controlplane.kvstore.owner`). A copy is
written on a *migration lease* (one per cluster, ``lease_ttl`` seconds, never kept
alive): it behaves like the session of an agent that has just died. The node's agent,
started in kvstore mode before the lease expires, adopts every one of them on its first
session exactly as after its own restart (it re-puts its node record, moves its IP
leases and endpoint keys onto its own lease, re-takes its identity references); what no
agent adopts expires with the lease, as a dead node's keys do, and the operator's GC
then frees the rest. Identities (index and master keys), CIDR claims, policies and
services are never leased in kvstore mode and are copied unleased.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence

from controlplane import codec
from controlplane.kvstore.backend import EtcdBackend
from controlplane.kvstore.endpoints import KvEndpointStore
from controlplane.kvstore.identities import KIND as IDENTITY_KIND
from controlplane.kvstore.identities import KvIdentityStore
from controlplane.kvstore.ipam import (
    CLAIM_KIND,
    LEASE_KIND,
    KvCIDRStore,
    list_all_claims,
    list_all_leases,
)
from controlplane.kvstore.ipam import (
    KIND as IPAM_KIND,
)
from controlplane.kvstore.keys import KeyLayout
from controlplane.kvstore.nodes import NODE_KIND, KvNodeStore
from controlplane.kvstore.policies import KvPolicyStore
from controlplane.kvstore.services import KvServiceStore
from controlplane.kvstore.shards import ShardMap
from controlplane.kvstore.types import Get, Put, absent, value_is
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

__all__ = ["KvCopier"]

_KEYS_PER_LEASE = 1000


class KvCopier:
    """Reads every record of a kvstore and writes copies into it (see the module doc)."""

    mode = "kvstore"

    def __init__(
        self,
        shards: ShardMap,
        layout: KeyLayout,
        metrics: StoreMetrics,
        *,
        cluster: str = "default",
        lease_ttl: int = 900,
    ) -> None:
        self.shards = shards
        self.layout = layout
        self.cluster = cluster
        self.lease_ttl = lease_ttl
        self.metrics = metrics
        self.identities = KvIdentityStore(shards, layout, metrics)
        self.endpoint_store = KvEndpointStore(
            shards, layout, metrics, None, node=None, cluster=cluster
        )
        self.node_store = KvNodeStore(shards, layout, metrics, None, node=None, cluster=cluster)
        self.cidrs = KvCIDRStore(shards, layout, metrics)
        self.policy_store = KvPolicyStore(shards, layout, metrics)
        self.service_store = KvServiceStore(shards, layout, metrics)
        self._leases: dict[str, tuple[int, int]] = {}
        """cluster name -> (migration lease, keys attached to it so far)."""

    @property
    def describe(self) -> str:
        n = len(self.shards.all())
        return f"kvstore: {n} etcd cluster{'s' if n != 1 else ''}"

    # -- reads -----------------------------------------------------------------------

    async def list_identities(self) -> builtins.list[Identity]:
        return [v.value for v in await self.identities.list()]

    async def list_endpoints(self) -> builtins.list[Endpoint]:
        return [v.value for v in await self.endpoint_store.list()]

    async def list_nodes(self) -> builtins.list[Node]:
        return [v.value for v in await self.node_store.list()]

    async def list_claims(self, pool: str) -> builtins.list[CIDRClaim]:
        return [
            v.value for v in await list_all_claims(self.shards, self.layout, self.metrics, pool)
        ]

    async def list_leases(self) -> builtins.list[IPLease]:
        return [v.value for v in await list_all_leases(self.shards, self.layout, self.metrics)]

    async def list_policies(self) -> builtins.list[NetworkPolicy]:
        return [v.value for v in await self.policy_store.list()]

    async def list_services(self) -> builtins.list[Service] | None:
        return [v.value for v in await self.service_store.list()]

    async def namespaces(self) -> set[str] | None:
        return None  # any namespace will do

    async def operator_leading(self) -> str | None:
        """The kvstore-mode operator holding the election key, if any (leased: a dead
        operator's key expires with its lease)."""
        found = await self.shards.all()[0].list_prefix(self.layout.leader_prefix)
        if not found.kvs:
            return None
        return found.kvs[0].value.decode("utf-8", errors="replace") or "an operator"

    def placement_error(self, identity: Identity) -> str | None:
        """Why ``identity`` cannot keep its number here: the shard its labels hash to
        hands out another slice of the ID range."""
        index = self.shards.shard_index(IDENTITY_KIND, identity.labels.canonical())
        ids = self.identities.id_ranges[index]
        if ids.contains(identity.id):
            return None
        name = self.shards.shards(IDENTITY_KIND)[index].name
        return (
            f"identity {identity.id} ({identity.labels}) would live on kvstore cluster "
            f"{name!r}, whose identity range is {ids}"
        )

    # -- writes ----------------------------------------------------------------------

    async def _lease(self, backend: EtcdBackend) -> int:
        current = self._leases.get(backend.name)
        if current is None or current[1] >= _KEYS_PER_LEASE:
            granted = await backend.grant(self.lease_ttl)
            current = (granted.id, 0)
        self._leases[backend.name] = (current[0], current[1] + 1)
        return current[0]

    async def write_identity(self, identity: Identity, users: Sequence[NodeName]) -> str | None:
        """Index, master key and one reference per node in ``users`` (on the migration
        lease, so the GC keeps the identity until the nodes' agents reference it)."""
        index_at = self.shards.shard_index(IDENTITY_KIND, identity.labels.canonical())
        backend = self.shards.shards(IDENTITY_KIND)[index_at]
        component = identity.labels.key_component()
        index_key = self.layout.identity_labels(component)
        master_key = self.layout.identity_id(identity.id)
        index_value = codec.encode("identity-index", {"id": int(identity.id)})
        master_value = codec.encode("identity", identity.to_dict())
        ref_value = codec.encode("identity-ref", {"id": int(identity.id)})
        refs = [
            Put(self.layout.identity_value(component, node), ref_value, await self._lease(backend))
            for node in sorted(set(users))
        ]
        created = await backend.txn(
            [absent(index_key), absent(master_key)],
            [Put(index_key, index_value), Put(master_key, master_value), *refs],
            [Get(index_key), Get(master_key)],
        )
        if created.succeeded:
            return None
        index_kvs, master_kvs = created.results[0].kvs, created.results[1].kvs
        if index_kvs and index_kvs[0].value != index_value:
            return (
                f"labels {identity.labels} are identity {_payload(index_kvs[0].value, 'id')} "
                f"in the kvstore, not {identity.id}"
            )
        if master_kvs and master_kvs[0].value != master_value:
            return (
                f"identity {identity.id} is labels {_payload(master_kvs[0].value, 'labels')} "
                f"in the kvstore, not {identity.labels}"
            )
        # Both already so (or half written by hand): complete it, guarded by what we saw;
        # nothing is rewritten when both are there (no event for every watcher).
        guards = [
            value_is(index_key, index_value) if index_kvs else absent(index_key),
            value_is(master_key, master_value) if master_kvs else absent(master_key),
        ]
        puts = [*refs]
        if not index_kvs:
            puts.append(Put(index_key, index_value))
        if not master_kvs:
            puts.append(Put(master_key, master_value))
        if not puts:
            return None
        done = await backend.txn(guards, puts)
        return None if done.succeeded else f"identity {identity.id} changed while copied"

    async def write_node(self, node: Node) -> str | None:
        key = self.layout.node(self.cluster, node.name)
        value = codec.encode(NODE_KIND, node.to_dict())
        for backend in self.shards.all():
            reason = await self._create(backend, key, value, f"node {node.name}")
            if reason is not None:
                return reason
        return None

    async def write_claim(self, claim: CIDRClaim) -> str | None:
        key = self.layout.ipam_cidr(claim.pool, str(claim.cidr))
        value = codec.encode(CLAIM_KIND, {"node": str(claim.node)})
        backend = self.cidrs.backend_for(claim.pool)
        result = await backend.txn([absent(key)], [Put(key, value)], [Get(key)])
        if result.succeeded or result.results[0].kvs[0].value == value:
            return None
        return f"CIDR {claim.cidr} of pool {claim.pool} is claimed by another node"

    async def write_leases(self, node: NodeName, leases: Sequence[IPLease]) -> str | None:
        backend = self.shards.shard_for(IPAM_KIND, node)
        for lease in leases:
            key = self.layout.ipam_lease(node, str(lease.ip))
            value = codec.encode(LEASE_KIND, {"owner": str(lease.owner)})
            reason = await self._create(
                backend, key, value, f"IP {lease.ip} of node {node}", leased=True
            )
            if reason is not None:
                return reason
        return None

    async def write_endpoints(self, endpoints: Sequence[Endpoint]) -> str | None:
        for endpoint in endpoints:
            backend = self.shards.shard_for("endpoints", endpoint.node)
            key = self.layout.ip(self.cluster, str(endpoint.ip))
            value = codec.encode("endpoint", endpoint.to_dict())
            reason = await self._create(backend, key, value, f"endpoint {endpoint.ip}", leased=True)
            if reason is not None:
                return reason
        return None

    async def write_policy(self, policy: NetworkPolicy) -> str | None:
        key = self.layout.policy(policy.namespace, policy.name)
        value = codec.encode("policy", policy.to_dict())
        return await self._create(self.shards.all()[0], key, value, f"policy {policy.id}")

    async def write_service(self, service: Service) -> str | None:
        key = self.layout.service(service.namespace, service.name)
        value = codec.encode("service", service.to_dict())
        return await self._create(self.shards.all()[0], key, value, f"service {service.id}")

    async def _create(
        self, backend: EtcdBackend, key: bytes, value: bytes, what: str, *, leased: bool = False
    ) -> str | None:
        lease = await self._lease(backend) if leased else 0
        result = await backend.txn([absent(key)], [Put(key, value, lease)], [Get(key)])
        if result.succeeded:
            return None
        kvs = result.results[0].kvs
        if kvs and codec_equal(kvs[0].value, value):
            return None
        return f"{what} exists with other contents"


def _payload(raw: bytes, field: str) -> str:
    try:
        data = codec.unpack(raw)["d"]
    except codec.DecodeError:
        return "(undecodable)"
    return str(data.get(field, "?")) if isinstance(data, dict) else "?"


def codec_equal(a: bytes, b: bytes) -> bool:
    """Two envelopes with the same payload (the encoding of maps may order keys apart)."""
    if a == b:
        return True
    try:
        return codec.unpack(a) == codec.unpack(b)
    except codec.DecodeError:
        return False
