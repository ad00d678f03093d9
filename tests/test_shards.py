"""Sharding over two real etcd clusters: placement by the map, merged list and watch."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest_asyncio
from helpers import FAST, eventually

from controlplane.config import EtcdClusterConfig, KvstoreConfig
from controlplane.kvstore.embedded import EmbeddedEtcd
from controlplane.kvstore.shards import ShardEvent, ShardMap, stable_hash
from controlplane.kvstore.types import EventType


@pytest_asyncio.fixture
async def second_etcd() -> AsyncIterator[EmbeddedEtcd]:
    async with EmbeddedEtcd(1, name="b") as etcd:
        yield etcd


def two_cluster_config(a: EmbeddedEtcd, b: EmbeddedEtcd) -> KvstoreConfig:
    return KvstoreConfig(
        clusters=(
            EtcdClusterConfig("a", tuple(a.client_urls)),
            EtcdClusterConfig("b", tuple(b.client_urls)),
        ),
        shards={"identities": ("a", "b"), "endpoints": ("b",)},
        client=FAST,
    )


def test_stable_hash_is_fixed() -> None:
    # Placement must never change between processes or releases.
    assert stable_hash("k8s:app=web") == stable_hash(b"k8s:app=web")
    assert stable_hash("node-1") == 0x35971BE6E9BB024A


async def test_keys_land_where_the_map_says(etcd1: EmbeddedEtcd, second_etcd: EmbeddedEtcd) -> None:
    async with ShardMap(two_cluster_config(etcd1, second_etcd)) as shards:
        assert [b.name for b in shards.shards("identities")] == ["a", "b"]
        assert [b.name for b in shards.shards("endpoints")] == ["b"]
        assert [b.name for b in shards.shards("nodes")] == ["a"]  # unmapped: first cluster
        placed: dict[str, set[bytes]] = {"a": set(), "b": set()}
        for i in range(40):
            routing = f"labels-{i}"
            key = f"ids/{routing}".encode()
            backend = shards.shard_for("identities", routing)
            assert backend.name == ("a", "b")[stable_hash(routing) % 2]
            await backend.put(key, b"x")
            placed[backend.name].add(key)
        assert placed["a"] and placed["b"]  # 40 keys over two shards use both

        for name, expected in placed.items():
            result = await shards.backends[name].list_prefix(b"ids/")
            assert {kv.key for kv in result.kvs} == expected
        merged = await shards.list_prefix("identities", b"ids/")
        assert {kv.key for kv in merged} == placed["a"] | placed["b"]
        assert len(merged) == 40


async def test_merged_watch(etcd1: EmbeddedEtcd, second_etcd: EmbeddedEtcd) -> None:
    async with ShardMap(two_cluster_config(etcd1, second_etcd)) as shards:
        a, b = shards.backends["a"], shards.backends["b"]
        await a.put(b"ids/a1", b"1")
        await b.put(b"ids/b1", b"1")
        events: list[ShardEvent] = []

        async def pump() -> None:
            async for item in shards.watch("identities", b"ids/"):
                events.append(item)

        task = asyncio.create_task(pump())
        try:
            await eventually(lambda: any(e.shard == "" for e in events), message="synced")
            listed = {(e.shard, e.event.key) for e in events if e.event.type is EventType.PUT}
            assert listed == {("a", b"ids/a1"), ("b", b"ids/b1")}
            await b.put(b"ids/b2", b"2")
            await a.delete(b"ids/a1")

            def changes() -> set[tuple[str, EventType, bytes]]:
                done = next(i for i, e in enumerate(events) if e.shard == "")
                return {(e.shard, e.event.type, e.event.key) for e in events[done + 1 :]}

            await eventually(lambda: len(changes()) == 2, message="two changes")
            assert changes() == {
                ("b", EventType.PUT, b"ids/b2"),
                ("a", EventType.DELETE, b"ids/a1"),
            }
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_one_cluster_is_one_connection(etcd1: EmbeddedEtcd) -> None:
    config = KvstoreConfig(clusters=(EtcdClusterConfig("only", tuple(etcd1.client_urls)),))
    async with ShardMap(config) as shards:
        backends = {
            id(shards.shard_for(kind, "x")) for kind in ("identities", "endpoints", "nodes")
        }
        assert len(backends) == 1 and len(shards.all()) == 1


async def test_closing_a_merged_watch_is_clean(
    etcd1: EmbeddedEtcd, second_etcd: EmbeddedEtcd
) -> None:
    """Closing the merged watch (as a consumer that stops early does) stops every shard's
    pump without an exception group, and the next consumer's cancellation is its own."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        async with ShardMap(two_cluster_config(etcd1, second_etcd)) as shards:
            await shards.backends["a"].put(b"ids/a1", b"1")

            def pumps() -> set[asyncio.Task[object]]:
                return {
                    t
                    for t in asyncio.all_tasks()
                    if t.get_name().startswith("watch:") and not t.done()
                }

            # Stop early without closing the generator: the loop's finalizer closes it.
            async for shard, _ in shards.watch_batches("identities", b"ids/"):
                if shard == "":  # every shard listed
                    break
            await eventually(lambda: not pumps(), message="the shards' pumps stopped")

            # A consumer cancelled while it waits inside the merged watch: cancelled alone.
            seen: list[str] = []

            async def consume() -> None:
                async for shard, _ in shards.watch_batches("identities", b"ids/"):
                    seen.append(shard)

            task = asyncio.create_task(consume())
            await eventually(lambda: "" in seen, message="listed; now waiting for changes")
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert task.cancelled()
    finally:
        loop.set_exception_handler(None)
    assert errors == []
