"""`cpctl migrate`: copies between CRD mode (the local API server) and kvstore mode (a real
etcd), both ways; the dry run, idempotence, resumption, conflicts (nothing written), the
drift of `cpctl migrate status`, and the agents' adoption of what was copied."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from helpers import FAST

from controlplane.apiserver import KubeServer, KubeServerSettings
from controlplane.config import CrdConfig, EtcdClusterConfig, KvstoreConfig
from controlplane.crd.client import KubeClient
from controlplane.crd.install import install_crds
from controlplane.crd.kubeconfig import load_connection
from controlplane.crd.resources import IDENTITIES, NODES
from controlplane.crd.stores import node_stores
from controlplane.kvstore.embedded import EmbeddedEtcd
from controlplane.kvstore.endpoints import KvEndpointStore
from controlplane.kvstore.identities import KvIdentityStore
from controlplane.kvstore.ipam import KvCIDRStore, KvIPLeaseStore
from controlplane.kvstore.keys import KeyLayout
from controlplane.kvstore.nodes import KvNodeStore
from controlplane.kvstore.owner import Owners
from controlplane.kvstore.policies import KvPolicyStore
from controlplane.kvstore.services import KvServiceStore
from controlplane.kvstore.shards import ShardMap
from controlplane.metrics import StoreMetrics
from controlplane.migrate.plan import drift, read_snapshot
from controlplane.migrate.run import Conflicts, copy_missing
from controlplane.migrate.side import open_side
from controlplane.model import (
    Backend,
    Endpoint,
    EndpointID,
    Frontend,
    Identity,
    IngressRule,
    IPLease,
    Labels,
    NetworkPolicy,
    Node,
    NodeName,
    PortProtocol,
    Service,
)
from controlplane.store_types import CIDRClaim

LAYOUT = KeyLayout()
CPCTL = str(Path(sys.executable).with_name("cpctl"))
NODES_ = ("node-a", "node-b")


@dataclass
class Cluster:
    """One CRD-mode API server and one kvstore etcd, side by side."""

    server: KubeServer
    client: KubeClient
    etcd: EmbeddedEtcd
    shards: ShardMap

    @property
    def crd(self) -> CrdConfig:
        return CrdConfig(kubeconfig=str(self.server.kubeconfig))

    @property
    def kv(self) -> KvstoreConfig:
        return KvstoreConfig(
            clusters=(EtcdClusterConfig("a", tuple(self.etcd.client_urls)),), client=FAST
        )

    def flags(self) -> list[str]:
        return [
            "--kubeconfig",
            str(self.server.kubeconfig),
            "--kvstore-endpoints",
            ",".join(self.etcd.client_urls),
        ]

    async def kv_keys(self) -> dict[bytes, bytes]:
        result = await self.shards.all()[0].list_prefix(LAYOUT.state_prefix)
        return {kv.key: kv.value for kv in result.kvs}

    async def crd_objects(self) -> int:
        total = 0
        for resource in (IDENTITIES, NODES):
            total += len((await self.client.list(resource)).items)
        return total


@pytest_asyncio.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    settings = KubeServerSettings(data_dir=tmp_path / "kube", bookmark_interval=0.3)
    async with (
        KubeServer(settings) as server,
        KubeClient(load_connection(str(server.kubeconfig))) as client,
        EmbeddedEtcd(1) as etcd,
    ):
        await install_crds(client)
        config = KvstoreConfig(
            clusters=(EtcdClusterConfig("a", tuple(etcd.client_urls)),), client=FAST
        )
        async with ShardMap(config) as shards:
            yield Cluster(server, client, etcd, shards)


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


# -- the state both tests write: two nodes, their CIDRs, leases, endpoints, a policy --------

LABELS = {
    "node-a": [Labels.from_strings(["k8s:app=web"]), Labels.from_strings(["k8s:app=db"])],
    "node-b": [Labels.from_strings(["k8s:app=web"])],
}
CIDRS = {"node-a": ip_network("10.0.1.0/24"), "node-b": ip_network("10.0.2.0/24")}
POLICY = NetworkPolicy(
    name="db",
    namespace="default",
    endpoint_selector=Labels.from_strings(["k8s:app=db"]),
    ingress=(IngressRule(Labels.from_strings(["k8s:app=web"]), (PortProtocol(5432, 6),)),),
)


SERVICE = Service(
    namespace="default",
    name="web",
    cluster_ip=ip_address("10.96.0.10"),
    frontends=(Frontend(port=80, name="http"),),
    backends=(
        Backend(ip=ip_address("10.0.1.10"), port=8080, node=NodeName("node-a"), frontend="http"),
    ),
)


def node_record(name: str) -> Node:
    return Node(
        name=NodeName(name),
        ips=(ip_address("192.168.0.1" if name == "node-a" else "192.168.0.2"),),
        pod_cidrs=(CIDRS[name],),
        boot_id=f"boot-{name}",
    )


def pods(name: str) -> list[tuple[EndpointID, Labels, Any]]:
    cidr = CIDRS[name]
    return [
        (EndpointID(f"default/{name}-pod{i}"), labels, cidr.network_address + 10 + i)
        for i, labels in enumerate(LABELS[name])
    ]


async def populate(stores: Any, name: str, *, crd_client: KubeClient | None = None) -> None:
    """What a node's agent and the operator would write, through a node's real stores."""
    node = NodeName(name)
    record = node_record(name)
    await stores.nodes.register(record)
    assert await stores.cidrs.claim(CIDRClaim("default", CIDRS[name], node))
    if crd_client is not None:  # the CRD operator writes the node's CIDR into its spec
        await crd_client.patch(NODES, name, {"spec": {"podCIDRs": [str(CIDRS[name])]}})
    for eid, labels, ip in pods(name):
        assert await stores.leases.claim(IPLease(node=node, ip=ip, owner=eid))
        identity = await stores.identities.acquire(labels)
        namespace, _, pod = eid.partition("/")
        await stores.endpoints.upsert(
            Endpoint(
                ip=ip,
                identity=identity.id,
                node=node,
                host_ip=record.ips[0],
                name=pod,
                namespace=namespace,
            )
        )


@contextlib.asynccontextmanager
async def crd_node(cluster: Cluster, name: str) -> AsyncIterator[Any]:
    async with KubeClient(load_connection(str(cluster.server.kubeconfig))) as client:
        built = node_stores(client, StoreMetrics.create(), NodeName(name))
        async with background(*(run() for run in built.tasks().values())):
            yield built


@dataclass
class KvNode:
    identities: KvIdentityStore
    endpoints: KvEndpointStore
    nodes: KvNodeStore
    cidrs: KvCIDRStore
    leases: KvIPLeaseStore
    policies: KvPolicyStore


@contextlib.asynccontextmanager
async def kv_node(cluster: Cluster, name: str) -> AsyncIterator[KvNode]:
    async with ShardMap(cluster.kv, own_connection=True) as shards:
        metrics = StoreMetrics.create()
        owners = Owners(metrics, ttl=30, keepalive_interval=0.2)
        node = NodeName(name)
        stores = KvNode(
            identities=KvIdentityStore(shards, LAYOUT, metrics, owners, node=node),
            endpoints=KvEndpointStore(shards, LAYOUT, metrics, owners, node=node),
            nodes=KvNodeStore(shards, LAYOUT, metrics, owners, node=node),
            cidrs=KvCIDRStore(shards, LAYOUT, metrics),
            leases=KvIPLeaseStore(shards, LAYOUT, metrics, owners, node=node),
            policies=KvPolicyStore(shards, LAYOUT, metrics),
        )
        async with background(owners.run()):
            yield stores


async def cpctl(*args: str) -> tuple[int, str, str]:
    env = {**os.environ}
    for var in ("CP_STORE", "CP_KVSTORE_ENDPOINTS", "CP_KVSTORE_CONFIG", "KUBECONFIG"):
        env.pop(var, None)
    proc = await asyncio.create_subprocess_exec(
        CPCTL,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def snapshots(cluster: Cluster) -> tuple[Any, Any]:
    metrics = StoreMetrics.create()
    async with (
        open_side(cluster.crd, metrics) as crd,
        open_side(cluster.kv, metrics) as kv,
    ):
        return await read_snapshot(crd), await read_snapshot(kv)


def identity_numbers(snapshot: Any) -> dict[str, int]:
    return {i.labels.canonical(): int(i.id) for i in snapshot.identities.values()}


# -- crd -> kvstore ------------------------------------------------------------------------


async def test_crd_to_kvstore_copies_everything_once_and_agents_adopt_it(
    cluster: Cluster,
) -> None:
    for name in NODES_:
        async with crd_node(cluster, name) as stores:
            await populate(stores, name, crd_client=cluster.client)
    async with crd_node(cluster, "node-a") as stores:
        await stores.policies.put(POLICY)

    # the dry run prints the plan and writes nothing
    status, out, err = await cpctl(
        "migrate", "--from", "crd", "--to", "kvstore", "--dry-run", *cluster.flags()
    )
    assert status == 0, err
    assert "would write endpoint" in out and "nothing written" in out
    assert await cluster.kv_keys() == {}

    status, out, err = await cpctl(
        "migrate", "--from", "crd", "--to", "kvstore", "--json", *cluster.flags()
    )
    assert status == 0, err
    report = json.loads(out)
    assert report["conflicts"] == [] and report["failed"] == []
    assert report["written"] == {
        "identities": 2,
        "nodes": 2,
        "cidrs": 2,
        "leases": 2,  # one write per node
        "endpoints": 3,  # one write per pod
        "policies": 1,
        "services": 0,
    }
    assert "endpoints: 3/3 written" in err  # progress

    crd, kv = await snapshots(cluster)
    assert drift(crd, kv).total == 0
    assert identity_numbers(kv) == identity_numbers(crd)
    assert kv.endpoints == crd.endpoints and kv.leases == crd.leases and kv.cidrs == crd.cidrs

    # a second run changes nothing, and says so
    before = await cluster.kv_keys()
    status, out, err = await cpctl("migrate", "--from", "crd", "--to", "kvstore", *cluster.flags())
    assert status == 0, err
    assert "nothing to do" in out
    assert await cluster.kv_keys() == before

    # `cpctl migrate status`: no drift, exit 0
    status, out, _ = await cpctl("migrate", "status", "--json", *cluster.flags())
    assert status == 0
    assert json.loads(out)["total"] == 0

    # node-a's agent in kvstore mode adopts what was copied: the same identities, its IP
    # leases and endpoint keys move onto its own lease
    async with kv_node(cluster, "node-a") as stores:
        leases = [v.value for v in await stores.leases.list()]
        assert {x.ip for x in leases} == {ip for _, _, ip in pods("node-a")}
        await stores.leases.adopt(leases)
        for eid, labels, ip in pods("node-a"):
            identity = await stores.identities.acquire(labels)
            assert int(identity.id) == identity_numbers(crd)[labels.canonical()]
            namespace, _, pod = eid.partition("/")
            await stores.endpoints.upsert(
                Endpoint(
                    ip=ip,
                    identity=identity.id,
                    node=NodeName("node-a"),
                    host_ip=node_record("node-a").ips[0],
                    name=pod,
                    namespace=namespace,
                )
            )
        await stores.nodes.register(node_record("node-a"))
        backend = cluster.shards.all()[0]
        own = set(stores.endpoints._owner.leases.leases) if stores.endpoints._owner else set()
        for _, _, ip in pods("node-a"):
            kv_ = await backend.get(LAYOUT.ip("default", str(ip)))
            assert kv_ is not None and kv_.lease in own
        crd2, kv2 = await snapshots(cluster)
        assert drift(crd2, kv2).total == 0


# -- kvstore -> crd ------------------------------------------------------------------------


async def test_kvstore_to_crd_copies_everything_and_the_crd_agent_adopts_it(
    cluster: Cluster,
) -> None:
    async with kv_node(cluster, "node-a") as a, kv_node(cluster, "node-b") as b:
        await populate(a, "node-a")
        await populate(b, "node-b")
        await a.policies.put(POLICY)
        await KvServiceStore(cluster.shards, LAYOUT, StoreMetrics.create()).put(SERVICE)

        status, out, err = await cpctl(
            "migrate", "--from", "kvstore", "--to", "crd", *cluster.flags()
        )
        assert status == 0, err
        assert "records written to crd" in out

        kv, crd = await snapshots(cluster)
        assert drift(crd, kv).total == 0, drift(crd, kv)
        assert identity_numbers(crd) == identity_numbers(kv)
        assert crd.services == {"default/web": SERVICE}  # a Service and its EndpointSlice

        status, out, _ = await cpctl(
            "migrate", "--from", "kvstore", "--to", "crd", *cluster.flags()
        )
        assert status == 0 and "nothing to do" in out

    # node-a's agent in CRD mode: the same identity numbers, its leases from its Node
    async with crd_node(cluster, "node-a") as stores:
        leases = [v.value for v in await stores.leases.list()]
        assert {x.ip for x in leases} == {ip for _, _, ip in pods("node-a")}
        await stores.leases.adopt(leases)
        for _, labels, _ in pods("node-a"):
            identity = await stores.identities.acquire(labels)
            assert int(identity.id) == identity_numbers(kv)[labels.canonical()]


# -- conflicts, resumption ---------------------------------------------------------------


async def test_a_conflicting_record_stops_the_copy_and_nothing_is_written(
    cluster: Cluster,
) -> None:
    async with crd_node(cluster, "node-a") as stores:
        await populate(stores, "node-a", crd_client=cluster.client)
    crd, _ = await snapshots(cluster)
    taken = next(iter(crd.identities.values()))
    # the kvstore holds the same number for another label set
    async with kv_node(cluster, "node-z") as z:
        await z.policies.put(POLICY)
        metrics = StoreMetrics.create()
        async with open_side(cluster.kv, metrics) as kv_side:
            other = Identity(taken.id, Labels.from_strings(["k8s:app=other"]))
            assert await kv_side.write_identity(other, []) is None
    before = await cluster.kv_keys()

    status, _out, err = await cpctl("migrate", "--from", "crd", "--to", "kvstore", *cluster.flags())
    assert status == 1
    lines = err.strip().splitlines()
    assert lines[-1].startswith("cpctl: migrate: 1 conflicting record in kvstore; nothing written")
    assert f"identity {taken.id}" in lines[-1]
    assert await cluster.kv_keys() == before

    # the same IP for another pod
    metrics = StoreMetrics.create()
    async with open_side(cluster.kv, metrics) as kv_side:
        ep = next(iter(crd.endpoints.values()))
        thief = Endpoint(
            ip=ep.ip, identity=ep.identity, node=ep.node, host_ip=ep.host_ip,
            name="someone-else", namespace="default",
        )  # fmt: skip
        assert await kv_side.write_endpoints([thief]) is None
    async with (
        open_side(cluster.crd, metrics) as source,
        open_side(cluster.kv, metrics) as target,
    ):
        with pytest.raises(Conflicts) as raised:
            await copy_missing(source, target)
    assert any(
        f"endpoint {ep.ip}: kvstore has pod default/someone-else" in c
        for c in raised.value.plan.conflicts
    )


async def test_an_interrupted_copy_is_finished_by_the_next_run(cluster: Cluster) -> None:
    for name in NODES_:
        async with crd_node(cluster, name) as stores:
            await populate(stores, name, crd_client=cluster.client)

    class Interrupted(Exception):
        pass

    def stop_at_endpoints(resource: str, done: int, total: int) -> None:
        if resource == "endpoints" and done == 1:
            raise Interrupted

    metrics = StoreMetrics.create()
    async with (
        open_side(cluster.crd, metrics) as source,
        open_side(cluster.kv, metrics) as target,
    ):
        with pytest.raises(Interrupted):
            await copy_missing(source, target, progress=stop_at_endpoints)
        crd, kv = await snapshots(cluster)
        partial = drift(crd, kv)
        assert partial.counts["endpoints"]["only_crd"] == 2  # 1 of 3 pods written
        assert partial.counts["identities"] == {"only_crd": 0, "only_kvstore": 0, "different": 0}
        outcome = await copy_missing(source, target)
        assert outcome.written["endpoints"] == 2 and outcome.written["identities"] == 0
    crd, kv = await snapshots(cluster)
    assert drift(crd, kv).total == 0


async def test_status_counts_drift_per_resource_and_side(cluster: Cluster) -> None:
    async with crd_node(cluster, "node-a") as stores:
        await populate(stores, "node-a", crd_client=cluster.client)
    async with kv_node(cluster, "node-b") as b:
        await populate(b, "node-b")
        status, out, _ = await cpctl("migrate", "status", "--json", *cluster.flags())
    assert status == 1
    found = json.loads(out)["resources"]
    assert found["endpoints"] == {"only_crd": 2, "only_kvstore": 1, "different": 0}
    assert found["nodes"] == {"only_crd": 1, "only_kvstore": 1, "different": 0}
    assert found["cidrs"] == {"only_crd": 1, "only_kvstore": 1, "different": 0}
    # both allocated app=web on their own: likely different numbers, at least one each side
    assert found["identities"]["only_crd"] + found["identities"]["different"] >= 1
    assert found["services"] == {"only_crd": 0, "only_kvstore": 0, "different": 0}


async def test_the_copy_waits_for_the_target_modes_operator_to_stop(cluster: Cluster) -> None:
    async with crd_node(cluster, "node-a") as stores:
        await populate(stores, "node-a", crd_client=cluster.client)
    backend = cluster.shards.all()[0]
    await backend.put(LAYOUT.leader_prefix + b"694d9a6b1c2e3f00", b"op-kv")  # as elected
    status, _, err = await cpctl("migrate", "--from", "crd", "--to", "kvstore", *cluster.flags())
    assert status == 1
    assert "a kvstore-mode operator leads (op-kv): stop it before copying" in err
    assert not [k for k in await cluster.kv_keys() if b"/state/" in k]
    await backend.delete(LAYOUT.leader_prefix, prefix=True)  # stopped: it resigned
    status, _, err = await cpctl("migrate", "--from", "crd", "--to", "kvstore", *cluster.flags())
    assert status == 0, err
