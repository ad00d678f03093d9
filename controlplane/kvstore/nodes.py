"""Node records in kvstore mode: ``cp/state/nodes/v1/<cluster>/<node>``.

A node's record lives on every etcd cluster (every shard a node may use), written through
that cluster's :class:`KeyOwner`: leased, re-created after a lease loss, repaired after an
outside delete or overwrite. Readers read the clusters of the ``nodes`` kind; when a node
is found on several of them, the copy on the first (in shard order) wins, so ``list``
returns one entry per node and ``watch`` one stream of changes per node.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Iterable

from controlplane.kvstore.endpoints import ReadOnlyStore
from controlplane.kvstore.keys import KeyLayout
from controlplane.kvstore.owner import KeyOwner, Owners
from controlplane.kvstore.records import RecordCodec
from controlplane.kvstore.shards import ShardMap
from controlplane.kvstore.types import EventType
from controlplane.metrics import StoreMetrics
from controlplane.model import InvalidRecord, Node, NodeName, parse_node_name
from controlplane.store_types import EventKind, StoreEvent, Versioned

__all__ = ["NODE_KIND", "NODE_RESOURCE", "KvNodeStore"]

log = logging.getLogger(__name__)

NODE_KIND = "node"
"""The envelope kind of node values."""
NODE_RESOURCE = "node"
"""The ``resource`` label of the malformed and repair metrics."""


class KvNodeStore:
    """The kvstore :class:`~controlplane.store.NodeStore` of one node (or a read-only view).

    Build it before ``owners.run()`` starts (it registers an owner and a repair watch on
    every cluster). With ``owners=None`` and ``node=None`` it only reads; writes raise
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
            raise ValueError("KvNodeStore: pass both owners and node, or neither (read-only)")
        self.shards = shards
        self.layout = layout
        self.node = node
        self.cluster = cluster
        self.prefix = layout.node_prefix(cluster)
        self.codec = RecordCodec(NODE_RESOURCE, NODE_KIND, metrics)
        self._owners: list[KeyOwner] = []
        if owners is not None:
            for backend in shards.all():
                owner = owners.for_backend(backend)
                owner.repair_under(self.prefix)
                self._owners.append(owner)

    # -- writes (this node's record, on every cluster) ------------------------------

    async def register(self, node: Node) -> None:
        """Publish (or update) this node's record on every cluster."""
        name = self._writer("register")
        if node.name != name:
            raise ValueError(f"node {node.name!r} is not this store's node {name!r}")
        key = self.key(name)
        value = self.codec.encode(node.to_dict())
        await _all(owner.put(key, value, resource=NODE_RESOURCE) for owner in self._owners)

    async def deregister(self) -> None:
        """Withdraw this node's record from every cluster."""
        key = self.key(self._writer("deregister"))
        await _all(owner.delete(key) for owner in self._owners)

    def key(self, name: str) -> bytes:
        return self.layout.node(self.cluster, name)

    # -- reads ------------------------------------------------------------------------

    async def get(self, name: NodeName) -> Versioned[Node] | None:
        key = self.key(name)
        for backend in self.shards.shards("nodes"):
            kv = await backend.get(key)
            if kv is None:
                continue
            node = self.codec.decode(kv.key, self.prefix, kv.value, self._build)
            if node is not None:
                return Versioned(node, kv.mod_revision)
        return None

    async def list(self) -> list[Versioned[Node]]:
        kvs = await self.shards.list_prefix("nodes", self.prefix)  # in shard order
        seen: dict[NodeName, Versioned[Node]] = {}
        for item in self.codec.decode_all(kvs, self.prefix, self._build):
            seen.setdefault(item.value.name, item)
        return list(seen.values())

    async def watch(self) -> AsyncIterator[StoreEvent[Node]]:
        """List-then-watch every ``nodes`` cluster, one event per change of a node.

        Built on the merged shard watch (not ``RecordCodec.watch``, which does not say
        which cluster an event came from): a node is deleted once no cluster holds it.
        """
        order = {backend.name: index for index, backend in enumerate(self.shards.shards("nodes"))}
        copies: dict[bytes, dict[str, Node]] = {}
        shown: dict[bytes, Node] = {}
        async for item in self.shards.watch("nodes", self.prefix):
            event = item.event
            if event.type is EventType.LIST_DONE:
                if item.shard == "":
                    yield StoreEvent(EventKind.SYNCED, "", None, event.revision)
                continue
            held = copies.setdefault(event.key, {})
            value = None
            if event.type is EventType.PUT:
                value = self.codec.decode(event.key, self.prefix, event.value, self._build)
            if value is None:  # deleted, or turned malformed: gone from this cluster
                held.pop(item.shard, None)
            else:
                held[item.shard] = value
            name = event.key[len(self.prefix) :].decode("utf-8", errors="replace")
            if not held:
                del copies[event.key]
                previous = shown.pop(event.key, None)
                if previous is not None or event.type is EventType.DELETE:
                    yield StoreEvent(EventKind.DELETE, name, previous, event.revision)
                continue
            current = held[min(held, key=lambda shard: order.get(shard, len(order)))]
            if shown.get(event.key) != current:
                shown[event.key] = current
                yield StoreEvent(EventKind.UPSERT, name, current, event.revision)

    # -- internals -------------------------------------------------------------------

    def _writer(self, what: str) -> NodeName:
        if not self._owners or self.node is None:
            raise ReadOnlyStore(f"cannot {what} a node: this node store is read-only")
        return self.node

    def _build(self, name: str, raw: bytes) -> Node:
        parse_node_name(name)
        node = Node.from_dict(self.codec.payload(raw))
        if node.name != name:
            raise InvalidRecord(f"node record {node.name!r} stored under key {name!r}")
        return node


async def _all(calls: Iterable[Awaitable[None]]) -> None:
    """Run one write per cluster concurrently; wait for all, then raise the first error."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        for extra in errors[1:]:
            log.warning("node write failed on another cluster too: %s", extra)
        raise errors[0]
