"""The kvstore endpoint and node stores against real etcd, and `cpctl endpoint|node list`."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from ipaddress import ip_address, ip_network
from typing import TypeVar

import pytest
import pytest_asyncio
from helpers import FAST, collecting, cpctl_in_process, eventually, synced

from controlplane import codec
from controlplane.config import EtcdClusterConfig, KvstoreConfig
from controlplane.kvstore.backend import EtcdBackend
from controlplane.kvstore.embedded import EmbeddedEtcd
from controlplane.kvstore.endpoints import IPConflict, KvEndpointStore, ReadOnlyStore
from controlplane.kvstore.keys import KeyLayout
from controlplane.kvstore.nodes import KvNodeStore
from controlplane.kvstore.owner import Owners
from controlplane.kvstore.shards import ShardMap
from controlplane.metrics import StoreMetrics
from controlplane.model import Endpoint, IPIdentity, Node, NodeName, NumericIdentity
from controlplane.store import EndpointStore, NodeStore
from controlplane.store_types import EventKind, StoreEvent

T = TypeVar("T")
LAYOUT = KeyLayout()
EP_PREFIX = LAYOUT.ip_prefix("default")
NODE_PREFIX = LAYOUT.node_prefix("default")


@pytest_asyncio.fixture
async def etcd_b() -> AsyncIterator[EmbeddedEtcd]:
    async with EmbeddedEtcd(1, name="b") as etcd:
        yield etcd


def one_cluster(etcd: EmbeddedEtcd) -> KvstoreConfig:
    return KvstoreConfig(clusters=(EtcdClusterConfig("a", tuple(etcd.client_urls)),), client=FAST)


def two_clusters(
    a: EmbeddedEtcd, b: EmbeddedEtcd, shards: dict[str, tuple[str, ...]]
) -> KvstoreConfig:
    return KvstoreConfig(
        clusters=(
            EtcdClusterConfig("a", tuple(a.client_urls)),
            EtcdClusterConfig("b", tuple(b.client_urls)),
        ),
        shards=shards,
        client=FAST,
    )


def endpoint(ip: str, node: str, identity: int = 1000) -> Endpoint:
    return Endpoint(
        ip=ip_address(ip),
        identity=NumericIdentity(identity),
        node=NodeName(node),
        host_ip=ip_address("192.168.0.1"),
        name="pod-" + ip.replace(".", "-").replace(":", "-").strip("-"),
        namespace="default",
    )


def node(name: str, boot_id: str = "boot-1") -> Node:
    return Node(
        name=NodeName(name),
        ips=(ip_address("192.168.0.1"), ip_address("fd00::1")),
        pod_cidrs=(ip_network("10.0.1.0/24"),),
        boot_id=boot_id,
    )


def owners_for(metrics: StoreMetrics) -> Owners:
    # A short keepalive interval so that a revoked lease is noticed within a second.
    return Owners(metrics, ttl=10, keepalive_interval=0.2)


def sample(metrics: StoreMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def malformed(metrics: StoreMetrics, resource: str) -> float:
    return sample(metrics, "cp_store_malformed_values_total", resource=resource)


def repairs(metrics: StoreMetrics, resource: str, reason: str) -> float:
    return sample(metrics, "cp_store_repairs_total", resource=resource, reason=reason)


def after_sync(events: list[StoreEvent[T]]) -> list[tuple[EventKind, str, T | None]]:
    synced = [i for i, e in enumerate(events) if e.kind is EventKind.SYNCED]
    assert len(synced) == 1, events
    return [(e.kind, e.name, e.value) for e in events[synced[0] + 1 :]]


def listed(events: list[StoreEvent[T]]) -> dict[str, T | None]:
    out: dict[str, T | None] = {}
    for e in events:
        if e.kind is EventKind.SYNCED:
            return out
        assert e.kind is EventKind.UPSERT
        out[e.name] = e.value
    raise AssertionError("not synced")


# ---------------------------------------------------------------------------------------
# Endpoints
# ---------------------------------------------------------------------------------------


async def test_endpoint_round_trip(etcd1: EmbeddedEtcd) -> None:
    metrics = StoreMetrics.create()
    async with ShardMap(one_cluster(etcd1)) as shards:
        owners = owners_for(metrics)
        store: EndpointStore = KvEndpointStore(
            shards, LAYOUT, metrics, owners, node=NodeName("node-a")
        )
        reader: EndpointStore = KvEndpointStore(shards, LAYOUT, metrics, None, node=None)
        e1, e6 = endpoint("10.0.1.5", "node-a"), endpoint("fd00::5", "node-a")
        await store.upsert(e1)
        await store.upsert(e6)
        assert {v.value for v in await reader.list()} == {e1, e6}
        assert all(v.version > 0 for v in await reader.list())

        async with collecting(reader.watch()) as events:
            await eventually(lambda: synced(events), message="endpoint watch synced")
            assert listed(events) == {"10.0.1.5": e1, "fd00::5": e6}
            e2 = endpoint("10.0.1.6", "node-a")
            e1b = endpoint("10.0.1.5", "node-a", identity=2000)
            await store.upsert(e2)
            await store.upsert(e1b)
            await store.remove(e1.ip)
            await eventually(lambda: len(after_sync(events)) == 3, message="three changes")
            assert after_sync(events) == [
                (EventKind.UPSERT, "10.0.1.6", e2),
                (EventKind.UPSERT, "10.0.1.5", e1b),
                (EventKind.DELETE, "10.0.1.5", e1b),
            ]
        assert {v.value for v in await reader.list()} == {e2, e6}
        await store.remove(ip_address("10.9.9.9"))  # absent: nothing to do

        with pytest.raises(ValueError, match="node-b"):
            await store.upsert(endpoint("10.0.1.7", "node-b"))
        with pytest.raises(ReadOnlyStore):
            await reader.upsert(endpoint("10.0.1.8", "node-a"))
        with pytest.raises(ReadOnlyStore):
            await reader.remove(e2.ip)
        with pytest.raises(ValueError):
            KvEndpointStore(shards, LAYOUT, metrics, owners, node=None)
        assert malformed(metrics, "endpoint") == 0


async def test_endpoints_placed_by_node_and_merged(
    etcd1: EmbeddedEtcd, etcd_b: EmbeddedEtcd
) -> None:
    metrics = StoreMetrics.create()
    config = two_clusters(etcd1, etcd_b, {"endpoints": ("a", "b")})
    async with ShardMap(config) as shards:
        names = [f"node-{i}" for i in range(20)]
        on_a = next(n for n in names if shards.shard_for("endpoints", n).name == "a")
        on_b = next(n for n in names if shards.shard_for("endpoints", n).name == "b")
        store_a = KvEndpointStore(shards, LAYOUT, metrics, owners_for(metrics), node=NodeName(on_a))
        store_b = KvEndpointStore(shards, LAYOUT, metrics, owners_for(metrics), node=NodeName(on_b))
        reader = KvEndpointStore(shards, LAYOUT, metrics, None, node=None)
        a1, a2 = endpoint("10.0.1.2", on_a), endpoint("10.0.1.3", on_a)
        b1 = endpoint("10.0.2.2", on_b)
        for store, ep in ((store_a, a1), (store_a, a2), (store_b, b1)):
            await store.upsert(ep)

        backend_a, backend_b = shards.backends["a"], shards.backends["b"]
        keys_a = {kv.key for kv in (await backend_a.list_prefix(EP_PREFIX)).kvs}
        keys_b = {kv.key for kv in (await backend_b.list_prefix(EP_PREFIX)).kvs}
        assert keys_a == {store_a.key(a1.ip), store_a.key(a2.ip)}
        assert keys_b == {store_b.key(b1.ip)}
        assert {v.value for v in await reader.list()} == {a1, a2, b1}

        async with collecting(reader.watch()) as events:
            await eventually(lambda: synced(events), message="merged watch synced")
            assert listed(events) == {"10.0.1.2": a1, "10.0.1.3": a2, "10.0.2.2": b1}
            b2 = endpoint("10.0.2.3", on_b)
            await store_b.upsert(b2)
            await store_a.remove(a1.ip)
            await eventually(lambda: len(after_sync(events)) == 2, message="two changes")
            assert sorted(after_sync(events), key=lambda e: e[1]) == [
                (EventKind.DELETE, "10.0.1.2", a1),
                (EventKind.UPSERT, "10.0.2.3", b2),
            ]
        assert await backend_b.get(store_b.key(b2.ip)) is not None
        assert await backend_a.get(store_b.key(b2.ip)) is None


async def test_ip_conflict_is_refused(etcd1: EmbeddedEtcd) -> None:
    metrics = StoreMetrics.create()
    async with ShardMap(one_cluster(etcd1)) as shards:
        owners_a, owners_b = owners_for(metrics), owners_for(metrics)
        store_a = KvEndpointStore(shards, LAYOUT, metrics, owners_a, node=NodeName("node-a"))
        store_b = KvEndpointStore(shards, LAYOUT, metrics, owners_b, node=NodeName("node-b"))
        backend = shards.backends["a"]
        owner_a, owner_b = owners_a.for_backend(backend), owners_b.for_backend(backend)
        mine = endpoint("10.0.1.5", "node-a")
        theirs = endpoint("10.0.1.5", "node-b", identity=2000)
        key = store_a.key(mine.ip)

        await store_a.upsert(mine)
        with pytest.raises(IPConflict, match="node-a") as caught:
            await store_b.upsert(theirs)
        assert caught.value.holder == "node-a" and caught.value.ip == "10.0.1.5"
        assert not owner_b.owns(key) and owner_a.owns(key)
        assert [v.value for v in await store_a.list()] == [mine]

        await store_b.remove(mine.ip)  # not node-b's record: left alone
        assert [v.value for v in await store_a.list()] == [mine]

        await store_a.remove(mine.ip)
        await store_b.upsert(theirs)  # free again
        assert [v.value for v in await store_b.list()] == [theirs]
        with pytest.raises(IPConflict):
            await store_a.upsert(mine)
        assert not owner_a.owns(key)

        # The repair path refuses too: another node's record where ours was is not
        # overwritten; our node gives the key up.
        ours = endpoint("10.0.1.9", "node-a")
        await store_a.upsert(ours)
        async with asyncio.TaskGroup() as group:
            run = group.create_task(owners_a.run())
            await eventually(lambda: owner_a.leases.keepalives_total > 0, message="running")
            foreign = endpoint("10.0.1.9", "node-c")
            await backend.put(store_a.key(ours.ip), codec.encode("endpoint", foreign.to_dict()))
            await eventually(lambda: not owner_a.owns(store_a.key(ours.ip)), message="disowned")
            assert {v.value for v in await store_a.list()} == {theirs, foreign}
            assert repairs(metrics, "endpoint", "changed") == 0
            run.cancel()


async def test_lease_loss_brings_keys_back(etcd1: EmbeddedEtcd) -> None:
    metrics = StoreMetrics.create()
    async with ShardMap(one_cluster(etcd1)) as shards:
        owners = owners_for(metrics)
        endpoints = KvEndpointStore(shards, LAYOUT, metrics, owners, node=NodeName("node-a"))
        nodes = KvNodeStore(shards, LAYOUT, metrics, owners, node=NodeName("node-a"))
        backend = shards.backends["a"]
        owner = owners.for_backend(backend)
        wanted = [endpoint(f"10.0.1.{i}", "node-a") for i in range(2, 6)]
        await nodes.register(node("node-a"))
        for ep in wanted:
            await endpoints.upsert(ep)

        async with asyncio.TaskGroup() as group:
            run = group.create_task(owners.run())
            await eventually(lambda: owner.leases.keepalives_total > 0, message="running")
            revoked = set(owner.leases.leases)
            for lease in list(owner.leases.leases):
                await backend.revoke(lease)

            async def restored() -> bool:
                kvs = (await backend.list_prefix(LAYOUT.state_prefix)).kvs
                live = set(owner.leases.leases)
                return len(kvs) == len(wanted) + 1 and all(
                    kv.lease in live and kv.lease not in revoked for kv in kvs
                )

            await eventually(restored, message="endpoints and node re-created on a new lease")
            assert {v.value for v in await endpoints.list()} == set(wanted)
            got = await nodes.get(NodeName("node-a"))
            assert got is not None and got.value == node("node-a")
            restored_total = sum(
                repairs(metrics, resource, reason)
                for resource in ("endpoint", "node")
                for reason in ("lease-lost", "deleted")
            )
            assert restored_total >= len(wanted) + 1
            run.cancel()


def holding(backend: EtcdBackend, key: bytes, value: bytes) -> Callable[[], Awaitable[bool]]:
    """A check: ``key`` holds ``value``."""

    async def check() -> bool:
        kv = await backend.get(key)
        return kv is not None and kv.value == value

    return check


async def test_self_repair(etcd1: EmbeddedEtcd) -> None:
    metrics = StoreMetrics.create()
    async with ShardMap(one_cluster(etcd1)) as shards:
        owners = owners_for(metrics)
        endpoints = KvEndpointStore(shards, LAYOUT, metrics, owners, node=NodeName("node-a"))
        nodes = KvNodeStore(shards, LAYOUT, metrics, owners, node=NodeName("node-a"))
        backend = shards.backends["a"]
        ep = endpoint("10.0.1.5", "node-a")
        key = endpoints.key(ep.ip)
        await endpoints.upsert(ep)
        await nodes.register(node("node-a"))
        value = (await backend.get(key) or pytest.fail("missing")).value
        is_back = holding(backend, key, value)

        async with asyncio.TaskGroup() as group:
            run = group.create_task(owners.run())
            await eventually(lambda: owners.for_backend(backend).leases.keepalives_total > 0)

            await backend.delete(key)
            await eventually(lambda: repairs(metrics, "endpoint", "deleted") == 1)
            await eventually(is_back, message="deleted endpoint re-created")

            await backend.put(key, b"garbage")
            await eventually(lambda: repairs(metrics, "endpoint", "changed") == 1)
            await eventually(is_back, message="overwritten endpoint restored")

            # Overwritten with a record of our own node (say a stale writer): ours again.
            stale = endpoint("10.0.1.5", "node-a", identity=4242)
            await backend.put(key, codec.encode("endpoint", stale.to_dict()))
            await eventually(lambda: repairs(metrics, "endpoint", "changed") == 2)
            await eventually(is_back, message="stale endpoint restored")

            node_key = nodes.key("node-a")
            await backend.delete(node_key)
            await eventually(lambda: repairs(metrics, "node", "deleted") == 1)
            await eventually(lambda: nodes.get(NodeName("node-a")), message="node re-created")
            run.cancel()
        assert [v.value for v in await endpoints.list()] == [ep]


async def _flat(stream: AsyncIterator[list[StoreEvent[T]]]) -> AsyncIterator[StoreEvent[T]]:
    async for batch in stream:
        for event in batch:
            yield event


async def test_the_endpoint_watch_feeds_the_repair(etcd1: EmbeddedEtcd) -> None:
    """The node's endpoint watch (the agent's ipcache source) feeds the repair of its own
    endpoint keys: one watch of the prefix, each event handled once; while no such watch
    runs, the owner watches the prefix itself."""
    metrics = StoreMetrics.create()
    async with ShardMap(one_cluster(etcd1)) as shards:
        owners = owners_for(metrics)
        endpoints = KvEndpointStore(shards, LAYOUT, metrics, owners, node=NodeName("node-a"))
        backend = shards.backends["a"]
        owner = owners.for_backend(backend)
        ep = endpoint("10.0.1.5", "node-a")
        key = endpoints.key(ep.ip)
        await endpoints.upsert(ep)
        value = (await backend.get(key) or pytest.fail("missing")).value
        is_back = holding(backend, key, value)

        async with asyncio.TaskGroup() as group:
            run = group.create_task(owners.run())
            await eventually(lambda: owner.self_watched() == [EP_PREFIX], message="own watch")
            async with collecting(_flat(endpoints.watch_ip_identities())) as events:
                await eventually(lambda: synced(events), message="the feed listed")
                await eventually(lambda: owner.self_watched() == [], message="the feed took over")
                observed = owner.events_observed
                foreign = endpoint("10.0.1.6", "node-b")
                await backend.put(
                    endpoints.key(foreign.ip), codec.encode("endpoint", foreign.to_dict())
                )
                await backend.delete(key)
                await eventually(lambda: repairs(metrics, "endpoint", "deleted") == 1)
                await eventually(is_back, message="deleted endpoint re-created from the feed")
                # the foreign put, our delete, our re-creation: each seen once
                await eventually(lambda: owner.events_observed - observed >= 3)
                assert owner.events_observed - observed == 3
            await eventually(lambda: owner.self_watched() == [EP_PREFIX], message="own again")
            await backend.delete(key)
            await eventually(lambda: repairs(metrics, "endpoint", "deleted") == 2)
            await eventually(is_back, message="deleted endpoint re-created by the own watch")
            run.cancel()


# ---------------------------------------------------------------------------------------
# Malformed data
# ---------------------------------------------------------------------------------------

BAD_ENDPOINTS: dict[str, bytes] = {
    "10.0.9.1": b"\xc1 not msgpack",
    "10.0.9.2": codec.encode("node", endpoint("10.0.9.2", "node-x").to_dict()),  # wrong kind
    "10.0.9.3": codec.encode("endpoint", {**endpoint("10.0.9.3", "n").to_dict(), "ip": "300.1"}),
    "10.0.9.4": codec.encode("endpoint", endpoint("10.0.9.5", "node-x").to_dict()),  # other ip
    "not-an-ip": codec.encode("endpoint", endpoint("10.0.9.6", "node-x").to_dict()),
    "10.0.9.7/extra": codec.encode("endpoint", endpoint("10.0.9.7", "node-x").to_dict()),
    "010.0.9.8": codec.encode("endpoint", endpoint("10.0.9.8", "node-x").to_dict()),
}
BAD_NODES: dict[str, bytes] = {
    "node-bad-1": b"\xc1 not msgpack",
    "node-bad-2": codec.encode("endpoint", node("node-bad-2").to_dict()),  # wrong kind
    "node-bad-3": codec.encode("node", {**node("node-bad-3").to_dict(), "ips": ["1.2.3"]}),
    "node-bad-4": codec.encode("node", node("node-other").to_dict()),  # other name
    "Bad_Name": codec.encode("node", node("node-x").to_dict()),
    "node-bad-5": codec.encode("node", {"v": 1}),
}


async def test_malformed_values_are_skipped_and_counted(etcd1: EmbeddedEtcd) -> None:
    metrics = StoreMetrics.create()
    async with ShardMap(one_cluster(etcd1)) as shards:
        backend = shards.backends["a"]
        endpoints = KvEndpointStore(shards, LAYOUT, metrics, None, node=None)
        nodes = KvNodeStore(shards, LAYOUT, metrics, None, node=None)
        good_ep, good_node = endpoint("10.0.1.2", "node-a"), node("node-a")
        await backend.put(endpoints.key(good_ep.ip), codec.encode("endpoint", good_ep.to_dict()))
        await backend.put(nodes.key("node-a"), codec.encode("node", good_node.to_dict()))
        for name, raw in BAD_ENDPOINTS.items():
            await backend.put(EP_PREFIX + name.encode(), raw)
        for name, raw in BAD_NODES.items():
            await backend.put(NODE_PREFIX + name.encode(), raw)

        assert [v.value for v in await endpoints.list()] == [good_ep]
        assert malformed(metrics, "endpoint") == len(BAD_ENDPOINTS)
        assert [v.value for v in await nodes.list()] == [good_node]
        assert malformed(metrics, "node") == len(BAD_NODES)
        assert await nodes.get(NodeName("node-bad-4")) is None
        assert malformed(metrics, "node") == len(BAD_NODES) + 1

        async with (
            collecting(endpoints.watch()) as ep_events,
            collecting(nodes.watch()) as node_events,
        ):
            await eventually(lambda: synced(ep_events) and synced(node_events), message="synced")
            assert listed(ep_events) == {"10.0.1.2": good_ep}
            assert listed(node_events) == {"node-a": good_node}
            assert malformed(metrics, "endpoint") == 2 * len(BAD_ENDPOINTS)
            assert malformed(metrics, "node") == 2 * len(BAD_NODES) + 1

            # More bad values while watching: skipped and counted; good ones still arrive,
            # and a good key turned bad reads as deleted.
            later_ep, later_node = endpoint("10.0.1.3", "node-a"), node("node-b")
            await backend.put(EP_PREFIX + b"10.0.9.20", b"\xc1")
            await backend.put(
                endpoints.key(later_ep.ip), codec.encode("endpoint", later_ep.to_dict())
            )
            await backend.put(endpoints.key(good_ep.ip), b"\xc1")
            await backend.put(NODE_PREFIX + b"node-bad-9", b"\xc1")
            await backend.put(nodes.key("node-b"), codec.encode("node", later_node.to_dict()))
            await eventually(lambda: len(after_sync(ep_events)) == 2, message="endpoint events")
            await eventually(lambda: len(after_sync(node_events)) == 1, message="node events")
            assert after_sync(ep_events) == [
                (EventKind.UPSERT, "10.0.1.3", later_ep),
                (EventKind.DELETE, "10.0.1.2", good_ep),
            ]
            assert after_sync(node_events) == [(EventKind.UPSERT, "node-b", later_node)]
            assert malformed(metrics, "endpoint") == 2 * len(BAD_ENDPOINTS) + 2
            assert malformed(metrics, "node") == 2 * len(BAD_NODES) + 2


async def test_ip_identity_watch_takes_and_skips_what_the_endpoint_watch_does(
    etcd1: EmbeddedEtcd,
) -> None:
    """The ipcache's view (fast msgspec path, strict fallback) of the same records: the
    good ones as their IPIdentity, every malformed one skipped and counted, in batches."""
    metrics = StoreMetrics.create()
    async with ShardMap(one_cluster(etcd1)) as shards:
        backend = shards.backends["a"]
        endpoints = KvEndpointStore(shards, LAYOUT, metrics, None, node=None)
        good = [endpoint("10.0.1.2", "node-a"), endpoint("fd00::5", "node-b", 2000)]
        for ep in good:
            await backend.put(endpoints.key(ep.ip), codec.encode("endpoint", ep.to_dict()))
        bad = {
            **BAD_ENDPOINTS,
            "FD00::6": codec.encode("endpoint", endpoint("fd00::6", "node-b").to_dict()),
            "fd00::7": codec.encode(
                "endpoint", {**endpoint("fd00::7", "node-b").to_dict(), "name": "Pod_7"}
            ),
        }
        for name, raw in bad.items():
            await backend.put(EP_PREFIX + name.encode(), raw)

        batches: list[list[StoreEvent[IPIdentity]]] = []

        async def pump() -> None:
            async for batch in endpoints.watch_ip_identities():
                batches.append(batch)

        task = asyncio.create_task(pump(), name="test-ip-identities")
        try:
            await eventually(lambda: synced([e for b in batches for e in b]), message="synced")
            assert all(batches), "no empty batch"
            events = [e for b in batches for e in b]
            assert listed(events) == {str(ep.ip): ep.ip_identity for ep in good}
            assert malformed(metrics, "endpoint") == len(bad)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


# ---------------------------------------------------------------------------------------
# Nodes
# ---------------------------------------------------------------------------------------


async def test_node_register_list_get_watch(etcd1: EmbeddedEtcd) -> None:
    metrics = StoreMetrics.create()
    async with ShardMap(one_cluster(etcd1)) as shards:
        store_a: NodeStore = KvNodeStore(
            shards, LAYOUT, metrics, owners_for(metrics), node=NodeName("node-a")
        )
        store_b: NodeStore = KvNodeStore(
            shards, LAYOUT, metrics, owners_for(metrics), node=NodeName("node-b")
        )
        reader: NodeStore = KvNodeStore(shards, LAYOUT, metrics, None, node=None)
        a, b = node("node-a"), node("node-b")
        await store_a.register(a)
        assert [v.value for v in await reader.list()] == [a]
        got = await reader.get(NodeName("node-a"))
        assert got is not None and got.value == a and got.version > 0
        assert await reader.get(NodeName("node-b")) is None

        async with collecting(reader.watch()) as events:
            await eventually(lambda: synced(events), message="node watch synced")
            assert listed(events) == {"node-a": a}
            a2 = node("node-a", boot_id="boot-2")
            await store_b.register(b)
            await store_a.register(a2)
            await store_b.deregister()
            await eventually(lambda: len(after_sync(events)) == 3, message="node changes")
            assert after_sync(events) == [
                (EventKind.UPSERT, "node-b", b),
                (EventKind.UPSERT, "node-a", a2),
                (EventKind.DELETE, "node-b", b),
            ]
        assert [v.value for v in await reader.list()] == [a2]

        with pytest.raises(ValueError, match="node-b"):
            await store_a.register(b)
        with pytest.raises(ReadOnlyStore):
            await reader.register(a)
        with pytest.raises(ReadOnlyStore):
            await reader.deregister()


async def test_node_record_on_every_cluster(etcd1: EmbeddedEtcd, etcd_b: EmbeddedEtcd) -> None:
    metrics = StoreMetrics.create()
    config = two_clusters(etcd1, etcd_b, {"endpoints": ("a", "b")})
    async with ShardMap(config) as shards:
        store = KvNodeStore(shards, LAYOUT, metrics, owners_for(metrics), node=NodeName("node-a"))
        reader = KvNodeStore(shards, LAYOUT, metrics, None, node=None)
        await store.register(node("node-a"))
        key = store.key("node-a")
        for backend in shards.all():
            kv = await backend.get(key)
            assert kv is not None and kv.lease != 0, backend.name
        assert [v.value for v in await reader.list()] == [node("node-a")]  # nodes: cluster a
        await store.deregister()
        for backend in shards.all():
            assert await backend.get(key) is None, backend.name


async def test_nodes_on_several_shards_are_deduplicated(
    etcd1: EmbeddedEtcd, etcd_b: EmbeddedEtcd
) -> None:
    metrics = StoreMetrics.create()
    config = two_clusters(etcd1, etcd_b, {"nodes": ("a", "b")})
    async with ShardMap(config) as shards:
        store_a = KvNodeStore(shards, LAYOUT, metrics, owners_for(metrics), node=NodeName("node-a"))
        store_b = KvNodeStore(shards, LAYOUT, metrics, owners_for(metrics), node=NodeName("node-b"))
        reader = KvNodeStore(shards, LAYOUT, metrics, None, node=None)
        a, b = node("node-a"), node("node-b")
        await store_a.register(a)
        await store_b.register(b)
        assert len(await shards.list_prefix("nodes", NODE_PREFIX)) == 4
        assert sorted(v.value.name for v in await reader.list()) == ["node-a", "node-b"]

        async with collecting(reader.watch()) as events:
            await eventually(lambda: synced(events), message="watch synced")
            assert listed(events) == {"node-a": a, "node-b": b}
            a2 = node("node-a", boot_id="boot-2")
            await store_a.register(a2)
            await store_b.deregister()
            await eventually(
                lambda: (
                    sorted(after_sync(events), key=lambda e: e[1])
                    == [(EventKind.UPSERT, "node-a", a2), (EventKind.DELETE, "node-b", b)]
                ),
                message="one event per node change",
            )
            # One more change proves nothing else was still on its way.
            await store_a.deregister()
            await eventually(lambda: len(after_sync(events)) == 3, message="third change")
            assert after_sync(events)[2] == (EventKind.DELETE, "node-a", a2)
        assert await reader.list() == []


# ---------------------------------------------------------------------------------------
# cpctl endpoint list / node list
# ---------------------------------------------------------------------------------------


async def test_cli_endpoint_and_node_list(
    etcd1: EmbeddedEtcd, capsys: pytest.CaptureFixture[str]
) -> None:
    metrics = StoreMetrics.create()
    config = KvstoreConfig(clusters=(EtcdClusterConfig("default", tuple(etcd1.client_urls)),))
    async with ShardMap(config) as shards:
        owners = owners_for(metrics)
        endpoints = KvEndpointStore(shards, LAYOUT, metrics, owners, node=NodeName("node-a"))
        nodes = KvNodeStore(shards, LAYOUT, metrics, owners, node=NodeName("node-a"))
        await nodes.register(node("node-a"))
        await endpoints.upsert(endpoint("10.0.1.10", "node-a"))
        await endpoints.upsert(endpoint("10.0.1.9", "node-a", identity=2000))
        backend: EtcdBackend = shards.backends["default"]
        await backend.put(EP_PREFIX + b"junk", b"\xc1")

        assert await cpctl_in_process(etcd1, "endpoint", "list") == 0
        out, err = capsys.readouterr()
        lines = out.splitlines()
        assert lines[0].split() == ["IP/PREFIX", "IDENTITY", "NODE", "HOST", "IP", "NAMESPACE/NAME"]
        assert lines[1].split() == [
            "10.0.1.9/32",
            "2000",
            "node-a",
            "192.168.0.1",
            "default/pod-10-0-1-9",
        ]
        assert lines[2].split()[0] == "10.0.1.10/32" and len(lines) == 3
        assert "2 endpoints; 1 malformed skipped" in err

        assert await cpctl_in_process(etcd1, "endpoint", "list", "--json") == 0
        data = json.loads(capsys.readouterr().out)
        assert data["malformed"] == 1
        assert [e["ip"] for e in data["endpoints"]] == ["10.0.1.9", "10.0.1.10"]
        first = data["endpoints"][0]
        assert first["prefix"] == "10.0.1.9/32" and first["identity"] == 2000
        assert first["node"] == "node-a" and first["revision"] > 0

        assert await cpctl_in_process(etcd1, "node", "list") == 0
        out, err = capsys.readouterr()
        lines = out.splitlines()
        assert lines[0].split() == ["NAME", "IPS", "POD", "CIDRS", "BOOT", "ID"]
        assert lines[1].split() == ["node-a", "192.168.0.1,fd00::1", "10.0.1.0/24", "boot-1"]
        assert "1 nodes" in err

        assert await cpctl_in_process(etcd1, "node", "list", "--json") == 0
        data = json.loads(capsys.readouterr().out)
        assert data["nodes"] == [
            {**node("node-a").to_dict(), "revision": data["nodes"][0]["revision"]}
        ]

        assert await cpctl_in_process(etcd1, "node", "list", "--cluster-name", "other") == 0
        assert capsys.readouterr().out.splitlines()[1:] == []
