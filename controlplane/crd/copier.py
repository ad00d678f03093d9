"""Records copied into the Kubernetes API from another store (``cpctl migrate``, drift
checks).

A copy keeps what the source says: an Identity is created under its number, an
Endpoint with its IPs, identity and node, a PodCIDR for the node that has it (and the
Node's ``spec.podCIDRs``), an IP lease in the Node's ``status.ipam.used``. Writes are
creates, or updates guarded by the resourceVersion read: an object that says something
else is never overwritten; the write reports it instead (one line), so a caller that
checked beforehand sees a conflict only when the target changed in between.

Ownership. CRD mode has no leases: objects live until deleted. A copied Endpoint, Node
(addresses, boot ID, leases in its status) is adopted by the node's agent on its first
session in CRD mode exactly as after its own restart (it lists its Node's leases and its
Endpoints, re-publishes them and repairs them from then on). A node that never comes
back keeps its objects, as a CRD-mode node that died without deregistering does, until
its Node object is deleted (then the operator's node GC frees its PodCIDR claims and
Endpoints).
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from dataclasses import replace

from controlplane.crd.client import JSON, KubeClient
from controlplane.crd.endpoints import CrdEndpointStore, _labels_for
from controlplane.crd.errors import AlreadyExists, Conflict
from controlplane.crd.identities import CrdIdentityStore, identity_object
from controlplane.crd.ipam import CrdCIDRStore, claim_object, list_all_claims, list_all_leases
from controlplane.crd.names import cidr_name
from controlplane.crd.nodes import CrdNodeStore, node_object
from controlplane.crd.policies import CrdPolicyStore, policy_spec
from controlplane.crd.records import meta_of
from controlplane.crd.resources import (
    ENDPOINTS,
    IDENTITIES,
    LEASES,
    NAMESPACES,
    NETWORK_POLICIES,
    NODES,
    OPERATOR_LEASE,
    POD_CIDRS,
)
from controlplane.crd.retry import on_conflict
from controlplane.crd.services import CrdServiceStore
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

__all__ = ["CrdCopier"]

_FAMILIES = {4: "IPv4", 6: "IPv6"}


class CrdCopier:
    """Reads every record of the CRD store and writes copies into it (module doc)."""

    mode = "crd"

    def __init__(self, client: KubeClient, metrics: StoreMetrics, *, server: str = "") -> None:
        self.client = client
        self.metrics = metrics
        self.server = server
        self.identities = CrdIdentityStore(client, metrics)
        self.endpoint_store = CrdEndpointStore(client, metrics)
        self.node_store = CrdNodeStore(client, metrics)
        self.cidrs = CrdCIDRStore(client, metrics)
        self.policy_store = CrdPolicyStore(client, metrics)
        self.service_store = CrdServiceStore(client, metrics)

    @property
    def describe(self) -> str:
        return f"crd: Kubernetes API {self.server}".rstrip()

    # -- reads -----------------------------------------------------------------------

    async def list_identities(self) -> builtins.list[Identity]:
        return [v.value for v in await self.identities.list()]

    async def list_endpoints(self) -> builtins.list[Endpoint]:
        return [v.value for v in await self.endpoint_store.list()]

    async def list_nodes(self) -> builtins.list[Node]:
        return [v.value for v in await self.node_store.list()]

    async def list_claims(self, pool: str) -> builtins.list[CIDRClaim]:
        return [v.value for v in await list_all_claims(self.client, self.metrics, pool)]

    async def list_leases(self) -> builtins.list[IPLease]:
        return [v.value for v in await list_all_leases(self.client, self.metrics)]

    async def list_policies(self) -> builtins.list[NetworkPolicy]:
        return [v.value for v in await self.policy_store.list()]

    async def list_services(self) -> builtins.list[Service] | None:
        return [v.value for v in await self.service_store.list()]

    async def namespaces(self) -> set[str] | None:
        """The namespaces that exist (a namespaced object needs its namespace)."""
        found = await self.client.list(NAMESPACES)
        return {str(meta_of(obj).get("name")) for obj in found.items}

    async def operator_leading(self, namespace: str = "kube-system") -> str | None:
        """The holder of the CRD-mode operators' Lease, if any (a clean stop releases it;
        a crashed leader's name stays until a successor takes it)."""
        lease = await self.client.get_or_none(LEASES, OPERATOR_LEASE, namespace)
        spec = (lease or {}).get("spec") or {}
        holder = spec.get("holderIdentity") if isinstance(spec, dict) else None
        return str(holder) if holder else None

    def placement_error(self, identity: Identity) -> str | None:
        return (
            None
            if self.identities.ids.contains(identity.id)
            else (f"identity {identity.id} is outside the CRD store's range {self.identities.ids}")
        )

    # -- writes ----------------------------------------------------------------------

    async def write_identity(self, identity: Identity, users: Sequence[NodeName]) -> str | None:
        """Create the Identity under its number (its references are the Endpoints)."""
        del users
        same_labels = await self.identities.lookup(identity.labels)
        if same_labels is not None and same_labels.value.id != identity.id:
            return (
                f"labels {identity.labels} are identity {same_labels.value.id} in CRD mode, "
                f"not {identity.id}"
            )
        try:
            await self.client.create(IDENTITIES, identity_object(identity))
            return None
        except AlreadyExists:
            pass
        found = await self.identities.get(identity.id)
        if found is not None and found.value == identity:
            return None
        shown = found.value.labels if found is not None else "(unreadable)"
        return f"identity {identity.id} is labels {shown} in CRD mode, not {identity.labels}"

    async def write_node(self, node: Node) -> str | None:
        spec: JSON = {
            "addresses": [{"type": "InternalIP", "ip": str(ip)} for ip in node.ips],
            "bootID": node.boot_id,
            "podCIDRs": [str(c) for c in node.pod_cidrs],
        }
        try:
            await self.client.create(NODES, node_object(node.name, spec))
            return None
        except AlreadyExists:
            pass
        found = await self.node_store.get(node.name)
        if found is not None and found.value == node:
            return None
        if (
            found is not None
            and not found.value.pod_cidrs
            and replace(found.value, pod_cidrs=node.pod_cidrs) == node
        ):
            # only the operator's spec.podCIDRs missing (another mode's operator gave the
            # CIDR): set it, guarded by what was read
            patch: JSON = {
                "metadata": {"resourceVersion": str(found.version)},
                "spec": {"podCIDRs": [str(c) for c in node.pod_cidrs]},
            }
            try:
                await self.client.patch(NODES, node.name, patch)
            except Conflict:
                return f"node {node.name} changed while its pod CIDRs were copied"
            return None
        return f"node {node.name} exists with other addresses, boot ID or pod CIDRs"

    async def write_claim(self, claim: CIDRClaim) -> str | None:
        try:
            await self.client.create(POD_CIDRS, claim_object(claim))
            return None
        except AlreadyExists:
            pass
        current = await self.client.get_or_none(POD_CIDRS, cidr_name(claim.pool, claim.cidr))
        if current is not None and (current.get("spec") or {}).get("node") == str(claim.node):
            return None
        return f"CIDR {claim.cidr} of pool {claim.pool} is claimed by another node"

    async def write_leases(self, node: NodeName, leases: Sequence[IPLease]) -> str | None:
        """Add the leases to the Node's status (a bare Node is created when absent)."""
        wanted = {str(lease.ip): str(lease.owner) for lease in leases}

        async def step() -> str | None:
            current = await self.client.get_or_none(NODES, node)
            if current is None:
                try:
                    current = await self.client.create(NODES, node_object(node))
                except AlreadyExists:
                    raise Conflict(f"node {node} was created meanwhile", status=409) from None
            status = current.get("status") or {}
            ipam = status.get("ipam") if isinstance(status, dict) else None
            used = dict((ipam or {}).get("used") or {}) if isinstance(ipam, dict) else {}
            put: dict[str, object] = {}
            for ip, owner in wanted.items():
                if ip in used and used[ip] != owner:
                    return f"IP {ip} of node {node} is leased to {used[ip]!r}, not {owner!r}"
                if ip not in used:
                    put[ip] = owner
            if not put:
                return None
            patch: JSON = {
                "metadata": {"resourceVersion": str(meta_of(current).get("resourceVersion", ""))},
                "status": {"ipam": {"used": put, "usedCount": len(used) + len(put)}},
            }
            await self.client.patch(NODES, node, patch, subresource="status")
            return None

        return await on_conflict(step, f"copy IP leases of node {node}")

    async def write_endpoints(self, endpoints: Sequence[Endpoint]) -> str | None:
        """Every address of one pod (``endpoints`` share namespace, name, node)."""
        first = endpoints[0]
        key = f"{first.namespace}/{first.name}"

        async def step() -> str | None:
            current = await self.client.get_or_none(ENDPOINTS, first.name, first.namespace)
            addressing: dict[str, JSON] = {}
            if current is not None:
                spec = current.get("spec") or {}
                if (
                    spec.get("node") != str(first.node)
                    or (spec.get("identity") or {}).get("id") != int(first.identity)
                    or spec.get("hostIP") != str(first.host_ip)
                ):
                    return f"endpoint {key} exists for another node, identity or host IP"
                addressing = {str(e.get("family")): e for e in spec.get("addressing") or []}
            for endpoint in endpoints:
                family = _FAMILIES[endpoint.ip.version]
                there = addressing.get(family)
                if there is not None and there.get("ip") != str(endpoint.ip):
                    return f"endpoint {key} has {there.get('ip')}, not {endpoint.ip}"
                addressing[family] = {
                    "family": family,
                    "ip": str(endpoint.ip),
                    "prefixLen": endpoint.prefix_len,
                }
            spec = {
                "addressing": [addressing[f] for f in sorted(addressing)],
                "identity": {"id": int(first.identity)},
                "node": str(first.node),
                "hostIP": str(first.host_ip),
            }
            if current is not None and current.get("spec") == spec:
                return None
            labels = _labels_for(first.node, spec)
            body: JSON = {"apiVersion": ENDPOINTS.api_version, "kind": ENDPOINTS.kind, "spec": spec}
            if current is None:
                body["metadata"] = {
                    "name": first.name,
                    "namespace": first.namespace,
                    "labels": labels,
                }
                try:
                    await self.client.create(ENDPOINTS, body)
                except AlreadyExists:
                    raise Conflict(f"endpoint {key} was created meanwhile", status=409) from None
                return None
            old = meta_of(current)
            body["metadata"] = {**old, "labels": {**(old.get("labels") or {}), **labels}}
            await self.client.replace(ENDPOINTS, body)
            return None

        return await on_conflict(step, f"copy endpoint {key}")

    async def write_policy(self, policy: NetworkPolicy) -> str | None:
        body: JSON = {
            "apiVersion": NETWORK_POLICIES.api_version,
            "kind": NETWORK_POLICIES.kind,
            "metadata": {"name": policy.name, "namespace": policy.namespace},
            "spec": policy_spec(policy),
        }
        try:
            await self.client.create(NETWORK_POLICIES, body)
            return None
        except AlreadyExists:
            pass
        found = {v.value.id: v.value for v in await self.policy_store.list()}
        if found.get(policy.id) == policy:
            return None
        return f"policy {policy.id} exists with another spec"

    async def write_service(self, service: Service) -> str | None:
        """A Kubernetes Service and its EndpointSlice (the service store's put), unless
        the Service exists (then it must say the same)."""
        found = {v.value.id: v.value for v in await self.service_store.list()}
        there = found.get(service.id)
        if there is None:
            await self.service_store.put(service)
            return None
        if there == service:
            return None
        return f"service {service.id} exists with another VIP, ports or backends"
