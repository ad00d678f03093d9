"""The store contract, one suite run against both stores: ``kvstore`` (a real etcd) and
``crd`` (the local Kubernetes API server on its embedded etcd).

Each test gets a :class:`Backend` that builds the six stores of a node (plus the
operator's identity collector) and runs their background work (kvstore: the node's key
owners; crd: the stores' self-repair), and that can write what a store never would (a
malformed record, a delete by hand) straight into the backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest
import pytest_asyncio
from helpers import FAST, collecting, eventually, synced

from controlplane import codec
from controlplane.apiserver import KubeServer, KubeServerSettings
from controlplane.config import EtcdClusterConfig, KvstoreConfig
from controlplane.crd.client import KubeClient
from controlplane.crd.identities import CrdIdentityCollector
from controlplane.crd.install import install_crds
from controlplane.crd.kubeconfig import load_connection
from controlplane.crd.names import LABELS_HASH, POD_CIDR_POOL
from controlplane.crd.resources import (
    ENDPOINTS,
    IDENTITIES,
    NETWORK_POLICIES,
    NODES,
    POD_CIDRS,
)
from controlplane.crd.services import ENDPOINT_SLICES, SERVICE_NAME, SERVICES
from controlplane.crd.stores import node_stores
from controlplane.identity.allocator import IdentityAllocator
from controlplane.kvstore.embedded import EmbeddedEtcd
from controlplane.kvstore.endpoints import KvEndpointStore
from controlplane.kvstore.identities import KvIdentityCollector, KvIdentityStore
from controlplane.kvstore.ipam import KvCIDRStore, KvIPLeaseStore
from controlplane.kvstore.keys import KeyLayout
from controlplane.kvstore.nodes import KvNodeStore
from controlplane.kvstore.owner import Owners
from controlplane.kvstore.policies import KvPolicyStore
from controlplane.kvstore.services import KvServiceStore
from controlplane.kvstore.shards import ShardMap
from controlplane.metrics import StoreMetrics
from controlplane.model import (
    IDENTITY_HOST,
    IDENTITY_WORLD,
    CIDRPool,
    Endpoint,
    EndpointID,
    IngressRule,
    IPLease,
    Labels,
    NetworkPolicy,
    Node,
    NodeName,
    NumericIdentity,
    PortProtocol,
    Service,
    cluster_identity_range,
)
from controlplane.store import (
    CIDRStore,
    EndpointStore,
    IdentityCollector,
    IdentityStore,
    IPLeaseStore,
    NodeStore,
    PolicyStore,
    ServiceStore,
)
from controlplane.store_types import AddressConflict, CIDRClaim, EventKind, StoreEvent

T = TypeVar("T")
LAYOUT = KeyLayout()
POOL = CIDRPool(ip_network("10.0.0.0/16"), 24)


# ---------------------------------------------------------------------------------------
# The two backends
# ---------------------------------------------------------------------------------------


@dataclass
class NodeStores:
    name: NodeName
    metrics: StoreMetrics
    identities: IdentityStore
    endpoints: EndpointStore
    nodes: NodeStore
    cidrs: CIDRStore
    leases: IPLeaseStore
    policies: PolicyStore
    services: ServiceStore
    collector: IdentityCollector


class Backend(Protocol):
    kind: str

    def node(self, name: str) -> contextlib.AbstractAsyncContextManager[NodeStores]: ...

    async def put_malformed(self, resource: str, name: str) -> None:
        """Write a record of ``resource`` that the store's decoder must refuse."""
        ...

    async def corrupt_endpoint(self, endpoint: Endpoint) -> None:
        """Overwrite a published endpoint by hand with one whose ip is not an IP."""
        ...

    async def delete_endpoint(self, endpoint: Endpoint) -> None: ...

    async def delete_node(self, name: str) -> None: ...


@contextlib.asynccontextmanager
async def background(*jobs: Awaitable[None]) -> AsyncIterator[None]:
    tasks = [asyncio.ensure_future(job) for job in jobs]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


class KvBackend:
    kind = "kvstore"

    def __init__(self, etcd: EmbeddedEtcd, shards: ShardMap) -> None:
        self.config = KvstoreConfig(
            clusters=(EtcdClusterConfig("a", tuple(etcd.client_urls)),), client=FAST
        )
        self.raw = shards.all()[0]

    @contextlib.asynccontextmanager
    async def node(self, name: str) -> AsyncIterator[NodeStores]:
        async with ShardMap(self.config, own_connection=True) as shards:
            metrics = StoreMetrics.create()
            owners = Owners(metrics, ttl=30, keepalive_interval=0.2)
            node = NodeName(name)
            stores = NodeStores(
                node,
                metrics,
                identities=KvIdentityStore(shards, LAYOUT, metrics, owners, node=node),
                endpoints=KvEndpointStore(shards, LAYOUT, metrics, owners, node=node),
                nodes=KvNodeStore(shards, LAYOUT, metrics, owners, node=node),
                cidrs=KvCIDRStore(shards, LAYOUT, metrics),
                leases=KvIPLeaseStore(shards, LAYOUT, metrics, owners, node=node),
                policies=KvPolicyStore(shards, LAYOUT, metrics),
                services=KvServiceStore(shards, LAYOUT, metrics),
                collector=KvIdentityCollector(shards, LAYOUT, metrics),
            )
            async with background(owners.run()):
                yield stores

    async def put_malformed(self, resource: str, name: str) -> None:
        if resource == "endpoint":
            bad = {**endpoint(name, "node-x").to_dict(), "ip": "nope"}
            key, value = LAYOUT.ip("default", name), codec.encode("endpoint", bad)
        elif resource == "identity":
            key = LAYOUT.identity_id(int(name))
            value = codec.encode("identity", {"id": "x"})
        elif resource == "node":
            key = LAYOUT.node("default", name)
            value = codec.encode("node", {**node(name).to_dict(), "ips": ["nope"]})
        elif resource == "cidr-claim":
            key = LAYOUT.ipam_cidr("default", name)
            value = codec.encode("cidr-claim", {"node": "Not_A_Node"})
        elif resource == "ip-lease":
            key = LAYOUT.ipam_lease("node-a", name)
            value = codec.encode("ip-lease", {"owner": "has space"})
        elif resource == "policy":
            key = LAYOUT.policy("default", name)
            bad = {**policy(name).to_dict(), "endpoint_selector": [7]}
            value = codec.encode("policy", bad)
        elif resource == "service":
            key = LAYOUT.service("default", name)
            bad = {**service(name).to_dict(), "backends": [{"ip": "10.0.9.1", "port": 1,
                                                            "node": "Not_A_Node"}]}  # fmt: skip
            value = codec.encode("service", bad)
        else:
            raise AssertionError(resource)
        await self.raw.put(key, value)

    async def corrupt_endpoint(self, endpoint: Endpoint) -> None:
        bad = {**endpoint.to_dict(), "ip": "not-an-ip"}
        await self.raw.put(LAYOUT.ip("default", str(endpoint.ip)), codec.encode("endpoint", bad))

    async def delete_endpoint(self, endpoint: Endpoint) -> None:
        await self.raw.delete(LAYOUT.ip("default", str(endpoint.ip)))

    async def delete_node(self, name: str) -> None:
        await self.raw.delete(LAYOUT.node("default", name))


class CrdBackend:
    kind = "crd"

    def __init__(self, server: KubeServer, client: KubeClient) -> None:
        self.server = server
        self.raw = client

    def client(self) -> KubeClient:
        return KubeClient(load_connection(str(self.server.kubeconfig)))

    @contextlib.asynccontextmanager
    async def node(self, name: str) -> AsyncIterator[NodeStores]:
        async with self.client() as client:
            metrics = StoreMetrics.create()
            node = NodeName(name)
            built = node_stores(client, metrics, node)
            stores = NodeStores(
                node,
                metrics,
                identities=built.identities,
                endpoints=built.endpoints,
                nodes=built.nodes,
                cidrs=built.cidrs,
                leases=built.leases,
                policies=built.policies,
                services=built.services,
                collector=CrdIdentityCollector(client, metrics),
            )
            async with background(*(run() for run in built.tasks().values())):
                yield stores

    async def put_malformed(self, resource: str, name: str) -> None:
        meta: dict[str, Any] = {"name": name}
        if resource == "endpoint":
            meta = {"name": "bad-" + name.replace(".", "-"), "namespace": "default"}
            spec: dict[str, Any] = {
                "addressing": [{"family": "IPv4", "ip": "not-an-ip"}],
                "identity": {"id": 1000},
                "node": "node-x",
                "hostIP": "192.168.0.1",
            }
            await self.raw.create(ENDPOINTS, _obj(ENDPOINTS.kind, meta, spec))
        elif resource == "identity":
            meta = {"name": f"id-{name}", "labels": {LABELS_HASH: "0"}}
            await self.raw.create(IDENTITIES, _obj("Identity", meta, {"labels": ["k8s:a=b"]}))
        elif resource == "node":
            spec = {"addresses": [{"ip": "nope"}]}
            await self.raw.create(NODES, _obj("Node", meta, spec))
        elif resource == "cidr-claim":
            cidr = ip_network(name.replace("_", "/"))
            meta = {
                "name": f"default.{cidr.network_address}-{cidr.prefixlen}",
                "labels": {POD_CIDR_POOL: "default"},
            }
            spec = {"pool": "default", "cidr": str(cidr), "node": "Not_A_Node"}
            await self.raw.create(POD_CIDRS, _obj("PodCIDR", meta, spec))
        elif resource == "ip-lease":
            current = await self.raw.get_or_none(NODES, "node-a")
            if current is None:
                await self.raw.create(NODES, _obj("Node", {"name": "node-a"}, {}))
            patch = {"status": {"ipam": {"used": {name: "has space"}}}}
            await self.raw.patch(NODES, "node-a", patch, subresource="status")
        elif resource == "policy":
            meta = {"name": name, "namespace": "default"}
            spec = {
                "endpointSelector": ["k8s:app=web"],
                "ingress": [{"fromSelector": [], "ports": [{"port": 80, "protocol": "ANY"}]}],
            }
            await self.raw.create(NETWORK_POLICIES, _obj("NetworkPolicy", meta, spec))
        elif resource == "service":
            # the API server takes it; the model refuses the backend's node name
            body = {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name, "namespace": "default"},
                "spec": {"clusterIP": "10.96.0.99", "ports": [{"port": 80}]},
            }
            await self.raw.create(SERVICES, body)
            endpoint_slice = {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": name,
                    "namespace": "default",
                    "labels": {SERVICE_NAME: name},
                },
                "addressType": "IPv4",
                "endpoints": [{"addresses": ["10.0.9.1"], "nodeName": "Not_A_Node"}],
                "ports": [{"port": 1}],
            }
            await self.raw.create(ENDPOINT_SLICES, endpoint_slice)
        else:
            raise AssertionError(resource)

    async def corrupt_endpoint(self, endpoint: Endpoint) -> None:
        current = await self.raw.get(ENDPOINTS, endpoint.name, endpoint.namespace)
        current["spec"]["addressing"] = [{"family": "IPv4", "ip": "not-an-ip"}]
        current["spec"]["node"] = "node-x"  # someone else's now, so no repair undoes it
        await self.raw.replace(ENDPOINTS, current)

    async def delete_endpoint(self, endpoint: Endpoint) -> None:
        await self.raw.delete(ENDPOINTS, endpoint.name, namespace=endpoint.namespace)

    async def delete_node(self, name: str) -> None:
        await self.raw.delete(NODES, name)


def _obj(kind: str, meta: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "controlplane.io/v1", "kind": kind, "metadata": meta, "spec": spec}


@pytest_asyncio.fixture(params=["kvstore", "crd"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "kvstore":
        async with EmbeddedEtcd(1) as etcd:
            config = KvstoreConfig(
                clusters=(EtcdClusterConfig("a", tuple(etcd.client_urls)),), client=FAST
            )
            async with ShardMap(config) as shards:
                yield KvBackend(etcd, shards)
    else:
        settings = KubeServerSettings(data_dir=tmp_path / "kube", bookmark_interval=0.3)
        async with (
            KubeServer(settings) as server,
            KubeClient(load_connection(str(server.kubeconfig))) as client,
        ):
            await install_crds(client)
            yield CrdBackend(server, client)


# ---------------------------------------------------------------------------------------
# Values and helpers
# ---------------------------------------------------------------------------------------


def endpoint(ip: str, node: str, identity: int = 1000, name: str | None = None) -> Endpoint:
    return Endpoint(
        ip=ip_address(ip),
        identity=NumericIdentity(identity),
        node=NodeName(node),
        host_ip=ip_address("192.168.0.1"),
        name=name or "pod-" + ip.replace(".", "-").replace(":", "-").strip("-"),
        namespace="default",
    )


def node(name: str, boot_id: str = "boot-1") -> Node:
    return Node(
        name=NodeName(name),
        ips=(ip_address("192.168.0.1"), ip_address("fd00::1")),
        boot_id=boot_id,
    )


def policy(name: str, port: int = 80) -> NetworkPolicy:
    return NetworkPolicy(
        name=name,
        namespace="default",
        endpoint_selector=Labels.parse("k8s:app=web"),
        ingress=(IngressRule(Labels.parse("k8s:app=client"), (PortProtocol(port, 6),)),),
    )


def labels(i: int) -> Labels:
    return Labels.from_strings([f"k8s:app=app{i}", f"k8s:team=t{i % 3}"])


def malformed(metrics: StoreMetrics, resource: str) -> float:
    value = metrics.registry.get_sample_value(
        "cp_store_malformed_values_total", {"resource": resource}
    )
    return value or 0.0


def repairs(metrics: StoreMetrics, resource: str) -> float:
    total = 0.0
    for reason in ("deleted", "changed", "lease-lost"):
        sample = metrics.registry.get_sample_value(
            "cp_store_repairs_total", {"resource": resource, "reason": reason}
        )
        total += sample or 0.0
    return total


def listed(events: list[StoreEvent[T]]) -> dict[str, T | None]:
    out: dict[str, T | None] = {}
    for e in events:
        if e.kind is EventKind.SYNCED:
            return out
        assert e.kind is EventKind.UPSERT
        out[e.name] = e.value
    raise AssertionError("not synced")


def after_sync(events: list[StoreEvent[T]]) -> list[tuple[EventKind, str, T | None]]:
    marks = [i for i, e in enumerate(events) if e.kind is EventKind.SYNCED]
    assert len(marks) == 1, events
    return [(e.kind, e.name, e.value) for e in events[marks[0] + 1 :]]


def state(events: list[StoreEvent[T]]) -> dict[str, T | None]:
    """What a reader of the watch holds after every event so far."""
    out: dict[str, T | None] = {}
    for e in events:
        if e.kind is EventKind.UPSERT:
            out[e.name] = e.value
        elif e.kind is EventKind.DELETE:
            out.pop(e.name, None)
    return out


# ---------------------------------------------------------------------------------------
# Endpoints
# ---------------------------------------------------------------------------------------


async def test_endpoint_round_trip(backend: Backend) -> None:
    async with backend.node("node-a") as a, backend.node("node-r") as reader:
        e1, e6 = endpoint("10.0.1.5", "node-a"), endpoint("fd00::5", "node-a")
        await a.endpoints.upsert(e1)
        await a.endpoints.upsert(e6)
        got = await reader.endpoints.list()
        assert {v.value for v in got} == {e1, e6}
        assert all(v.version > 0 for v in got)

        async with collecting(reader.endpoints.watch()) as events:
            await eventually(lambda: synced(events), message="endpoint watch synced")
            assert listed(events) == {"10.0.1.5": e1, "fd00::5": e6}
            e2 = endpoint("10.0.1.6", "node-a")
            e1b = endpoint("10.0.1.5", "node-a", identity=2000)
            await a.endpoints.upsert(e2)
            await a.endpoints.upsert(e1b)
            await a.endpoints.remove(e1.ip)
            await eventually(lambda: len(after_sync(events)) == 3, message="three changes")
            assert after_sync(events) == [
                (EventKind.UPSERT, "10.0.1.6", e2),
                (EventKind.UPSERT, "10.0.1.5", e1b),
                (EventKind.DELETE, "10.0.1.5", e1b),
            ]
        assert {v.value for v in await reader.endpoints.list()} == {e2, e6}
        await a.endpoints.remove(ip_address("10.9.9.9"))  # absent: nothing to do
        with pytest.raises(ValueError, match="node-b"):
            await a.endpoints.upsert(endpoint("10.0.1.7", "node-b"))
        assert malformed(reader.metrics, "endpoint") == 0


async def test_one_pod_with_two_addresses(backend: Backend) -> None:
    """Two addresses of one pod are two store endpoints; removing one keeps the other."""
    async with backend.node("node-a") as a, backend.node("node-r") as reader:
        v4 = endpoint("10.0.1.8", "node-a", name="web-0")
        v6 = endpoint("fd00::8", "node-a", name="web-0")
        async with collecting(reader.endpoints.watch()) as events:
            await eventually(lambda: synced(events))
            await a.endpoints.upsert(v4)
            await a.endpoints.upsert(v6)
            await eventually(lambda: state(events) == {"10.0.1.8": v4, "fd00::8": v6})
            await a.endpoints.remove(v4.ip)
            await eventually(lambda: state(events) == {"fd00::8": v6})
            await a.endpoints.remove(v6.ip)
            await eventually(lambda: state(events) == {})
        assert await reader.endpoints.list() == []


async def test_ip_published_by_another_node_is_refused(backend: Backend) -> None:
    async with backend.node("node-a") as a, backend.node("node-b") as b:
        mine = endpoint("10.0.1.9", "node-a", name="pod-a")
        await a.endpoints.upsert(mine)
        with pytest.raises(AddressConflict):
            await b.endpoints.upsert(endpoint("10.0.1.9", "node-b", name="pod-b"))
        assert {v.value for v in await b.endpoints.list()} == {mine}
        await b.endpoints.remove(mine.ip)  # not b's: left alone
        assert {v.value for v in await a.endpoints.list()} == {mine}


async def test_endpoint_deleted_by_hand_comes_back(backend: Backend) -> None:
    async with backend.node("node-a") as a:
        mine = endpoint("10.0.1.10", "node-a")
        await a.endpoints.upsert(mine)
        await eventually(lambda: _has_repair_watch(a), message="repair watch running")
        await backend.delete_endpoint(mine)

        async def back() -> bool:
            listed = {v.value for v in await a.endpoints.list()}
            return listed == {mine} and repairs(a.metrics, "endpoint") >= 1

        await eventually(back, message="endpoint re-created (and the repair counted)")


def _has_repair_watch(stores: NodeStores) -> bool:
    repairer = getattr(stores.endpoints, "repairer", None)
    return repairer is None or repairer.synced.is_set()


async def test_malformed_endpoints_are_skipped_and_counted(backend: Backend) -> None:
    async with backend.node("node-a") as a, backend.node("node-r") as reader:
        good = endpoint("10.0.1.11", "node-a")
        await a.endpoints.upsert(good)
        await backend.put_malformed("endpoint", "10.0.1.12")
        assert {v.value for v in await reader.endpoints.list()} == {good}
        assert malformed(reader.metrics, "endpoint") == 1
        async with collecting(reader.endpoints.watch()) as events:
            await eventually(lambda: synced(events))
            assert listed(events) == {"10.0.1.11": good}
            # A record that turns malformed is a DELETE for readers.
            victim = endpoint("10.0.1.13", "node-b", name="victim")
            async with backend.node("node-b") as b:
                await b.endpoints.upsert(victim)
                await eventually(lambda: "10.0.1.13" in state(events))
            # (node-b's store is gone, so no self-repair puts it right again)
            await backend.corrupt_endpoint(victim)
            await eventually(lambda: "10.0.1.13" not in state(events))
        assert state(events) == {"10.0.1.11": good}
        assert malformed(reader.metrics, "endpoint") >= 3


async def test_ip_identity_watch_takes_and_skips_what_the_endpoint_watch_does(
    backend: Backend,
) -> None:
    async with backend.node("node-a") as a, backend.node("node-r") as reader:
        e1, e6 = endpoint("10.0.1.14", "node-a"), endpoint("fd00::14", "node-a", name="web-1")
        await a.endpoints.upsert(e1)
        await a.endpoints.upsert(e6)
        await backend.put_malformed("endpoint", "10.0.1.15")
        batches: list[list[StoreEvent[Any]]] = []

        async def pump() -> None:
            async for batch in reader.endpoints.watch_ip_identities():
                batches.append(batch)

        task = asyncio.create_task(pump())
        try:
            await eventually(lambda: any(synced(b) for b in batches))
            flat = [e for b in batches for e in b]
            assert listed(flat) == {"10.0.1.14": e1.ip_identity, "fd00::14": e6.ip_identity}
            assert all(b for b in batches)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert malformed(reader.metrics, "endpoint") == 1


# ---------------------------------------------------------------------------------------
# Nodes
# ---------------------------------------------------------------------------------------


async def test_node_register_get_list_watch(backend: Backend) -> None:
    async with backend.node("node-a") as a, backend.node("node-r") as reader:
        await a.nodes.register(node("node-a"))
        got = await reader.nodes.get(NodeName("node-a"))
        assert got is not None and got.value == node("node-a") and got.version > 0
        assert await reader.nodes.get(NodeName("node-zz")) is None
        async with collecting(reader.nodes.watch()) as events:
            await eventually(lambda: synced(events))
            assert listed(events) == {"node-a": node("node-a")}
            await a.nodes.register(node("node-a", boot_id="boot-2"))
            await eventually(lambda: state(events) == {"node-a": node("node-a", "boot-2")})
            await a.nodes.deregister()
            await eventually(lambda: state(events) == {})
            assert after_sync(events)[-1][0] is EventKind.DELETE
        assert await reader.nodes.list() == []
        with pytest.raises(ValueError):
            await a.nodes.register(node("node-b"))


async def test_node_deleted_by_hand_comes_back_and_malformed_nodes_are_skipped(
    backend: Backend,
) -> None:
    async with backend.node("node-a") as a, backend.node("node-r") as reader:
        await a.nodes.register(node("node-a"))
        await backend.put_malformed("node", "node-bad")
        assert [v.value for v in await reader.nodes.list()] == [node("node-a")]
        assert malformed(reader.metrics, "node") == 1
        await asyncio.sleep(0)  # let the repair watch start listing
        await eventually(
            lambda: (
                getattr(getattr(a.nodes, "repairer", None), "synced", asyncio.Event()).is_set()
                or backend.kind == "kvstore"
            ),
            message="node repair watch synced",
        )
        await backend.delete_node("node-a")

        async def back() -> bool:
            got = await reader.nodes.get(NodeName("node-a"))
            return got is not None and got.value == node("node-a")

        await eventually(back, message="node record re-created")


# ---------------------------------------------------------------------------------------
# Identities
# ---------------------------------------------------------------------------------------


async def test_identity_allocate_reference_lookup(backend: Backend) -> None:
    async with backend.node("node-a") as a, backend.node("node-b") as b:
        web = await a.identities.acquire(labels(1))
        assert cluster_identity_range().contains(web.id)
        assert await b.identities.acquire(labels(1)) == web  # the same ID for the same labels
        db = await a.identities.acquire(labels(2))
        assert db.id != web.id
        assert await a.identities.acquire(labels(1)) == web
        host = await a.identities.acquire(Labels.parse("reserved:host"))
        assert host.id == IDENTITY_HOST
        world = await a.identities.get(IDENTITY_WORLD)
        assert world is not None and str(world.value.labels) == "reserved:world"
        found = await b.identities.lookup(labels(2))
        assert found is not None and found.value == db
        got = await b.identities.get(db.id)
        assert got is not None and got.value == db and got.version > 0
        assert await b.identities.get(NumericIdentity(60000)) is None
        assert await b.identities.lookup(labels(3)) is None
        assert {v.value for v in await b.identities.list()} == {web, db}


async def test_identity_watch_and_malformed_identities(backend: Backend) -> None:
    async with backend.node("node-a") as a:
        first = await a.identities.acquire(labels(1))
        await backend.put_malformed("identity", "5000")
        async with collecting(a.identities.watch()) as events:
            await eventually(lambda: synced(events))
            assert listed(events) == {str(first.id): first}
            second = await a.identities.acquire(labels(2))
            await eventually(
                lambda: state(events) == {str(first.id): first, str(second.id): second}
            )
        assert {v.value for v in await a.identities.list()} == {first, second}
        assert malformed(a.metrics, "identity") >= 2


async def churn(
    allocator: IdentityAllocator, seed: int, ops: int, label_sets: int, seen: dict[int, Labels]
) -> None:
    """Random acquire/release on one node; records every ID handed out."""
    rng = random.Random(seed)
    held: list[Labels] = []
    for _ in range(ops):
        if held and rng.random() < 0.4:
            await allocator.release(held.pop(rng.randrange(len(held))))
        else:
            chosen = labels(rng.randrange(label_sets))
            identity = await allocator.acquire(chosen)
            assert identity.labels == chosen
            # Never an ID handed out for two label sets:
            assert seen.setdefault(identity.id, chosen) == chosen, identity
            held.append(chosen)


async def test_invariant_1_with_32_allocators(backend: Backend) -> None:
    """Invariant 1 under 32 concurrent allocators (seeded random acquire/release): one ID
    per label set, one label set per ID, never an ID handed out twice."""
    seen: dict[int, Labels] = {}
    async with contextlib.AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(backend.node(f"node-{i}")) for i in range(32)]
        allocators = [IdentityAllocator(n.identities) for n in nodes]
        async with asyncio.TaskGroup() as group:
            for i, allocator in enumerate(allocators):
                group.create_task(churn(allocator, 1000 + i, ops=25, label_sets=40, seen=seen))
        by_labels: dict[Labels, int] = {}
        for allocator in allocators:
            for lbls, (identity, _) in allocator.held().items():
                assert by_labels.setdefault(lbls, identity.id) == identity.id
        stored = [v.value for v in await nodes[0].identities.list()]
        assert len({i.labels for i in stored}) == len(stored), "a label set with two IDs"
        assert len({i.id for i in stored}) == len(stored)
        index = {i.labels: i.id for i in stored}
        for lbls, ident in by_labels.items():
            assert index[lbls] == ident
        # One label set per ID over the whole run (no ID was reused: nothing was collected).
        assert len(set(seen.values())) == len(seen)
        assert {i.id: i.labels for i in stored}.items() <= seen.items()


async def test_gc_needs_two_rounds_and_spares_users(backend: Backend) -> None:
    async with backend.node("node-a") as a, backend.node("operator") as op:
        allocator = IdentityAllocator(a.identities)
        used = await allocator.acquire(labels(1))
        unused = await allocator.acquire(labels(2))
        returning = await allocator.acquire(labels(3))
        # References: kvstore counts the node's reference keys, crd the Endpoint objects.
        await a.endpoints.upsert(endpoint("10.0.1.20", "node-a", identity=used.id))
        await allocator.release(labels(2))
        await allocator.release(labels(3))
        first = await op.collector.collect()
        assert (first.candidates, first.deleted) == (2, 0)
        # labels(3) gets a user between the rounds: its identity must survive.
        assert await allocator.acquire(labels(3)) == returning
        await a.endpoints.upsert(endpoint("10.0.1.21", "node-a", identity=returning.id))
        second = await op.collector.collect()
        assert second.deleted == 1
        remaining = {v.value for v in await a.identities.list()}
        assert remaining == {used, returning}
        assert unused not in remaining
        third = await op.collector.collect()
        assert (third.candidates, third.deleted) == (0, 0)


async def test_gc_racing_with_users_never_takes_a_used_identity(backend: Backend) -> None:
    """Eight nodes acquire identities and publish endpoints with them, release and
    withdraw them, while the collector runs round after round: at the end every identity a
    node holds exists with its labels (in crd mode an identity the GC took in its window
    between acquire and publish is put back by the node that holds it)."""
    async with contextlib.AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(backend.node(f"node-{i}")) for i in range(8)]
        operator = await stack.enter_async_context(backend.node("operator"))
        allocators = []
        for n in nodes:
            allocator = IdentityAllocator(n.identities)
            getattr(n.identities, "changed", []).append(allocator.identity_changed)
            allocators.append(allocator)
        stop = asyncio.Event()
        rounds = deleted = 0

        async def collector() -> None:
            nonlocal rounds, deleted
            while not stop.is_set():
                stats = await operator.collector.collect()
                rounds += 1
                deleted += stats.deleted

        async def work(index: int, seed: int) -> None:
            rng = random.Random(seed)
            n, allocator = nodes[index], allocators[index]
            held: list[tuple[Labels, Endpoint]] = []
            for op in range(60):
                if held and rng.random() < 0.5:
                    lbls, ep = held.pop(rng.randrange(len(held)))
                    await n.endpoints.remove(ep.ip)
                    await allocator.release(lbls)
                    continue
                lbls = labels(rng.randrange(16))
                identity = await allocator.acquire(lbls)
                ip = f"10.{index}.{op // 250}.{op % 250 + 1}"
                ep = endpoint(ip, n.name, identity=identity.id)
                await n.endpoints.upsert(ep)
                held.append((lbls, ep))

        async with asyncio.TaskGroup() as group:
            gc_task = group.create_task(collector())
            async with asyncio.TaskGroup() as workers:
                for i in range(len(nodes)):
                    workers.create_task(work(i, seed=7 + i))
            stop.set()
            await gc_task
        assert rounds >= 2 and deleted >= 1, (rounds, deleted)  # the race really happened

        async def consistent() -> bool:
            stored = {v.value.id: v.value.labels for v in await nodes[0].identities.list()}
            return all(
                stored.get(identity.id) == lbls
                for allocator in allocators
                for lbls, (identity, _) in allocator.held().items()
            )

        await eventually(consistent, message="every held identity exists with its labels")
        stored = [v.value for v in await nodes[0].identities.list()]
        assert len({i.labels for i in stored}) == len(stored), "a label set with two IDs"


# ---------------------------------------------------------------------------------------
# IPAM: CIDR claims and IP leases
# ---------------------------------------------------------------------------------------


async def test_cidr_claims_are_exclusive(backend: Backend) -> None:
    async with backend.node("operator-1") as op1, backend.node("operator-2") as op2:
        cidrs = list(POOL.iter_cidrs())[:4]
        results = await asyncio.gather(
            *(
                op.cidrs.claim(CIDRClaim("default", c, NodeName(n)))
                for c in cidrs
                for op, n in ((op1, "node-a"), (op2, "node-b"))
            )
        )
        # Each CIDR went to exactly one of the two claimants.
        for i in range(len(cidrs)):
            assert sorted(results[2 * i : 2 * i + 2]) == [False, True]
        claims = await op1.cidrs.list("default")
        assert sorted(c.value.cidr for c in claims) == cidrs
        assert await op1.cidrs.list("other") == []
        # A free names the version it read: a stale one frees nothing.
        victim = claims[0]
        assert await op2.cidrs.free(victim)
        assert not await op2.cidrs.free(victim)
        assert await op1.cidrs.claim(CIDRClaim("default", victim.value.cidr, NodeName("node-c")))
        stale = victim
        assert not await op1.cidrs.free(stale)
        assert len(await op1.cidrs.list("default")) == 4


async def test_cidr_watch_and_malformed_claims(backend: Backend) -> None:
    async with backend.node("operator") as op, backend.node("node-a") as a:
        first = CIDRClaim("default", ip_network("10.0.1.0/24"), NodeName("node-a"))
        assert await op.cidrs.claim(first)
        await backend.put_malformed("cidr-claim", "10.0.9.0_24")
        async with collecting(a.cidrs.watch("default")) as events:
            await eventually(lambda: synced(events))
            assert listed(events) == {"10.0.1.0_24": first}
            second = CIDRClaim("default", ip_network("10.0.2.0/24"), NodeName("node-b"))
            assert await op.cidrs.claim(second)
            await eventually(lambda: state(events) == {"10.0.1.0_24": first, "10.0.2.0_24": second})
            (claim,) = [c for c in await op.cidrs.list("default") if c.value == second]
            assert await op.cidrs.free(claim)
            await eventually(lambda: state(events) == {"10.0.1.0_24": first})
        assert [c.value for c in await a.cidrs.list("default")] == [first]
        assert malformed(a.metrics, "cidr-claim") >= 2


async def test_ip_leases_are_exclusive_and_outlive_the_store(backend: Backend) -> None:
    ip1, ip2 = ip_address("10.0.1.30"), ip_address("10.0.1.31")
    pod1, pod2 = EndpointID("default/pod-1"), EndpointID("default/pod-2")
    node_a = NodeName("node-a")
    async with backend.node("node-a") as first:
        await first.nodes.register(node("node-a"))
        assert await first.leases.claim(IPLease(node=node_a, ip=ip1, owner=pod1))
        assert await first.leases.claim(IPLease(node=node_a, ip=ip1, owner=pod1))  # ours: ok
        assert not await first.leases.claim(IPLease(node=node_a, ip=ip1, owner=pod2))
        assert await first.leases.claim(IPLease(node=node_a, ip=ip2, owner=pod2))
    # A new store of the same node (a restarted agent) sees them and cannot take them.
    async with backend.node("node-a") as second:
        leases = {v.value for v in await second.leases.list()}
        assert leases == {
            IPLease(node=node_a, ip=ip1, owner=pod1),
            IPLease(node=node_a, ip=ip2, owner=pod2),
        }
        assert not await second.leases.claim(IPLease(node=node_a, ip=ip1, owner=pod2))
        await second.leases.adopt(list(leases))
        await second.leases.release(ip2)
        assert {v.value for v in await second.leases.list()} == {
            IPLease(node=node_a, ip=ip1, owner=pod1)
        }
        with pytest.raises(ValueError):
            await second.leases.claim(IPLease(node=NodeName("node-b"), ip=ip2, owner=pod2))
    async with backend.node("node-a") as third:  # after both stores are gone
        assert {v.value for v in await third.leases.list()} == {
            IPLease(node=node_a, ip=ip1, owner=pod1)
        }


async def test_concurrent_lease_claims_on_one_ip(backend: Backend) -> None:
    node_a = NodeName("node-a")
    async with backend.node("node-a") as a, backend.node("node-a") as b:
        await a.nodes.register(node("node-a"))
        ip = ip_address("10.0.1.40")
        results = await asyncio.gather(
            *(
                store.leases.claim(IPLease(node=node_a, ip=ip, owner=EndpointID(f"default/p{i}")))
                for i, store in enumerate((a, b, a, b))
            )
        )
        assert results.count(True) == 1
        assert len(await a.leases.list()) == 1


async def test_malformed_leases_are_skipped_and_counted(backend: Backend) -> None:
    node_a = NodeName("node-a")
    async with backend.node("node-a") as a:
        await a.nodes.register(node("node-a"))
        good = IPLease(node=node_a, ip=ip_address("10.0.1.50"), owner=EndpointID("default/p"))
        assert await a.leases.claim(good)
        await backend.put_malformed("ip-lease", "10.0.1.51")
        assert [v.value for v in await a.leases.list()] == [good]
        assert malformed(a.metrics, "ip-lease") == 1


# ---------------------------------------------------------------------------------------
# Policies
# ---------------------------------------------------------------------------------------


async def test_policies_round_trip_watch_and_malformed(backend: Backend) -> None:
    async with backend.node("tool") as tool, backend.node("node-a") as a:
        web = policy("web")
        await tool.policies.put(web)
        await backend.put_malformed("policy", "broken")
        assert [v.value for v in await a.policies.list()] == [web]
        assert malformed(a.metrics, "policy") == 1
        async with collecting(a.policies.watch()) as events:
            await eventually(lambda: synced(events))
            assert listed(events) == {"default/web": web}
            web443 = policy("web", port=443)
            await tool.policies.put(web443)
            await eventually(lambda: state(events) == {"default/web": web443})
            assert await tool.policies.delete("default", "web")
            assert not await tool.policies.delete("default", "web")
            await eventually(lambda: state(events) == {})
        assert await a.policies.list() == []


# ---------------------------------------------------------------------------------------
# Services
# ---------------------------------------------------------------------------------------


def service(name: str, *backends: tuple[str, int, str | None], ip: str = "10.96.0.10") -> Service:
    """A service of one frontend (80/TCP) with backends (ip, port, node), in the order
    both stores give them back (CRD mode sorts them, as slices carry no order)."""
    return Service.from_dict(
        {
            "namespace": "default",
            "name": name,
            "cluster_ip": ip,
            "frontends": [{"port": 80, "protocol": "TCP"}],
            "backends": [
                {"ip": b_ip, "port": port, **({"node": node} if node else {})}
                for b_ip, port, node in sorted(backends, key=lambda b: (ip_address(b[0]), b[1]))
            ],
        }
    )


async def test_services_round_trip_watch_and_malformed(backend: Backend) -> None:
    async with backend.node("tool") as tool, backend.node("node-a") as a:
        web = service("web", ("10.0.1.2", 8080, "node-a"), ("10.0.1.1", 8080, None))
        await tool.services.put(web)
        await backend.put_malformed("service", "broken")
        assert [v.value for v in await a.services.list()] == [web]
        assert malformed(a.metrics, "service") == 1
        async with collecting(a.services.watch()) as events:
            await eventually(lambda: synced(events))
            assert listed(events) == {"default/web": web}
            moved = service("web", ("10.0.1.3", 9090, "node-b"), ip="10.96.0.11")
            await tool.services.put(moved)
            await eventually(lambda: state(events) == {"default/web": moved})
            empty = service("web", ip="10.96.0.11")
            await tool.services.put(empty)  # no backends: valid, refused by the datapath
            await eventually(lambda: state(events) == {"default/web": empty})
            assert await tool.services.delete("default", "web")
            assert not await tool.services.delete("default", "web")
            await eventually(lambda: state(events) == {})
        assert await a.services.list() == []


# Identity objects of the same labels made in a race, and other CRD-only behaviour, are
# in tests/test_crd_stores.py.
