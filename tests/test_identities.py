"""Identities against real etcd: allocation, invariant 1 under concurrency, GC races, leases."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from helpers import FAST, eventually, holds_for

from controlplane import codec
from controlplane.config import EtcdClusterConfig, KvstoreConfig
from controlplane.identity.allocator import IdentityAllocator
from controlplane.kvstore.embedded import EmbeddedEtcd
from controlplane.kvstore.identities import KvIdentityCollector, KvIdentityStore
from controlplane.kvstore.keys import KeyLayout
from controlplane.kvstore.owner import Owners
from controlplane.kvstore.shards import ShardMap
from controlplane.metrics import StoreMetrics
from controlplane.model import (
    IDENTITY_HOST,
    IDENTITY_WORLD,
    Identity,
    IdentityRange,
    Labels,
    NodeName,
    cluster_identity_range,
)
from controlplane.store import EventKind

LAYOUT = KeyLayout()


def config_for(*clusters: EmbeddedEtcd) -> KvstoreConfig:
    names = tuple(f"c{i}" for i in range(len(clusters)))
    return KvstoreConfig(
        clusters=tuple(
            EtcdClusterConfig(n, tuple(c.client_urls)) for n, c in zip(names, clusters, strict=True)
        ),
        shards={"identities": names},
        client=FAST,
    )


@dataclass
class Node:
    name: str
    shards: ShardMap
    metrics: StoreMetrics
    owners: Owners
    store: KvIdentityStore
    allocator: IdentityAllocator


@contextlib.asynccontextmanager
async def node(config: KvstoreConfig, name: str, ttl: int = 60) -> AsyncIterator[Node]:
    """One node with its own etcd connections, lease pool and identity store."""
    async with ShardMap(config, own_connection=True) as shards:
        metrics = StoreMetrics.create()
        owners = Owners(metrics, ttl=ttl)
        store = KvIdentityStore(shards, LAYOUT, metrics, owners, node=NodeName(name))
        allocator = IdentityAllocator(store)
        store.changed.append(allocator.identity_changed)
        yield Node(name, shards, metrics, owners, store, allocator)


@contextlib.asynccontextmanager
async def running(owners: Owners) -> AsyncIterator[None]:
    task = asyncio.create_task(owners.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def labels(i: int) -> Labels:
    return Labels.from_strings([f"k8s:app=app{i}", f"k8s:team=t{i % 3}"])


async def store_state(shards: ShardMap) -> tuple[dict[str, int], dict[int, str], list[str]]:
    """(index: labels -> ID, master: ID -> labels, value keys) read straight from etcd."""
    index: dict[str, int] = {}
    masters: dict[int, str] = {}
    placement: list[str] = []
    for i, backend in enumerate(shards.shards("identities")):
        for kv in (await backend.list_prefix(LAYOUT.identity_labels_prefix)).kvs:
            component = kv.key[len(LAYOUT.identity_labels_prefix) :].decode()
            index[component] = codec.decode("identity-index", kv.value)["id"]
            placement.append(f"{component}@{i}")
        for kv in (await backend.list_prefix(LAYOUT.identity_id_prefix)).kvs:
            identity = Identity.from_dict(codec.decode("identity", kv.value))
            assert identity.id not in masters, "an ID on two shards"
            masters[identity.id] = identity.labels.key_component()
    return index, masters, placement


async def check_invariant_1(shards: ShardMap, ranges: Sequence[IdentityRange]) -> dict[str, int]:
    index, masters, placement = await store_state(shards)
    # One ID per label set (the index is keyed by labels) and one label set per ID:
    assert len(set(index.values())) == len(index), "two label sets share an ID"
    for component, ident in index.items():
        assert masters.get(ident) == component, f"ID {ident} maps back to {masters.get(ident)}"
    assert set(masters) == set(index.values()), "master keys without an index"
    # Every ID in the slice of the shard that holds it, every label set on its hashed shard:
    for entry in placement:
        component, shard = entry.rsplit("@", 1)
        assert ranges[int(shard)].contains(index[component])
        assert shards.shard_index("identities", Labels.parse(component).canonical()) == int(shard)
    return index


async def test_allocate_reference_release(etcd1: EmbeddedEtcd) -> None:
    config = config_for(etcd1)
    async with node(config, "node-a") as a, node(config, "node-b") as b:
        web = await a.allocator.acquire(labels(1))
        assert cluster_identity_range().contains(web.id)
        assert await b.allocator.acquire(labels(1)) == web  # a reference, same ID
        db = await a.allocator.acquire(labels(2))
        assert db.id != web.id
        assert await a.allocator.acquire(labels(1)) == web  # local count 2, no new key
        refs = await a.store.references()
        assert sorted(refs[web.id]) == ["node-a", "node-b"]

        host = await a.allocator.acquire(Labels.parse("reserved:host"))
        assert host.id == IDENTITY_HOST
        world = await a.store.get(IDENTITY_WORLD)
        assert world is not None and str(world.value.labels) == "reserved:world"

        found = await b.store.lookup(labels(2))
        assert found is not None and found.value == db
        got = await b.store.get(db.id)
        assert got is not None and got.value == db and got.version > 0
        assert {v.value for v in await b.store.list()} == {web, db}

        await a.allocator.release(labels(1))
        assert sorted((await a.store.references())[web.id]) == ["node-a", "node-b"]
        await a.allocator.release(labels(1))
        assert (await a.store.references())[web.id] == ["node-b"]
        assert not await a.allocator.release(labels(1))


async def test_watch_identities(etcd1: EmbeddedEtcd) -> None:
    config = config_for(etcd1)
    async with node(config, "node-a") as a:
        first = await a.allocator.acquire(labels(1))
        events = []

        async def pump() -> None:
            async for event in a.store.watch():
                events.append(event)

        task = asyncio.create_task(pump())
        try:
            await eventually(lambda: any(e.kind is EventKind.SYNCED for e in events))
            assert events[0].kind is EventKind.UPSERT and events[0].value == first
            second = await a.allocator.acquire(labels(2))
            await eventually(lambda: len(events) == 3)
            assert events[2].kind is EventKind.UPSERT and events[2].value == second
            assert events[2].name == str(second.id)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def churn(n: Node, seed: int, ops: int, label_sets: int, release: float = 0.4) -> None:
    """Random acquire/release on one node; returns holding some identities."""
    rng = random.Random(seed)
    held: list[Labels] = []
    for _ in range(ops):
        if held and rng.random() < release:
            await n.allocator.release(held.pop(rng.randrange(len(held))))
        else:
            chosen = labels(rng.randrange(label_sets))
            identity = await n.allocator.acquire(chosen)
            assert identity.labels == chosen
            held.append(chosen)


async def run_allocators(
    config: KvstoreConfig, count: int, ops: int, label_sets: int
) -> list[Node]:
    async with contextlib.AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(node(config, f"node-{i}")) for i in range(count)]
        async with asyncio.TaskGroup() as group:
            for i, n in enumerate(nodes):
                group.create_task(churn(n, seed=1000 + i, ops=ops, label_sets=label_sets))
        # Every node agrees with every other on each label set's ID.
        seen: dict[Labels, int] = {}
        for n in nodes:
            for lbls, (identity, _) in n.allocator.held().items():
                assert seen.setdefault(lbls, identity.id) == identity.id
        async with ShardMap(config) as shards:
            index = await check_invariant_1(shards, nodes[0].store.id_ranges)
            for lbls, ident in seen.items():
                assert index[lbls.key_component()] == ident
        return nodes


async def test_invariant_1_with_32_allocators(etcd3: EmbeddedEtcd) -> None:
    await run_allocators(config_for(etcd3), count=32, ops=25, label_sets=40)


async def test_invariant_1_on_two_shards(etcd1: EmbeddedEtcd, second_etcd: EmbeddedEtcd) -> None:
    config = config_for(etcd1, second_etcd)
    await run_allocators(config, count=32, ops=20, label_sets=40)
    async with ShardMap(config) as shards:
        _, _, placement = await store_state(shards)
        assert {p.rsplit("@", 1)[1] for p in placement} == {"0", "1"}  # both shards used
        ranges = KvIdentityStore(shards, LAYOUT, StoreMetrics.create()).id_ranges
        assert not ranges[0].overlaps(ranges[1])


async def test_gc_needs_two_rounds_and_spares_users(etcd1: EmbeddedEtcd) -> None:
    config = config_for(etcd1)
    async with node(config, "node-a") as a, ShardMap(config) as shards:
        gc = KvIdentityCollector(shards, LAYOUT, a.metrics)
        kept = await a.allocator.acquire(labels(1))
        dropped = await a.allocator.acquire(labels(2))
        revived = await a.allocator.acquire(labels(3))
        await a.allocator.release(labels(2))
        await a.allocator.release(labels(3))

        first = await gc.collect()
        assert (first.candidates, first.deleted, first.skipped) == (2, 0, 0)
        # labels(3) gains a user between the rounds: its index is rewritten, so it is spared.
        assert await a.allocator.acquire(labels(3)) == revived
        second = await gc.collect()
        assert second.deleted == 1 and second.candidates == 0
        assert await a.store.lookup(labels(2)) is None and await a.store.get(dropped.id) is None
        assert await a.store.lookup(labels(1)) is not None
        assert (await a.store.lookup(labels(3))) is not None
        assert kept.id != dropped.id
        registry = a.metrics.registry
        assert registry.get_sample_value("cp_identity_gc_deleted_total") == 1
        assert registry.get_sample_value("cp_identity_gc_duration_seconds_count") == 2


async def test_gc_conflict_skips_one_identity_not_the_round(etcd1: EmbeddedEtcd) -> None:
    config = config_for(etcd1)
    async with node(config, "node-a") as a, ShardMap(config) as shards:
        gc = KvIdentityCollector(shards, LAYOUT, a.metrics)
        for i in range(5):
            await a.allocator.acquire(labels(i))
            await a.allocator.release(labels(i))
        await gc.collect()
        # A reference taken after GC listed (so it cannot see it) but before its delete
        # must make exactly that delete fail: simulate by delaying the collector.
        original = gc._delete

        async def delete_after_reference(backend, candidate):  # type: ignore[no-untyped-def]
            if candidate.key == LAYOUT.identity_labels(labels(0).key_component()):
                await a.allocator.acquire(labels(0))
            return await original(backend, candidate)

        gc._delete = delete_after_reference  # type: ignore[method-assign]
        stats = await gc.collect()
        assert (stats.deleted, stats.skipped) == (4, 1)
        assert await a.store.lookup(labels(0)) is not None


async def test_gc_racing_with_references_never_deletes_a_used_identity(etcd3: EmbeddedEtcd) -> None:
    config = config_for(etcd3)
    async with contextlib.AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(node(config, f"node-{i}")) for i in range(8)]
        shards = await stack.enter_async_context(ShardMap(config))
        gc = KvIdentityCollector(shards, LAYOUT, StoreMetrics.create(), deletes_per_second=10000)
        stop = asyncio.Event()
        rounds = deleted = 0

        async def collector() -> None:
            nonlocal rounds, deleted
            while not stop.is_set():
                stats = await gc.collect()
                rounds += 1
                deleted += stats.deleted

        async with asyncio.TaskGroup() as group:
            gc_task = group.create_task(collector())
            async with asyncio.TaskGroup() as workers:
                for i, n in enumerate(nodes):
                    workers.create_task(churn(n, seed=7 + i, ops=80, label_sets=24, release=0.5))
            stop.set()
            await gc_task
        print(f"GC rounds {rounds}, deleted {deleted} while racing")
        assert rounds >= 2 and deleted >= 1  # the race really happened

        index = await check_invariant_1(shards, nodes[0].store.id_ranges)
        for n in nodes:
            for lbls, (identity, _) in n.allocator.held().items():
                assert index.get(lbls.key_component()) == identity.id, f"{lbls} lost its identity"
        # Every reference in etcd points at an identity that exists.
        for ident in await nodes[0].store.references():
            assert ident in index.values()


async def test_lease_loss_restores_references(etcd1: EmbeddedEtcd) -> None:
    config = config_for(etcd1)
    async with node(config, "node-a") as a, running(a.owners):
        held = [await a.allocator.acquire(labels(i)) for i in range(3)]
        backend = a.shards.shards("identities")[0]
        owner = a.owners.for_backend(backend)
        for lease in list(owner.leases.leases):
            await backend.revoke(lease)

        async def restored() -> bool:
            refs = await a.store.references()
            return all(refs.get(i.id) == ["node-a"] for i in held)

        await eventually(restored, message="references re-created")
        for identity in held:
            found = await a.store.lookup(identity.labels)
            assert found is not None and found.value == identity


async def test_deleted_reference_is_repaired(etcd1: EmbeddedEtcd) -> None:
    config = config_for(etcd1)
    async with node(config, "node-a") as a, running(a.owners):
        identity = await a.allocator.acquire(labels(1))
        backend = a.shards.shards("identities")[0]
        await backend.delete(LAYOUT.identity_value(labels(1).key_component(), "node-a"))

        async def repaired() -> bool:
            return (await a.store.references()).get(identity.id) == ["node-a"]

        await eventually(repaired, message="reference repaired")

        def counted() -> float | None:
            return a.metrics.registry.get_sample_value(
                "cp_store_repairs_total", {"resource": "identity-ref", "reason": "deleted"}
            )

        # The owner counts the repair once its write's answer is in, which can come after
        # a reader already sees the key.
        await eventually(lambda: counted() == 1, message="repair counted")
        await holds_for(lambda: counted() == 1, 0.3, "repaired once")


async def test_malformed_identity_records_are_skipped(etcd1: EmbeddedEtcd) -> None:
    config = config_for(etcd1)
    async with node(config, "node-a") as a, ShardMap(config) as shards:
        good = await a.allocator.acquire(labels(1))
        backend = shards.shards("identities")[0]
        await backend.put(LAYOUT.identity_id(999), b"\xc1 not msgpack")
        await backend.put(LAYOUT.identity_id(1000), codec.encode("identity", {"id": "x"}))
        await backend.put(LAYOUT.identity_id_prefix + b"not-a-number", codec.encode("other", {}))
        await backend.put(LAYOUT.identity_labels(labels(9).key_component()), b"junk")
        await backend.put(LAYOUT.identity_value_prefix + b"junk", b"junk")

        assert [v.value for v in await a.store.list()] == [good]
        malformed = a.metrics.registry.get_sample_value(
            "cp_store_malformed_values_total", {"resource": "identity"}
        )
        assert malformed == 3
        assert await a.store.get(999) is None  # type: ignore[arg-type]
        assert await a.store.lookup(labels(9)) is None
        assert len(await a.store.references()) == 1

        gc = KvIdentityCollector(shards, LAYOUT, a.metrics)
        await gc.collect()
        await gc.collect()  # the junk has no references: collected, no crash
        assert [v.value for v in await a.store.list()] == [good]


async def test_write_on_a_revoked_lease_recovers(etcd1: EmbeddedEtcd) -> None:
    config = config_for(etcd1)
    async with node(config, "node-a", ttl=600) as a, running(a.owners):
        # A long TTL: keepalives are rare, so only the refused write notices the loss.
        first = await a.allocator.acquire(labels(1))
        backend = a.shards.shards("identities")[0]
        owner = a.owners.for_backend(backend)
        (lease,) = owner.leases.leases
        await backend.revoke(lease)
        second = await a.allocator.acquire(labels(2))  # etcd refuses the lease: a new one
        assert owner.leases.lost_total == 1 and lease not in owner.leases.leases

        async def both() -> bool:  # the lost reference was re-created too
            refs = await a.store.references()
            return refs == {first.id: ["node-a"], second.id: ["node-a"]}

        await eventually(both, message="both references present")
