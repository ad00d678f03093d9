"""IPAM as objects: pod CIDRs as ``PodCIDR`` objects, a node's IP leases in its ``Node``.

A CIDR claim is a cluster-scoped PodCIDR named by its pool and CIDR
(``default.10.0.1.0-24``; IPv6 as 32 hex digits, ``:`` being no name character), with
spec ``{pool, cidr, node}`` and a pool label. Its create is the atomic claim: a second
claimant of one CIDR, even a paused ex-leader, gets AlreadyExists. A free is a delete
guarded by the resourceVersion the caller read, so a claim that changed is never freed.

A node's IP leases are the map ``status.ipam.used`` (IP -> owning endpoint) of its Node
object, with ``usedCount``: each claim or release is a merge patch of the status guarded by
the resourceVersion it read (a 409 is re-read and retried), so an IP is never leased twice
and the leases outlive the agent (they are in the API server, not in a session). The store
keeps the leases it claimed or adopted in memory and puts them back when the object or the
entries are deleted by hand (:meth:`CrdIPLeaseStore.run`); an IP meanwhile leased to
another endpoint is given up, never overwritten.
"""

from __future__ import annotations

import builtins
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from controlplane.crd.client import JSON, KubeClient
from controlplane.crd.errors import AlreadyExists, Conflict
from controlplane.crd.listwatch import KubeListWatcher, object_revision
from controlplane.crd.names import POD_CIDR_POOL, cidr_name, label_value
from controlplane.crd.nodes import node_object
from controlplane.crd.owner import Repairer
from controlplane.crd.records import ObjectCodec, meta_of, spec_of
from controlplane.crd.resources import NODES, POD_CIDRS
from controlplane.crd.retry import on_conflict
from controlplane.metrics import StoreMetrics
from controlplane.model import (
    EndpointID,
    InvalidRecord,
    IPAddress,
    IPLease,
    ModelError,
    NodeName,
    parse_canonical_ip,
    parse_cidr,
    parse_endpoint_id,
    parse_node_name,
)
from controlplane.store_types import CIDRClaim, StoreEvent, Versioned

__all__ = [
    "CLAIM_RESOURCE",
    "LEASE_RESOURCE",
    "CrdCIDRStore",
    "CrdIPLeaseStore",
    "list_all_claims",
    "list_all_leases",
]

log = logging.getLogger(__name__)

CLAIM_RESOURCE = "cidr-claim"
LEASE_RESOURCE = "ip-lease"

Fence = Callable[[], Awaitable[None]]


def claim_name(claim: CIDRClaim) -> str:
    """The store event name of a claim: the CIDR with ``_`` for ``/`` (as in kvstore mode)."""
    return str(claim.cidr).replace("/", "_")


def _claim_expander(pool: str) -> Callable[[JSON], list[tuple[str, CIDRClaim]]]:
    def expand(obj: JSON) -> list[tuple[str, CIDRClaim]]:
        spec = spec_of(obj)
        if spec.get("pool") != pool:
            return []  # another pool's claim (or a malformed one, counted by its readers)
        cidr = parse_cidr(spec["cidr"])
        if str(cidr) != spec["cidr"]:
            raise InvalidRecord(
                f"PodCIDR {meta_of(obj).get('name')!r}: {spec['cidr']!r} is not canonical"
            )
        claim = CIDRClaim(pool, cidr, parse_node_name(spec["node"]))
        return [(claim_name(claim), claim)]

    return expand


class CrdCIDRStore:
    """Pod CIDR claims of every pool; ``fence`` (the operator's leadership check) is
    awaited before each write."""

    def __init__(
        self, client: KubeClient, metrics: StoreMetrics, *, fence: Fence | None = None
    ) -> None:
        self.client = client
        self.metrics = metrics
        self.fence = fence
        self._codecs: dict[str, ObjectCodec[CIDRClaim]] = {}

    def _codec(self, pool: str) -> ObjectCodec[CIDRClaim]:
        codec = self._codecs.get(pool)
        if codec is None:
            codec = self._codecs[pool] = ObjectCodec(
                CLAIM_RESOURCE, self.metrics, _claim_expander(pool)
            )
        return codec

    async def list(self, pool: str) -> builtins.list[Versioned[CIDRClaim]]:
        # Every claim, filtered by spec.pool (a node count of objects): a claim written
        # without the pool label still counts.
        return self._codec(pool).decode_all((await self.client.list(POD_CIDRS)).items)

    async def claim(self, claim: CIDRClaim) -> bool:
        """Create the claim: False when the CIDR is taken."""
        body: JSON = {
            "apiVersion": POD_CIDRS.api_version,
            "kind": POD_CIDRS.kind,
            "metadata": {
                "name": cidr_name(claim.pool, claim.cidr),
                "labels": {POD_CIDR_POOL: label_value(claim.pool)},
            },
            "spec": {"pool": claim.pool, "cidr": str(claim.cidr), "node": str(claim.node)},
        }
        if self.fence is not None:
            await self.fence()
        try:
            await self.client.create(POD_CIDRS, body)
        except AlreadyExists:
            return False
        return True

    async def free(self, claim: Versioned[CIDRClaim]) -> bool:
        """Delete the claim if unchanged since it was read: False when it changed or is gone."""
        if self.fence is not None:
            await self.fence()
        try:
            return await self.client.delete(
                POD_CIDRS,
                cidr_name(claim.value.pool, claim.value.cidr),
                resource_version=str(claim.version),
            )
        except Conflict:
            return False

    def watch(self, pool: str) -> AsyncIterator[StoreEvent[CIDRClaim]]:
        """List-then-watch the claims of ``pool`` (named by CIDR, ``_`` for ``/``)."""
        return self._codec(pool).watch(KubeListWatcher(self.client, POD_CIDRS))


async def list_all_leases(client: KubeClient, metrics: StoreMetrics) -> list[Versioned[IPLease]]:
    """Every node's IP leases (from every Node's status), sorted by node then IP."""
    out: list[Versioned[IPLease]] = []
    codec: ObjectCodec[IPLease] = ObjectCodec(LEASE_RESOURCE, metrics, lambda _: [])
    for obj in (await client.list(NODES)).items:
        name = str((obj.get("metadata") or {}).get("name", ""))
        try:
            node = parse_node_name(name)
        except ModelError as exc:
            codec.skip(name, exc)
            continue
        out.extend(_leases_of(obj, node, codec))
    out.sort(key=lambda v: (v.value.node, v.value.ip.version, int(v.value.ip)))
    return out


async def list_all_claims(
    client: KubeClient, metrics: StoreMetrics, pool: str = "default"
) -> list[Versioned[CIDRClaim]]:
    """Every claim of ``pool``, sorted by CIDR."""
    claims = await CrdCIDRStore(client, metrics).list(pool)
    claims.sort(key=lambda v: (v.value.cidr.version, int(v.value.cidr.network_address)))
    return claims


def _leases_of(obj: JSON, node: NodeName, codec: ObjectCodec[IPLease]) -> list[Versioned[IPLease]]:
    version = object_revision(obj)
    out: list[Versioned[IPLease]] = []
    for text, owner in _used(obj).items():
        try:
            lease = IPLease(node=node, ip=parse_canonical_ip(text), owner=parse_endpoint_id(owner))
        except ModelError as exc:
            codec.skip(f"{node}/status.ipam.used[{text}]", exc)
            continue
        out.append(Versioned(lease, version))
    return out


def _used(obj: JSON) -> dict[str, object]:
    status = obj.get("status")
    ipam = status.get("ipam") if isinstance(status, dict) else None
    used = ipam.get("used") if isinstance(ipam, dict) else None
    return dict(used) if isinstance(used, dict) else {}


class CrdIPLeaseStore:
    """The IP leases of one node, in its Node object's status. Run :meth:`run` in the
    node's TaskGroup (self-repair)."""

    def __init__(self, client: KubeClient, metrics: StoreMetrics, *, node: NodeName) -> None:
        self.client = client
        self.metrics = metrics
        self.node = parse_node_name(node)
        self.codec: ObjectCodec[IPLease] = ObjectCodec(LEASE_RESOURCE, metrics, lambda _: [])
        self._wanted: dict[str, EndpointID] = {}
        """IP (canonical text) -> owner: the leases this store claimed or adopted."""
        self.repairer = Repairer(
            f"IP leases of {node}",
            lambda: KubeListWatcher(client, NODES, field_selector=f"metadata.name={node}"),
            lambda: [self.node] if self._wanted else [],
            lambda _key, obj: self._missing(obj) == {},
            lambda _key: self._reassert(repair=True),
        )

    async def run(self) -> None:
        await self.repairer.run()

    def _check(self, lease: IPLease) -> None:
        if lease.node != self.node:
            raise ValueError(f"lease of node {lease.node} given to the store of {self.node}")

    async def list(self) -> builtins.list[Versioned[IPLease]]:
        obj = await self.client.get_or_none(NODES, self.node)
        if obj is None:
            return []
        out = _leases_of(obj, self.node, self.codec)
        out.sort(key=lambda v: (v.value.ip.version, int(v.value.ip)))
        return out

    async def claim(self, lease: IPLease) -> bool:
        """Record the lease unless the IP is leased to another endpoint; False when it is."""
        self._check(lease)
        ip, owner = str(lease.ip), lease.owner

        async def step() -> bool:
            current = await self._node_object()
            used = _used(current)
            if ip in used:
                return used[ip] == owner
            used[ip] = owner
            await self._patch(current, {ip: owner}, len(used))
            return True

        taken = await on_conflict(step, f"lease {ip} on node {self.node}")
        if taken:
            self._wanted[ip] = owner
        return taken

    async def adopt(self, leases: Sequence[IPLease]) -> None:
        """Keep leases this node wrote before a restart (they are still in its status;
        any that went missing is put back unless the IP was leased to another endpoint)."""
        for lease in leases:
            self._check(lease)
            self._wanted[str(lease.ip)] = lease.owner
        await self._reassert(repair=False)

    async def release(self, ip: IPAddress) -> None:
        text = str(ip)
        self._wanted.pop(text, None)

        async def step() -> None:
            current = await self.client.get_or_none(NODES, self.node)
            if current is None:
                return
            used = _used(current)
            if text not in used:
                return
            del used[text]
            await self._patch(current, {text: None}, len(used))

        await on_conflict(step, f"release {ip} on node {self.node}")

    # -- internals -------------------------------------------------------------------

    def _missing(self, obj: JSON | None) -> dict[str, EndpointID]:
        used = _used(obj) if obj is not None else {}
        return {ip: owner for ip, owner in self._wanted.items() if used.get(ip) != owner}

    async def _reassert(self, *, repair: bool) -> None:
        async def step() -> int:
            if repair:
                # A repair waits for the Node object: after a kubectl delete the node
                # store re-creates it (an event that brings us back); after deregister
                # nobody should.
                found = await self.client.get_or_none(NODES, self.node)
                if found is None:
                    return 0
                current = found
            else:
                current = await self._node_object()
            used = _used(current)
            missing = self._missing(current)
            put: dict[str, object] = {}
            for ip, owner in missing.items():
                if ip in used:
                    log.warning(
                        "IP %s of node %s is leased to %r now; %r gives it up",
                        ip,
                        self.node,
                        used[ip],
                        owner,
                    )
                    self._wanted.pop(ip, None)
                    continue
                put[ip] = owner
            if put:
                await self._patch(current, put, len(used) + len(put))
            return len(put)

        restored = await on_conflict(step, f"IP leases of node {self.node}")
        if repair and restored:
            log.info(
                "%d IP lease(s) of node %s were deleted by someone else; restored",
                restored,
                self.node,
            )
            self.metrics.repairs.labels(LEASE_RESOURCE, "deleted").inc(restored)

    async def _node_object(self) -> JSON:
        """This node's object; a bare one is created when it does not exist (yet)."""
        current = await self.client.get_or_none(NODES, self.node)
        if current is not None:
            return current
        try:
            return await self.client.create(NODES, node_object(self.node))
        except AlreadyExists:
            raise Conflict(f"node {self.node} was created meanwhile", status=409) from None

    async def _patch(self, current: JSON, changes: dict[str, object], count: int) -> None:
        patch: JSON = {
            "metadata": {"resourceVersion": str(meta_of(current).get("resourceVersion", ""))},
            "status": {"ipam": {"used": changes, "usedCount": count}},
        }
        await self.client.patch(NODES, self.node, patch, subresource="status")
