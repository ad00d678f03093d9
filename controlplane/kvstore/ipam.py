"""IPAM in etcd: per-node pod CIDRs cut from a pool, and each node's IP leases.

CIDR claims (``cp/state/ipam/v1/cidrs/<pool>/<cidr>``, envelope ``cidr-claim``
``{"node": ...}``) are written by the operator leader. Every claim of one pool lives on the
ipam shard picked by the *pool name*, so a create-only transaction (``absent(key)``) is
enough to keep a CIDR from being given twice; the leader's fence compares ride in the same
transaction, so a deposed leader's claim or free is refused (:class:`Fenced`).

IP leases (``cp/state/ipam/v1/leases/<node>/<ip>``, envelope ``ip-lease``
``{"owner": <endpoint id>}``) are written by the node's agent on the ipam shard picked by
the node name. A lease is created only when the IP is free, attached to one of the node's
etcd leases, re-created after a lease loss and repaired when someone else deletes it
(:class:`~controlplane.kvstore.owner.KeyOwner`). Re-creation is create-only as well: a key
that reappeared with another endpoint's value is never overwritten (:class:`LeaseTaken`).
"""

from __future__ import annotations

import builtins
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from controlplane import codec
from controlplane.kvstore.backend import EtcdBackend
from controlplane.kvstore.errors import KvstoreError
from controlplane.kvstore.keys import KeyLayout
from controlplane.kvstore.owner import KeyOwner, Owners
from controlplane.kvstore.records import RecordCodec
from controlplane.kvstore.shards import ShardMap
from controlplane.kvstore.types import (
    Compare,
    Delete,
    Get,
    KeyValue,
    Put,
    absent,
    mod_revision_is,
)
from controlplane.metrics import StoreMetrics
from controlplane.model import (
    IPAddress,
    IPLease,
    IPNetwork,
    NodeName,
    parse_canonical_ip,
    parse_cidr,
    parse_endpoint_id,
    parse_node_name,
)
from controlplane.store_types import CIDRClaim, StoreEvent, Versioned

log = logging.getLogger(__name__)

KIND = "ipam"
CLAIM_RESOURCE = "cidr-claim"
CLAIM_KIND = "cidr-claim"
LEASE_RESOURCE = "ip-lease"
LEASE_KIND = "ip-lease"
_WRITE_ATTEMPTS = 8

Fence = Callable[[], Sequence[Compare]]


class Fenced(KvstoreError):
    """The fence compares failed: the writer is no longer the leader; nothing was written."""


class LeaseTaken(KvstoreError):
    """The IP's lease key holds another endpoint's lease (or an unreadable value)."""


# --- values and names ------------------------------------------------------------------


def _claim_value(node: NodeName) -> bytes:
    return codec.encode(CLAIM_KIND, {"node": str(node)})


def _lease_value(lease: IPLease) -> bytes:
    return codec.encode(LEASE_KIND, {"owner": str(lease.owner)})


def _payload_field(payload: Any, kind: str, name: str) -> object:
    if not isinstance(payload, dict) or name not in payload:
        raise codec.DecodeError(f"{kind}: missing field {name!r}")
    return payload[name]


def _cidr_name(name: str) -> IPNetwork:
    cidr = parse_cidr(name.replace("_", "/"))
    if _cidr_component(cidr) != name:
        raise ValueError(f"CIDR {name!r} is not in canonical form")
    return cidr


def _cidr_component(cidr: IPNetwork) -> str:
    return str(cidr).replace("/", "_")


def _claim_builder(pool: str) -> Callable[[str, bytes], CIDRClaim]:
    def build(name: str, raw: bytes) -> CIDRClaim:
        node = parse_node_name(_payload_field(codec.decode(CLAIM_KIND, raw), CLAIM_KIND, "node"))
        return CIDRClaim(pool, _cidr_name(name), node)

    return build


def _lease_builder(node: NodeName) -> Callable[[str, bytes], IPLease]:
    def build(name: str, raw: bytes) -> IPLease:
        owner = parse_endpoint_id(
            _payload_field(codec.decode(LEASE_KIND, raw), LEASE_KIND, "owner")
        )
        return IPLease(node=node, ip=parse_canonical_ip(name), owner=owner)

    return build


# --- CIDR claims (operator) ------------------------------------------------------------


class KvCIDRStore:
    """Pod CIDR claims of every pool; writes carry the leader's fence compares."""

    def __init__(
        self,
        shards: ShardMap,
        layout: KeyLayout,
        metrics: StoreMetrics,
        *,
        fence: Fence = lambda: (),
    ) -> None:
        self.shards = shards
        self.layout = layout
        self.codec = RecordCodec(CLAIM_RESOURCE, CLAIM_KIND, metrics)
        self._fence = fence

    def backend_for(self, pool: str) -> EtcdBackend:
        """The cluster that holds every claim of ``pool``."""
        return self.shards.shard_for(KIND, pool)

    async def list(self, pool: str) -> builtins.list[Versioned[CIDRClaim]]:
        prefix = self.layout.ipam_cidr_prefix(pool)
        result = await self.backend_for(pool).list_prefix(prefix)
        return self.codec.decode_all(list(result.kvs), prefix, _claim_builder(pool))

    async def claim(self, claim: CIDRClaim) -> bool:
        """Create the claim if the CIDR is free: False when taken; :class:`Fenced` when the
        fence compares fail (not the leader any more)."""
        key = self.layout.ipam_cidr(claim.pool, str(claim.cidr))
        fence = list(self._fence())
        result = await self.backend_for(claim.pool).txn(
            [absent(key), *fence], [Put(key, _claim_value(claim.node))], [Get(key)]
        )
        if result.succeeded:
            return True
        if result.results[0].kvs or not fence:
            return False  # the CIDR is taken (the fence may also have failed: next write says)
        raise Fenced(f"claim of {claim.cidr} for {claim.node} refused: fence compares failed")

    async def free(self, claim: Versioned[CIDRClaim]) -> bool:
        """Delete the claim if unchanged since read: False when it changed or is gone;
        :class:`Fenced` when the fence compares fail."""
        key = self.layout.ipam_cidr(claim.value.pool, str(claim.value.cidr))
        fence = list(self._fence())
        result = await self.backend_for(claim.value.pool).txn(
            [mod_revision_is(key, claim.version), *fence], [Delete(key)], [Get(key)]
        )
        if result.succeeded:
            return True
        kvs = result.results[0].kvs
        if not kvs or kvs[0].mod_revision != claim.version or not fence:
            return False
        raise Fenced(f"free of {claim.value.cidr} refused: fence compares failed")

    def watch(self, pool: str) -> AsyncIterator[StoreEvent[CIDRClaim]]:
        """List-then-watch the claims of ``pool`` (names are CIDRs with ``_`` for ``/``)."""
        prefix = self.layout.ipam_cidr_prefix(pool)
        return self.codec.watch(self.shards, KIND, prefix, _claim_builder(pool))


# --- IP leases (agent) -----------------------------------------------------------------


class KvIPLeaseStore:
    """The IP leases of one node, owned (leased, re-created, repaired) by that node.

    Create the store before :meth:`Owners.run` starts: it registers the node's lease prefix
    for self-repair.
    """

    def __init__(
        self,
        shards: ShardMap,
        layout: KeyLayout,
        metrics: StoreMetrics,
        owners: Owners,
        *,
        node: NodeName,
    ) -> None:
        self.node = parse_node_name(node)
        self.layout = layout
        self.codec = RecordCodec(LEASE_RESOURCE, LEASE_KIND, metrics)
        self.backend = shards.shard_for(KIND, self.node)
        self.prefix = layout.ipam_node_leases(self.node)
        self.owner: KeyOwner = owners.for_backend(self.backend)
        self.owner.repair_under(self.prefix)

    def _key(self, ip: IPAddress) -> bytes:
        return self.layout.ipam_lease(self.node, str(ip))

    def _check(self, lease: IPLease) -> None:
        if lease.node != self.node:
            raise ValueError(f"lease of node {lease.node} given to the store of {self.node}")

    async def list(self) -> builtins.list[Versioned[IPLease]]:
        result = await self.backend.list_prefix(self.prefix)
        return self.codec.decode_all(list(result.kvs), self.prefix, _lease_builder(self.node))

    async def claim(self, lease: IPLease) -> bool:
        """Create the lease if the IP is free (ours already with the same owner counts)."""
        self._check(lease)
        key = self._key(lease.ip)
        value = _lease_value(lease)
        try:
            await self.owner.put(key, value, resource=LEASE_RESOURCE, write=self._write)
        except LeaseTaken:
            self.owner.disown(key)
            return False
        except BaseException:
            # The write may or may not have landed: the owner deletes it once etcd answers.
            self.owner.abandon(key)
            raise
        return True

    async def adopt(self, leases: Sequence[IPLease]) -> None:
        """Re-attach leases written before a restart to this session (same values)."""
        for lease in leases:
            self._check(lease)
            key = self._key(lease.ip)
            try:
                await self.owner.put(
                    key, _lease_value(lease), resource=LEASE_RESOURCE, write=self._write
                )
            except LeaseTaken as exc:
                self.owner.disown(key)
                log.warning("cannot adopt the lease of %s for %s: %s", lease.ip, lease.owner, exc)

    async def release(self, ip: IPAddress) -> None:
        await self.owner.delete(self._key(ip))

    async def _write(self, key: bytes, value: bytes, lease: int) -> None:
        """Create-only put on ``lease``; an existing key with our value is re-attached to
        ``lease``; any other value raises :class:`LeaseTaken`.

        KeyOwner uses this for the first write and for every re-creation and repair.
        """
        for _ in range(_WRITE_ATTEMPTS):
            result = await self.backend.txn([absent(key)], [Put(key, value, lease)], [Get(key)])
            if result.succeeded:
                return
            kvs = result.results[0].kvs
            if not kvs:
                continue  # deleted in between
            current = kvs[0]
            if current.value != value:
                raise LeaseTaken(_taken_message(key, current), endpoint=self.backend.name)
            if current.lease == lease:
                return
            moved = await self.backend.txn(
                [mod_revision_is(key, current.mod_revision)], [Put(key, value, lease)]
            )
            if moved.succeeded:
                return
        raise KvstoreError(f"lease key {key!r} kept changing; gave up", endpoint=self.backend.name)


def _taken_message(key: bytes, current: KeyValue) -> str:
    try:
        owner = _payload_field(codec.decode(LEASE_KIND, current.value), LEASE_KIND, "owner")
        return f"{key.decode(errors='replace')} is leased to {owner!r}"
    except codec.DecodeError:
        return f"{key.decode(errors='replace')} holds a value that is not an ip-lease"


# --- read-only views (cpctl) -----------------------------------------------------------


async def list_all_leases(
    shards: ShardMap, layout: KeyLayout, metrics: StoreMetrics
) -> list[Versioned[IPLease]]:
    """Every node's IP leases on every ipam shard, sorted by node then IP."""
    codec_ = RecordCodec(LEASE_RESOURCE, LEASE_KIND, metrics)
    root = layout.ipam_leases_prefix
    out: list[Versioned[IPLease]] = []
    for kv in await shards.list_prefix(KIND, root):
        node_part, slash, _ = kv.key[len(root) :].partition(b"/")
        try:
            node = parse_node_name(node_part.decode("utf-8"))
            if not slash:
                raise ValueError("not a lease key (no node component)")
        except (ValueError, UnicodeDecodeError) as exc:
            codec_.skip(kv.key, exc)
            continue
        lease = codec_.decode(kv.key, layout.ipam_node_leases(node), kv.value, _lease_builder(node))
        if lease is not None:
            out.append(Versioned(lease, kv.mod_revision))
    out.sort(key=lambda v: (v.value.node, v.value.ip.version, int(v.value.ip)))
    return out


async def list_all_claims(
    shards: ShardMap, layout: KeyLayout, metrics: StoreMetrics, pool: str = "default"
) -> list[Versioned[CIDRClaim]]:
    """Every claim of ``pool``, read from every ipam shard (a claim on a shard other than
    the pool's is shown too: it would be invisible to the allocator)."""
    codec_ = RecordCodec(CLAIM_RESOURCE, CLAIM_KIND, metrics)
    prefix = layout.ipam_cidr_prefix(pool)
    kvs = await shards.list_prefix(KIND, prefix)
    claims = codec_.decode_all(kvs, prefix, _claim_builder(pool))
    claims.sort(key=lambda v: (v.value.cidr.version, int(v.value.cidr.network_address)))
    return claims
