"""Sharding: each resource kind maps to one or more etcd clusters; a stable hash picks one.

Like the Kubernetes API server's per-resource etcd overrides, but a kind may also be
spread over several clusters. With one cluster every kind resolves to the same backend,
so the common case costs one connection and no extra work.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from types import TracebackType

import msgspec

from controlplane.config import KvstoreConfig
from controlplane.kvstore.backend import LIST_PAGE_SIZE, EtcdBackend
from controlplane.kvstore.types import EventType, KeyValue, WatchEvent
from controlplane.kvstore.watch import ListWatcher


def stable_hash(routing_key: str | bytes) -> int:
    """A hash that is the same in every process and every Python version."""
    data = routing_key.encode() if isinstance(routing_key, str) else routing_key
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big")


class ShardEvent(msgspec.Struct, frozen=True, gc=False):
    shard: str
    """Name of the cluster the event came from."""
    event: WatchEvent


class ShardMap:
    """The backends of every configured cluster and the kind -> clusters mapping."""

    def __init__(self, config: KvstoreConfig, *, own_connection: bool = False) -> None:
        self.config = config
        probe_key = (config.prefix + ".heartbeat").encode()
        self.backends: dict[str, EtcdBackend] = {
            cluster.name: EtcdBackend(
                cluster, config.client, own_connection=own_connection, probe_key=probe_key
            )
            for cluster in config.clusters
        }

    async def connect(self) -> None:
        for backend in self.backends.values():
            await backend.connect()

    async def close(self) -> None:
        for backend in self.backends.values():
            await backend.close()

    async def __aenter__(self) -> ShardMap:
        try:
            await self.connect()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def prefix(self) -> str:
        return self.config.prefix

    def shards(self, kind: str) -> list[EtcdBackend]:
        """The backends holding ``kind``, in shard order (index = shard number)."""
        return [self.backends[name] for name in self.config.clusters_for(kind)]

    def shard_index(self, kind: str, routing_key: str | bytes) -> int:
        count = len(self.config.clusters_for(kind))
        return 0 if count == 1 else stable_hash(routing_key) % count

    def shard_for(self, kind: str, routing_key: str | bytes) -> EtcdBackend:
        """The backend that owns ``routing_key`` of ``kind``."""
        return self.shards(kind)[self.shard_index(kind, routing_key)]

    def all(self) -> list[EtcdBackend]:
        """Every backend once (heartbeat and health go to each)."""
        return list(self.backends.values())

    async def list_prefix(
        self, kind: str, prefix: bytes, page_size: int = LIST_PAGE_SIZE
    ) -> list[KeyValue]:
        """Every key under ``prefix`` on every shard of ``kind``."""
        results = await asyncio.gather(
            *(b.list_prefix(prefix, page_size=page_size) for b in self.shards(kind))
        )
        return [kv for result in results for kv in result.kvs]

    async def watch(self, kind: str, prefix: bytes) -> AsyncIterator[ShardEvent]:
        """:meth:`watch_batches`, one event at a time."""
        async for shard, batch in self.watch_batches(kind, prefix):
            for event in batch:
                yield ShardEvent(shard, event)

    async def watch_batches(
        self, kind: str, prefix: bytes
    ) -> AsyncIterator[tuple[str, list[WatchEvent]]]:
        """List-then-watch ``prefix`` on every shard of ``kind``, merged, in batches as each
        shard's :meth:`ListWatcher.batches` delivers them: ``(shard name, events)``.

        Each shard's events keep their order; a batch ``("", [LIST_DONE])`` with key
        ``b""`` and the highest list revision follows once every shard has listed
        (per-shard ``LIST_DONE`` events carry the prefix as key).
        """
        backends = self.shards(kind)
        if len(backends) == 1:
            name = backends[0].name
            synced = False
            async for batch in ListWatcher(backends[0], prefix).batches():
                yield name, batch
                if not synced and batch[-1].type is EventType.LIST_DONE:
                    synced = True
                    yield "", [WatchEvent(EventType.LIST_DONE, b"", b"", batch[-1].revision)]
            return
        # A generator must not yield inside a TaskGroup (its errors would cancel whatever
        # the consumer awaits, and closing the generator would raise GeneratorExit inside
        # the group): the pumps are plain tasks that hand batches, or their failure, over
        # a queue, and are cancelled and awaited when the generator closes.
        queue: asyncio.Queue[tuple[str, list[WatchEvent]] | Exception] = asyncio.Queue(64)

        async def pump(backend: EtcdBackend) -> None:
            try:
                async for batch in ListWatcher(backend, prefix).batches():
                    await queue.put((backend.name, batch))
            except Exception as exc:
                await queue.put(exc)

        pending = {b.name for b in backends}
        top_revision = 0
        tasks = [asyncio.create_task(pump(b), name=f"watch:{b.name}:{prefix!r}") for b in backends]
        try:
            while True:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                shard, batch = item
                yield shard, batch
                last = batch[-1]
                if last.type is EventType.LIST_DONE and pending:
                    pending.discard(shard)
                    top_revision = max(top_revision, last.revision)
                    if not pending:
                        yield "", [WatchEvent(EventType.LIST_DONE, b"", b"", top_revision)]
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
