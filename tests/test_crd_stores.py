"""What only the CRD store does, against the local API server: identity races resolved
by creation order, the GC's marks, the operator's spec.podCIDRs left alone, objects
deleted or edited by hand repaired."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from helpers import eventually

from controlplane.apiserver import KubeServer, KubeServerSettings
from controlplane.crd.client import KubeClient
from controlplane.crd.endpoints import CrdEndpointStore, EndpointConflict
from controlplane.crd.identities import CrdIdentityCollector, CrdIdentityStore, identity_object
from controlplane.crd.install import install_crds
from controlplane.crd.ipam import CrdCIDRStore, CrdIPLeaseStore, list_all_claims, list_all_leases
from controlplane.crd.kubeconfig import load_connection
from controlplane.crd.names import GC_MARK, labels_selector
from controlplane.crd.nodes import CrdNodeStore
from controlplane.crd.resources import ENDPOINTS, IDENTITIES, NODES
from controlplane.metrics import StoreMetrics
from controlplane.model import (
    Endpoint,
    EndpointID,
    Identity,
    IPLease,
    Labels,
    Node,
    NodeName,
    NumericIdentity,
)
from controlplane.store_types import AddressConflict, CIDRClaim, EventKind, StoreError


@pytest_asyncio.fixture
async def kube(tmp_path: Path) -> AsyncIterator[KubeClient]:
    settings = KubeServerSettings(data_dir=tmp_path / "kube", bookmark_interval=0.3)
    async with (
        KubeServer(settings) as server,
        KubeClient(load_connection(str(server.kubeconfig))) as client,
    ):
        await install_crds(client)
        yield client


@contextlib.asynccontextmanager
async def running(*jobs: Awaitable[None]) -> AsyncIterator[None]:
    tasks = [asyncio.ensure_future(job) for job in jobs]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def labels(i: int) -> Labels:
    return Labels.from_strings([f"k8s:app=app{i}"])


def endpoint(ip: str, node: str = "node-a", identity: int = 1000) -> Endpoint:
    return Endpoint(
        ip=ip_address(ip),
        identity=NumericIdentity(identity),
        node=NodeName(node),
        host_ip=ip_address("192.168.0.1"),
        name="pod-" + ip.replace(".", "-"),
        namespace="default",
    )


async def objects_of(client: KubeClient, lbls: Labels) -> list[dict[str, Any]]:
    return (await client.list(IDENTITIES, label_selector=labels_selector(lbls))).items


# -- identities -------------------------------------------------------------------------


async def test_racing_allocators_end_with_one_identity_per_label_set(kube: KubeClient) -> None:
    metrics = StoreMetrics.create()
    stores = [CrdIdentityStore(kube, metrics, node=NodeName(f"n{i}")) for i in range(8)]
    for i in range(6):
        got = await asyncio.gather(*(s.acquire(labels(i)) for s in stores))
        assert len({g.id for g in got}) == 1, got
        assert [o["metadata"]["name"] for o in await objects_of(kube, labels(i))] == [
            str(got[0].id)
        ]


async def test_a_creator_that_lost_the_race_deletes_its_orphan(
    kube: KubeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics = StoreMetrics.create()
    first = CrdIdentityStore(kube, metrics, node=NodeName("n1"))
    late = CrdIdentityStore(kube, metrics, node=NodeName("n2"))
    winner = await first.acquire(labels(1))
    # n2's lookup ran before n1's create landed: it sees nothing and creates its own.
    real = late._matches
    calls = 0

    async def stale_then_real(lbls: Labels) -> list[tuple[dict[str, Any], Identity]]:
        nonlocal calls
        calls += 1
        return [] if calls == 1 else await real(lbls)

    monkeypatch.setattr(late, "_matches", stale_then_real)
    assert await late.acquire(labels(1)) == winner  # the earliest created wins
    assert calls >= 2
    assert [o["metadata"]["name"] for o in await objects_of(kube, labels(1))] == [str(winner.id)]


async def test_earliest_created_wins_not_lowest_id(kube: KubeClient) -> None:
    """Two identities of one label set (a race left both): everyone adopts the one that
    was created first, even when the other has the lower ID."""
    await kube.create(IDENTITIES, identity_object(Identity(NumericIdentity(9000), labels(2))))
    await kube.create(IDENTITIES, identity_object(Identity(NumericIdentity(300), labels(2))))
    store = CrdIdentityStore(kube, StoreMetrics.create(), node=NodeName("n1"))
    assert (await store.acquire(labels(2))).id == 9000
    found = await store.lookup(labels(2))
    assert found is not None and found.value.id == 9000


async def test_gc_marks_then_deletes_and_an_acquire_removes_the_mark(kube: KubeClient) -> None:
    metrics = StoreMetrics.create()
    store = CrdIdentityStore(kube, metrics, node=NodeName("n1"))
    endpoints = CrdEndpointStore(kube, metrics, node=NodeName("node-a"))
    used = await store.acquire(labels(1))
    spared = await store.acquire(labels(2))
    doomed = await store.acquire(labels(3))
    await endpoints.upsert(endpoint("10.0.1.5", identity=used.id))
    # A reserved identity stored by hand is never the collector's business.
    reserved = identity_object(Identity(NumericIdentity(2), Labels.parse("reserved:world")))
    await kube.create(IDENTITIES, reserved)

    collector = CrdIdentityCollector(kube, metrics)
    first = await collector.collect()
    assert (first.candidates, first.deleted) == (2, 0)
    marked = {
        o["metadata"]["name"]
        for o in (await kube.list(IDENTITIES)).items
        if GC_MARK in (o["metadata"].get("annotations") or {})
    }
    assert marked == {str(spared.id), str(doomed.id)}
    assert await store.acquire(labels(2)) == spared  # removes the mark
    obj = await kube.get(IDENTITIES, str(spared.id))
    assert GC_MARK not in (obj["metadata"].get("annotations") or {})
    await endpoints.upsert(endpoint("10.0.1.6", identity=spared.id))  # and is used now

    # A new leader's collector deletes nothing it has not itself seen marked a round ago.
    successor = CrdIdentityCollector(kube, metrics)
    handover = await successor.collect()
    assert handover.deleted == 0
    second = await successor.collect()
    assert second.deleted == 1
    names = {o["metadata"]["name"] for o in (await kube.list(IDENTITIES)).items}
    assert names == {str(used.id), str(spared.id), "2"}


async def test_creation_order_survives_the_gc_marks(kube: KubeClient) -> None:
    """The first update of an identity (the GC's mark) records its creation revision, so
    a later resourceVersion never makes an older identity lose to a newer duplicate."""
    metrics = StoreMetrics.create()
    store = CrdIdentityStore(kube, metrics, node=NodeName("n1"))
    older = await store.acquire(labels(5))
    newer = Identity(NumericIdentity(older.id + 1 if older.id < 60000 else 300), labels(5))
    await kube.create(IDENTITIES, identity_object(newer))  # a duplicate, created later
    await CrdIdentityCollector(kube, metrics).collect()  # marks both: new resourceVersions
    assert await store.acquire(labels(5)) == older  # unmarks it: the newest version now
    assert await store.acquire(labels(5)) == older
    found = await store.lookup(labels(5))
    assert found is not None and found.value == older


async def test_identities_a_node_holds_are_repaired(kube: KubeClient) -> None:
    metrics = StoreMetrics.create()
    store = CrdIdentityStore(kube, metrics, node=NodeName("n1"))
    changes: list[tuple[Identity, Identity]] = []
    store.changed.append(lambda old, new: changes.append((old, new)))
    assert store.repairer is not None
    async with running(store.run()):
        await eventually(store.repairer.synced.is_set)
        held = await store.acquire(labels(1))
        name = str(held.id)

        async def holds(ident: int, lbls: Labels) -> bool:
            obj = await kube.get_or_none(IDENTITIES, str(ident))
            return obj is not None and obj["spec"]["labels"] == lbls.to_strings()

        # Deleted by hand (or by the GC in its window): re-created with the same ID.
        await kube.delete(IDENTITIES, name)
        await eventually(lambda: holds(held.id, labels(1)), message="re-created")
        # Labels edited by hand: put back.
        obj = await kube.get(IDENTITIES, name)
        obj["spec"]["labels"] = labels(9).to_strings()
        await kube.replace(IDENTITIES, obj)
        await eventually(lambda: holds(held.id, labels(1)), message="labels put back")
        assert changes == []
        # Deleted while another identity of the same labels exists: adopt that one, and
        # tell the node (its endpoints must be re-published with the new number).
        other = Identity(NumericIdentity(held.id + 1 if held.id < 60000 else 300), labels(1))
        await kube.create(IDENTITIES, identity_object(other))
        await kube.delete(IDENTITIES, name)
        await eventually(lambda: changes == [(held, other)], message="moved to the other")
        # A released identity is not the node's to repair any more.
        await store.release(other)
        await kube.delete(IDENTITIES, str(other.id))
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:  # and stays deleted
            assert await _gone(kube, other.id)
            await asyncio.sleep(0.05)
    assert (
        metrics.registry.get_sample_value(
            "cp_store_repairs_total", {"resource": "identity", "reason": "deleted"}
        )
        or 0
    ) >= 2


async def _gone(kube: KubeClient, ident: int) -> bool:
    return await kube.get_or_none(IDENTITIES, str(ident)) is None


async def test_an_identity_the_gc_took_in_its_window_comes_back(kube: KubeClient) -> None:
    """A node adopted an identity but has not published its Endpoint for two GC rounds:
    the GC deletes it; the node, still holding it, re-creates it with the same ID."""
    metrics = StoreMetrics.create()
    store = CrdIdentityStore(kube, metrics, node=NodeName("n1"))
    assert store.repairer is not None
    async with running(store.run()):
        await eventually(store.repairer.synced.is_set)
        held = await store.acquire(labels(4))
        collector = CrdIdentityCollector(kube, metrics)
        await collector.collect()
        assert (await collector.collect()).deleted == 1

        async def back() -> bool:
            got = await store.get(held.id)
            return got is not None and got.value == held

        await eventually(back, message="re-created with the same ID")


async def test_acquire_of_a_known_identity_needs_no_list(
    kube: KubeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With its watch running, a node adopts an identity it has seen without asking the
    API server (a marked one costs the guarded unmark only)."""
    metrics = StoreMetrics.create()
    first = await CrdIdentityStore(kube, metrics, node=NodeName("n1")).acquire(labels(1))
    marked = await CrdIdentityStore(kube, metrics, node=NodeName("n1")).acquire(labels(2))
    await CrdIdentityCollector(kube, metrics).collect()  # marks both (no endpoints)
    store = CrdIdentityStore(kube, metrics, node=NodeName("n2"))

    async def no_list(lbls: Labels) -> list[tuple[dict[str, Any], Identity]]:
        raise AssertionError(f"listed the API server for {lbls}")

    async with running(store.run()):

        async def indexed() -> bool:
            return bool(store._indexed_matches(labels(1)) and store._indexed_matches(labels(2)))

        await eventually(indexed, message="the watch indexed both")
        monkeypatch.setattr(store, "_matches", no_list)
        assert await store.acquire(labels(1)) == first
        assert await store.acquire(labels(2)) == marked
    obj = await kube.get(IDENTITIES, str(marked.id))
    assert GC_MARK not in (obj["metadata"].get("annotations") or {})


# -- endpoints ----------------------------------------------------------------------------


async def test_endpoint_edited_by_hand_is_put_back(kube: KubeClient) -> None:
    metrics = StoreMetrics.create()
    store = CrdEndpointStore(kube, metrics, node=NodeName("node-a"))
    mine = endpoint("10.0.1.6")
    async with running(store.run()):
        await store.upsert(mine)
        assert store.repairer is not None
        await eventually(store.repairer.synced.is_set)
        obj = await kube.get(ENDPOINTS, mine.name, "default")
        obj["spec"]["identity"]["id"] = 4242
        await kube.replace(ENDPOINTS, obj)

        async def restored() -> bool:
            current = await kube.get(ENDPOINTS, mine.name, "default")
            return bool(current["spec"]["identity"]["id"] == 1000)

        await eventually(restored, message="identity put back")
    assert {v.value for v in await store.list()} == {mine}


async def test_a_pod_object_of_another_node_is_not_taken(kube: KubeClient) -> None:
    metrics = StoreMetrics.create()
    a = CrdEndpointStore(kube, metrics, node=NodeName("node-a"))
    b = CrdEndpointStore(kube, metrics, node=NodeName("node-b"))
    await a.upsert(endpoint("10.0.1.7"))
    theirs = Endpoint(
        ip=ip_address("10.0.2.7"),
        identity=NumericIdentity(1000),
        node=NodeName("node-b"),
        host_ip=ip_address("192.168.0.2"),
        name="pod-10-0-1-7",
        namespace="default",
    )
    with pytest.raises(EndpointConflict):
        await b.upsert(theirs)
    assert {v.value for v in await a.list()} == {endpoint("10.0.1.7")}


# -- nodes and IP leases -----------------------------------------------------------------


async def test_register_leaves_the_operators_pod_cidrs_alone(kube: KubeClient) -> None:
    metrics = StoreMetrics.create()
    nodes = CrdNodeStore(kube, metrics, node=NodeName("node-a"))
    me = Node(name=NodeName("node-a"), ips=(ip_address("192.168.0.1"),), boot_id="b1")
    await nodes.register(me)
    await kube.patch(NODES, "node-a", {"spec": {"podCIDRs": ["10.0.1.0/24"]}})  # operator
    await nodes.register(Node(name=me.name, ips=me.ips, boot_id="b2"))
    got = await nodes.get(me.name)
    assert got is not None
    assert [str(c) for c in got.value.pod_cidrs] == ["10.0.1.0/24"]
    assert got.value.boot_id == "b2"


async def test_node_deleted_by_hand_comes_back_with_its_leases(kube: KubeClient) -> None:
    metrics = StoreMetrics.create()
    name = NodeName("node-a")
    nodes = CrdNodeStore(kube, metrics, node=name)
    leases = CrdIPLeaseStore(kube, metrics, node=name)
    lease = IPLease(node=name, ip=ip_address("10.0.1.9"), owner=EndpointID("default/p"))
    async with running(nodes.run(), leases.run()):
        await nodes.register(Node(name=name, ips=(ip_address("192.168.0.1"),), boot_id="b"))
        assert await leases.claim(lease)
        assert nodes.repairer is not None
        await eventually(nodes.repairer.synced.is_set)
        await eventually(leases.repairer.synced.is_set)
        await kube.delete(NODES, name)

        async def back() -> bool:
            got = await nodes.get(name)
            return (
                got is not None
                and got.value.boot_id == "b"
                and [v.value for v in await leases.list()] == [lease]
            )

        await eventually(back, message="node and lease restored")
        # A deregistered node stays gone: the lease store does not bring it back.
        await nodes.deregister()
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            assert await kube.get_or_none(NODES, name) is None
            await asyncio.sleep(0.05)


# -- an API server outage -------------------------------------------------------------------


async def test_stores_ride_out_an_api_server_restart(tmp_path: Path) -> None:
    """A reader's view keeps every entry while the API server is down (no DELETE), writes
    fail with a StoreError meanwhile, and everything converges once it is back."""
    data = tmp_path / "kube"
    server = KubeServer(KubeServerSettings(data_dir=data, bookmark_interval=0.3))
    await server.start()
    restarted: KubeServer | None = None
    try:
        connection = load_connection(str(server.kubeconfig))
        port = int(server.url.rsplit(":", 1)[1])
        async with (
            KubeClient(connection, request_timeout=2.0) as writer_client,
            KubeClient(connection, request_timeout=2.0) as reader_client,
        ):
            await install_crds(writer_client)
            metrics = StoreMetrics.create()
            writer = CrdEndpointStore(writer_client, metrics, node=NodeName("node-a"))
            reader = CrdEndpointStore(reader_client, StoreMetrics.create())
            events: list[Any] = []

            async def pump() -> None:
                async for event in reader.watch():
                    events.append(event)

            async with running(writer.run(), pump()):
                before = endpoint("10.0.1.60")
                await writer.upsert(before)
                await eventually(lambda: any(e.name == "10.0.1.60" for e in events))
                await server.stop()
                with pytest.raises(StoreError):
                    await writer.upsert(endpoint("10.0.1.61"))
                settings = KubeServerSettings(data_dir=data, port=port, bookmark_interval=0.3)
                restarted = KubeServer(settings)
                await restarted.start()
                after = endpoint("10.0.1.62")
                await writer.upsert(after)
                await eventually(lambda: any(e.name == "10.0.1.62" for e in events))
            assert all(e.kind is not EventKind.DELETE for e in events)
            assert {v.value for v in await reader.list()} == {before, after}
    finally:
        await server.stop()
        if restarted is not None:
            await restarted.stop()


# -- read-only views for cpctl ------------------------------------------------------------


async def test_views_for_cpctl(kube: KubeClient) -> None:
    metrics = StoreMetrics.create()
    ids = CrdIdentityStore(kube, metrics)  # read-only
    with pytest.raises(RuntimeError):
        await ids.acquire(labels(1))
    web = await CrdIdentityStore(kube, metrics, node=NodeName("n1")).acquire(labels(1))
    for node_name, ip in (("node-a", "10.0.1.70"), ("node-b", "10.0.2.70")):
        store = CrdEndpointStore(kube, metrics, node=NodeName(node_name))
        await store.upsert(endpoint(ip, node_name, identity=web.id))
    assert await ids.references() == {web.id: ["node-a", "node-b"]}

    for node_name, ip in (("node-b", "10.0.2.5"), ("node-a", "10.0.1.5"), ("node-a", "10.0.1.4")):
        leases = CrdIPLeaseStore(kube, metrics, node=NodeName(node_name))
        owner = EndpointID(f"default/{node_name}-{ip}")
        assert await leases.claim(IPLease(node=NodeName(node_name), ip=ip_address(ip), owner=owner))
    listed = [(str(v.value.node), str(v.value.ip)) for v in await list_all_leases(kube, metrics)]
    assert listed == [("node-a", "10.0.1.4"), ("node-a", "10.0.1.5"), ("node-b", "10.0.2.5")]

    cidrs = CrdCIDRStore(kube, metrics)
    for cidr, node_name in (("10.0.2.0/24", "node-b"), ("10.0.1.0/24", "node-a")):
        assert await cidrs.claim(CIDRClaim("default", ip_network(cidr), NodeName(node_name)))
    assert await cidrs.claim(CIDRClaim("other", ip_network("10.9.0.0/24"), NodeName("node-c")))
    claims = [str(v.value.cidr) for v in await list_all_claims(kube, metrics)]
    assert claims == ["10.0.1.0/24", "10.0.2.0/24"]
    assert [str(v.value.cidr) for v in await list_all_claims(kube, metrics, "other")] == [
        "10.9.0.0/24"
    ]
    v6 = CIDRClaim("default", ip_network("fd00:0:0:1::/64"), NodeName("node-d"))
    assert await cidrs.claim(v6)
    assert not await cidrs.claim(v6)


async def test_an_ip_claimed_by_two_objects_is_shown_once(kube: KubeClient) -> None:
    """Two Endpoint objects naming one IP (written by hand, or two nodes at one instant):
    every reader shows the claim of the object whose namespace/name sorts first, and
    deletes the IP only when no object claims it any more."""

    def pod(name: str, node: str, identity: int) -> dict[str, Any]:
        return {
            "apiVersion": "controlplane.io/v1",
            "kind": "Endpoint",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {
                "addressing": [{"family": "IPv4", "ip": "10.0.5.5"}],
                "identity": {"id": identity},
                "node": node,
                "hostIP": "192.168.0.9",
            },
        }

    reader = CrdEndpointStore(kube, StoreMetrics.create())
    events: list[Any] = []

    async def pump() -> None:
        async for event in reader.watch():
            events.append(event)

    def shown() -> dict[str, int]:
        out: dict[str, int] = {}
        for e in events:
            if e.kind is EventKind.UPSERT:
                out[e.name] = e.value.identity
            elif e.kind is EventKind.DELETE:
                out.pop(e.name, None)
        return out

    async with running(pump()):
        await eventually(lambda: any(e.kind is EventKind.SYNCED for e in events))
        await kube.create(ENDPOINTS, pod("pod-b", "node-b", 2000))
        await eventually(lambda: shown() == {"10.0.5.5": 2000})
        await kube.create(ENDPOINTS, pod("pod-a", "node-a", 1000))  # sorts first: wins
        await eventually(lambda: shown() == {"10.0.5.5": 1000})
        (listed,) = await reader.list()
        assert listed.value.identity == 1000
        await kube.delete(ENDPOINTS, "pod-a", namespace="default")
        await eventually(lambda: shown() == {"10.0.5.5": 2000})
        await kube.delete(ENDPOINTS, "pod-b", namespace="default")
        await eventually(lambda: shown() == {})


@pytest.mark.parametrize("ipcache_watch", [False, True])
async def test_address_checks_with_and_without_the_ipcache_watch(
    kube: KubeClient, monkeypatch: pytest.MonkeyPatch, ipcache_watch: bool
) -> None:
    """Before writing an IP the store asks who claims it: the API server (a label-selected
    list) or, while its ipcache watch runs, what that watch has seen (no request)."""
    metrics = StoreMetrics.create()
    a = CrdEndpointStore(kube, metrics, node=NodeName("node-a"))
    b = CrdEndpointStore(kube, metrics, node=NodeName("node-b"))
    theirs = endpoint("10.0.7.1", "node-b")
    await b.upsert(theirs)
    stale = endpoint("10.0.7.2", "node-a")
    await a.upsert(stale)
    batches: list[Any] = []

    async def pump() -> None:
        async for batch in a.watch_ip_identities():
            batches.append(batch)

    async with running(pump()) if ipcache_watch else contextlib.nullcontext():
        if ipcache_watch:
            await eventually(lambda: any(e.kind is EventKind.SYNCED for b_ in batches for e in b_))
            real_list = kube.list

            async def no_address_lists(resource: Any, **kw: Any) -> Any:
                assert not (kw.get("label_selector") or "").startswith("controlplane.io/ip")
                return await real_list(resource, **kw)

            monkeypatch.setattr(kube, "list", no_address_lists)
        with pytest.raises(AddressConflict):
            await a.upsert(endpoint("10.0.7.1", "node-a", identity=1001))
        # The same IP for a new pod of ours: taken from our stale object (now empty: gone).
        moved = Endpoint(
            ip=stale.ip,
            identity=NumericIdentity(1002),
            node=NodeName("node-a"),
            host_ip=stale.host_ip,
            name="pod-new",
            namespace="default",
        )
        await a.upsert(moved)
        assert await kube.get_or_none(ENDPOINTS, stale.name, "default") is None
        assert {v.value for v in await a.list()} == {theirs, moved}


async def test_republishing_an_unchanged_endpoint_writes_nothing(kube: KubeClient) -> None:
    """An agent re-publishes its endpoints after a restart: unchanged ones cost a read,
    not a write that every other agent's watch would receive."""
    mine = endpoint("10.0.8.1")
    await CrdEndpointStore(kube, StoreMetrics.create(), node=NodeName("node-a")).upsert(mine)
    before = (await kube.get(ENDPOINTS, mine.name, "default"))["metadata"]["resourceVersion"]
    restarted = CrdEndpointStore(kube, StoreMetrics.create(), node=NodeName("node-a"))
    await restarted.upsert(mine)
    after = (await kube.get(ENDPOINTS, mine.name, "default"))["metadata"]["resourceVersion"]
    assert after == before
    await restarted.upsert(endpoint("10.0.8.1", identity=1001))  # a change is written
    changed = await kube.get(ENDPOINTS, mine.name, "default")
    assert changed["metadata"]["resourceVersion"] != before
    assert changed["spec"]["identity"]["id"] == 1001
