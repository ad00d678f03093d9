"""Endpoints in kvstore mode: ``cp/state/ip/v1/<cluster>/<ip>``, one key per IP.

Each node publishes its own endpoints on the endpoints shard its name hashes to (so one
node's endpoints share a shard and a lease pool); readers merge every shard. Values are
``endpoint`` envelopes of :meth:`Endpoint.to_dict`.

Keys are owned through the node's :class:`KeyOwner`: leased, re-created after a lease
loss, and repaired when someone deletes or overwrites them; a write or delete that failed
with an unknown outcome is withdrawn by the owner once etcd answers. The agent's endpoint
watch (:meth:`KvEndpointStore.watch_ip_identities`) feeds that repair: one watch of the
prefix per agent. The IP key is global, so every
write is a transaction that succeeds only while the key is absent or already ours (on one
of our leases, or a record of our node). Another node's record is never overwritten: the
write raises :class:`IPConflict` and the key is disowned, whether the write came from
:meth:`KvEndpointStore.upsert` or from a repair. A value that does not decode belongs to
nobody and is overwritten.

The guard is per etcd cluster: two nodes on different endpoint shards cannot see each
other's keys, so cross-shard uniqueness rests on IPAM (disjoint per-node CIDRs).
"""

from __future__ import annotations

import builtins
import logging
import time
from collections.abc import AsyncIterator

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
    WatchEvent,
    absent,
    mod_revision_is,
)
from controlplane.metrics import StoreMetrics
from controlplane.model import (
    Endpoint,
    EndpointRecord,
    InvalidRecord,
    IPAddress,
    IPIdentity,
    ModelError,
    NodeFields,
    NodeName,
    ip_identity_from_dict,
    ip_identity_from_record,
    parse_canonical_ip,
)
from controlplane.store_types import AddressConflict, StoreEvent, Versioned

__all__ = ["ENDPOINT_KIND", "ENDPOINT_RESOURCE", "IPConflict", "KvEndpointStore", "ReadOnlyStore"]

log = logging.getLogger(__name__)

ENDPOINT_KIND = "endpoint"
"""The envelope kind of endpoint values."""
ENDPOINT_RESOURCE = "endpoint"
"""The ``resource`` label of the malformed and repair metrics."""

_MAX_ATTEMPTS = 10
"""Guarded writes re-read and retry this often while the key keeps changing under them."""


class ReadOnlyStore(RuntimeError):
    """A write method was called on a store built without an owner (a read-only view)."""


class IPConflict(KvstoreError, AddressConflict):
    """The IP's key holds another node's endpoint; it was not overwritten.

    A :class:`KvstoreError` so that :class:`KeyOwner`'s repair path logs it and carries on;
    the key is no longer owned by this node when it is raised.
    """

    def __init__(self, ip: str, holder: NodeName, node: NodeName, *, endpoint: str) -> None:
        super().__init__(
            f"IP {ip} is already published by node {holder!r}; node {node!r} did not overwrite it",
            endpoint=endpoint,
        )
        self.ip = ip
        self.holder = holder
        self.node = node


class KvEndpointStore:
    """The kvstore :class:`~controlplane.store.EndpointStore` of one node (or a read-only view).

    Build it before ``owners.run()`` starts (it registers the repair watch). With
    ``owners=None`` and ``node=None`` it only lists and watches; writes raise
    :class:`ReadOnlyStore`.
    """

    def __init__(
        self,
        shards: ShardMap,
        layout: KeyLayout,
        metrics: StoreMetrics,
        owners: Owners | None,
        *,
        node: NodeName | None,
        cluster: str = "default",
    ) -> None:
        if (owners is None) != (node is None):
            raise ValueError("KvEndpointStore: pass both owners and node, or neither (read-only)")
        self.shards = shards
        self.layout = layout
        self.node = node
        self.cluster = cluster
        self.prefix = layout.ip_prefix(cluster)
        self.codec = RecordCodec(ENDPOINT_RESOURCE, ENDPOINT_KIND, metrics)
        self._records = codec.typed_decoder(ENDPOINT_KIND, EndpointRecord)
        self._node_fields = NodeFields()
        self._owner: KeyOwner | None = None
        self._backend: EtcdBackend | None = None
        self._issued: dict[bytes, float] = {}
        """key -> when its last write was issued (``upsert``'s return; repairs leave one)."""
        if owners is not None and node is not None:
            self._backend = shards.shard_for("endpoints", node)
            self._owner = owners.for_backend(self._backend)
            self._owner.repair_under(self.prefix)

    # -- writes (this node's endpoints) ----------------------------------------------

    async def upsert(self, endpoint: Endpoint) -> float:
        """Publish one of this node's endpoints; raises :class:`IPConflict` when the IP's
        key holds another node's endpoint, ``ValueError`` for another node's endpoint."""
        owner, node = self._writer("upsert")
        if endpoint.node != node:
            raise ValueError(
                f"endpoint {endpoint.ip} belongs to node {endpoint.node!r}; "
                f"this store publishes node {node!r} only"
            )
        value = self.codec.encode(endpoint.to_dict())
        key = self.key(endpoint.ip)
        started = time.monotonic()
        await owner.put(key, value, resource=ENDPOINT_RESOURCE, write=self._put)
        # _put stamped its transaction under the key's lock, and nothing ran since
        return self._issued.pop(key, started)

    async def remove(self, ip: IPAddress) -> None:
        """Withdraw this node's endpoint at ``ip``; another node's record is left alone."""
        owner, node = self._writer("remove")
        key = self.key(ip)
        self._issued.pop(key, None)
        if owner.owns(key):
            await owner.delete(key)
            return
        # Not owned in memory: delete a record of ours left from before a restart.
        backend = owner.backend
        current = await backend.get(key)
        for _ in range(_MAX_ATTEMPTS):
            if current is None or self._claimant(owner, current) != node:
                return
            guard = mod_revision_is(key, current.mod_revision)
            result = await backend.txn([guard], [Delete(key)], [Get(key)])
            if result.succeeded:
                return
            current = _first(result.results[0].kvs)
        raise KvstoreError(f"removing {key!r}: the key kept changing", endpoint=backend.name)

    def key(self, ip: IPAddress) -> bytes:
        return self.layout.ip(self.cluster, str(ip))

    # -- reads (every node's endpoints) ----------------------------------------------

    async def list(self) -> list[Versioned[Endpoint]]:
        kvs = await self.shards.list_prefix("endpoints", self.prefix)
        return self.codec.decode_all(kvs, self.prefix, self._build)

    def watch(self) -> AsyncIterator[StoreEvent[Endpoint]]:
        return self.codec.watch(self.shards, "endpoints", self.prefix, self._build)

    async def watch_ip_identities(self) -> AsyncIterator[builtins.list[StoreEvent[IPIdentity]]]:
        """Every node's endpoints as ipcache pairs. With an owner, this watch also feeds the
        repair of this node's endpoint keys (one watch of the prefix, not two)."""
        owner = self._owner
        if owner is None:
            async for batch in self.codec.watch_batches(
                self.shards, "endpoints", self.prefix, self.build_ip_identity
            ):
                yield batch
            return
        mine = owner.backend.name
        with owner.feeding(self.prefix) as observe:

            def tap(shard: str, events: builtins.list[WatchEvent]) -> None:
                if shard == mine:
                    observe(events)

            async for batch in self.codec.watch_batches(
                self.shards, "endpoints", self.prefix, self.build_ip_identity, tap=tap
            ):
                yield batch

    # -- internals -------------------------------------------------------------------

    def _writer(self, what: str) -> tuple[KeyOwner, NodeName]:
        if self._owner is None or self.node is None:
            raise ReadOnlyStore(f"cannot {what} endpoints: this endpoint store is read-only")
        return self._owner, self.node

    def _build(self, name: str, raw: bytes) -> Endpoint:
        ip = parse_canonical_ip(name)
        endpoint = Endpoint.from_dict(self.codec.payload(raw))
        if endpoint.ip != ip:
            raise InvalidRecord(f"endpoint at key {name} has ip {endpoint.ip}")
        return endpoint

    def build_ip_identity(self, name: str, raw: bytes) -> IPIdentity:
        """:meth:`_build`'s checks, for the ipcache's view of the record."""
        text: str | None = None
        try:
            record = self._records(raw)
            pair, text = ip_identity_from_record(record, self._node_fields), record.ip
        except (codec.DecodeError, ModelError):
            pair = ip_identity_from_dict(self.codec.payload(raw))  # decides, and says why
        # An IPv4 text that parsed is canonical: the key names the record's ip when equal.
        if (text != name or len(pair.ip) != 4) and parse_canonical_ip(name).packed != pair.ip:
            raise InvalidRecord(f"endpoint at key {name} has another ip")
        return pair

    def _claimant(self, owner: KeyOwner, kv: KeyValue) -> NodeName | None:
        """The node that holds ``kv``: us when it is on one of our leases, else the node
        its record names; None when the value does not decode (nobody's)."""
        if kv.lease and kv.lease in owner.leases.leases and self.node is not None:
            return self.node
        try:
            return Endpoint.from_dict(self.codec.payload(kv.value)).node
        except (codec.DecodeError, ModelError) as exc:
            log.warning("endpoint key %r holds an undecodable value (%s); taking it", kv.key, exc)
            return None

    async def _put(self, key: bytes, value: bytes, lease: int) -> None:
        """KeyOwner's write: put only while the key is absent or ours (else IPConflict)."""
        owner, node = self._writer("upsert")
        backend = owner.backend
        current = await backend.get(key)
        for _ in range(_MAX_ATTEMPTS):
            guard: Compare
            if current is None:
                guard = absent(key)
            else:
                holder = self._claimant(owner, current)
                if holder is not None and holder != node:
                    owner.disown(key)
                    ip = key[len(self.prefix) :].decode("utf-8", errors="replace")
                    log.warning("IP %s is held by node %r; node %r gives it up", ip, holder, node)
                    raise IPConflict(ip, holder, node, endpoint=backend.name)
                guard = mod_revision_is(key, current.mod_revision)
            self._issued[key] = time.monotonic()
            result = await backend.txn([guard], [Put(key, value, lease)], [Get(key)])
            if result.succeeded:
                return
            current = _first(result.results[0].kvs)
        self._issued.pop(key, None)
        raise KvstoreError(f"writing {key!r}: the key kept changing", endpoint=backend.name)


def _first(kvs: tuple[KeyValue, ...]) -> KeyValue | None:
    return kvs[0] if kvs else None
