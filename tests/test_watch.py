"""List-then-watch: order, resume after a member dies, re-list after compaction."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from helpers import backend_for, collecting, eventually, retrying

from controlplane.kvstore.backend import EtcdBackend
from controlplane.kvstore.embedded import EmbeddedEtcd
from controlplane.kvstore.errors import KvstoreError
from controlplane.kvstore.session import LeaseManager
from controlplane.kvstore.types import EventType, Put, WatchEvent, absent
from controlplane.kvstore.watch import ListWatcher


def list_done(events: list[WatchEvent]) -> int:
    return sum(1 for e in events if e.type is EventType.LIST_DONE)


async def test_list_then_watch_in_order(etcd1: EmbeddedEtcd) -> None:
    async with backend_for(etcd1.client_urls) as backend:
        for i in range(5):
            await backend.put(b"w/%d" % i, b"old")
        await backend.put(b"other", b"not watched")
        watcher = ListWatcher(backend, b"w/", page_size=2)
        async with collecting(watcher.events()) as events:
            await eventually(lambda: list_done(events) == 1, message="list done")
            listed = [e.key for e in events if e.type is EventType.PUT]
            assert listed == [b"w/%d" % i for i in range(5)]
            await backend.put(b"w/5", b"new")
            await backend.delete(b"w/0")
            await backend.txn([], [Put(b"w/6", b"a"), Put(b"w/7", b"b")])
            await backend.put(b"other", b"still not watched")
            await eventually(lambda: len(events) >= 10, message="four changes")
            changes = [(e.type, e.key) for e in events[6:]]
            assert changes == [
                (EventType.PUT, b"w/5"),
                (EventType.DELETE, b"w/0"),
                (EventType.PUT, b"w/6"),
                (EventType.PUT, b"w/7"),
            ]
            assert events[8].revision == events[9].revision
            assert watcher.stats.lists == 1


async def member_talked_to(etcd: EmbeddedEtcd, backend: EtcdBackend) -> int:
    """Index of the member that ``backend``'s connection currently uses."""
    member_id = (await backend.status()).member_id
    for index, url in enumerate(etcd.client_urls):
        if not etcd.members[index].running:
            continue
        async with backend_for([url]) as single:
            if (await single.status()).member_id == member_id:
                return index
    raise AssertionError("no member has that id")


async def create_with_retry(backend: EtcdBackend, key: bytes) -> None:
    """Create-only, retried while the cluster fails over: never written twice."""
    for _ in range(200):
        try:
            await backend.txn([absent(key)], [Put(key, b"x")])
            return
        except KvstoreError:
            await asyncio.sleep(0.05)
    raise AssertionError(f"could not write {key!r}")


async def test_watch_resumes_after_member_is_killed(etcd3: EmbeddedEtcd) -> None:
    async with (
        backend_for(etcd3.client_urls) as watch_backend,
        backend_for(etcd3.client_urls) as writer,
    ):
        watcher = ListWatcher(watch_backend, b"seq/")
        async with collecting(watcher.events()) as events:
            await eventually(lambda: list_done(events) == 1, message="list done")
            victim = await member_talked_to(etcd3, watch_backend)
            keys = [b"seq/%04d" % i for i in range(300)]
            for i, key in enumerate(keys):
                if i == 100:
                    await etcd3.kill_member(victim)
                await create_with_retry(writer, key)
            await eventually(lambda: len(events) >= 301, timeout=30, message="all events")
            seen = [e.key for e in events if e.type is EventType.PUT]
            assert seen == keys  # none lost, none repeated, in order
            assert watcher.stats.resumes >= 1
            assert watcher.stats.lists == 1
            assert await member_talked_to(etcd3, watch_backend) != victim


async def test_compaction_relists_with_exact_sweep(etcd3: EmbeddedEtcd) -> None:
    first = etcd3.client_urls[0]
    others = etcd3.client_urls[1:]
    async with backend_for([first]) as watch_backend, backend_for(others) as writer:
        for i in range(20):
            await writer.put(b"c/%02d" % i, b"v1")
        watcher = ListWatcher(watch_backend, b"c/")
        async with collecting(watcher.events()) as events:
            await eventually(lambda: list_done(events) == 1, message="first list")
            await etcd3.kill_member(0)  # the watcher can no longer follow

            vanished = {b"c/%02d" % i for i in range(0, 20, 3)}
            for key in vanished:
                await retrying(lambda k=key: writer.delete(k))  # type: ignore[misc]
            changed = {b"c/01", b"c/02"}
            for key in changed:
                await retrying(lambda k=key: writer.put(k, b"v2"))  # type: ignore[misc]
            added = {b"c/new1", b"c/new2"}
            for key in added:
                await retrying(lambda k=key: writer.put(k, b"v1"))  # type: ignore[misc]
            # Churn on a key that ends up deleted must not surface either.
            await retrying(lambda: writer.put(b"c/temp", b"x"))
            await retrying(lambda: writer.delete(b"c/temp"))
            revision = await retrying(writer.current_revision)
            await retrying(lambda: writer.compact(revision))

            await etcd3.start_member(0)
            await eventually(lambda: list_done(events) == 2, timeout=40, message="re-list")

        assert watcher.stats.compactions >= 1 and watcher.stats.lists == 2
        first_done = next(i for i, e in enumerate(events) if e.type is EventType.LIST_DONE)
        relist = events[first_done + 1 :]
        sweeps = {e.key for e in relist if e.type is EventType.DELETE}
        assert all(e.synthetic for e in relist if e.type is EventType.DELETE)
        assert sweeps == vanished
        puts = {e.key for e in relist if e.type is EventType.PUT}
        assert puts == changed | added


@pytest.mark.parametrize("page_size", [1, 1000])
async def test_relist_on_empty_prefix(etcd1: EmbeddedEtcd, page_size: int) -> None:
    async with backend_for(etcd1.client_urls) as backend:
        watcher = ListWatcher(backend, b"empty/", page_size=page_size)
        async with collecting(watcher.events()) as events:
            await eventually(lambda: list_done(events) == 1, message="list done")
            assert events[0].revision >= 1
            await backend.put(b"empty/x", b"1")
            await eventually(lambda: len(events) == 2, message="one put")
            assert events[1].type is EventType.PUT and events[1].key == b"empty/x"


async def test_batches_follow_pages_and_watch_responses(etcd1: EmbeddedEtcd) -> None:
    """``batches()``: one batch per list page, ``LIST_DONE`` closing the last, then one per
    watch response (a transaction's puts arrive together)."""
    async with backend_for(etcd1.client_urls) as backend:
        for i in range(5):
            await backend.put(b"b/%d" % i, b"v")
        batches: list[list[WatchEvent]] = []

        async def pump() -> None:
            async for batch in ListWatcher(backend, b"b/", page_size=2).batches():
                batches.append(batch)

        task = asyncio.create_task(pump(), name="test-batches")
        try:
            await eventually(lambda: any(b[-1].type is EventType.LIST_DONE for b in batches))
            assert [[e.key for e in b if e.type is EventType.PUT] for b in batches] == [
                [b"b/0", b"b/1"],
                [b"b/2", b"b/3"],
                [b"b/4"],
                [],
            ]
            assert [e.type for e in batches[-1]] == [EventType.LIST_DONE]
            await backend.txn([], [Put(b"b/5", b"a"), Put(b"b/6", b"b")])
            await backend.put(b"b/7", b"c")
            await eventually(lambda: len(batches) == 6, message="two watch responses")
            assert [[e.key for e in b] for b in batches[4:]] == [[b"b/5", b"b/6"], [b"b/7"]]
            assert all(batch for batch in batches), "no empty batch"
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_watch_and_keepalive_carry_on_over_a_replaced_connection(etcd1: EmbeddedEtcd) -> None:
    """A shard's connection replaced under a watch and a keepalive stream (grpc cancels
    the calls in flight on the old channel): both resume on the new one, nothing is lost,
    and neither task ends as if it had been cancelled itself."""
    async with backend_for(etcd1.client_urls) as backend:
        events: list[WatchEvent] = []
        manager = LeaseManager(backend, ttl=4, keepalive_interval=0.3)
        lease = await manager.lease_for(b"owned/x")
        await backend.put(b"owned/x", b"1", lease=lease)

        async def follow() -> None:
            async for event in ListWatcher(backend, b"r/").events():
                events.append(event)

        tasks = [asyncio.create_task(follow()), asyncio.create_task(manager.run())]
        try:
            await eventually(lambda: any(e.type is EventType.LIST_DONE for e in events))
            renewed = manager.keepalives_total
            await eventually(lambda: manager.keepalives_total > renewed, message="renewing")
            await backend.reconnect()
            await backend.put(b"r/after", b"1")
            await eventually(
                lambda: [e.key for e in events if e.type is EventType.PUT] == [b"r/after"],
                message="the watch resumed on the new connection",
            )
            renewed = manager.keepalives_total
            await eventually(lambda: manager.keepalives_total > renewed, message="renewing again")
            assert not any(t.done() for t in tasks), [t for t in tasks if t.done()]
            assert await backend.get(b"owned/x") is not None  # the lease lived on
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
