"""cp-operator in the double-write modes (controlplane/operator/doublewrite.py): real
processes on the local API server and a real etcd. A node joining gets the same CIDR in
both stores (and its CRD Node the same spec.podCIDRs); a CIDR the other store holds for
another node is refused and counted; the kvstore heartbeat is written in both modes; one
leader across the modes (a CRD-mode or kvstore-mode operator beside a double-write leader
follows; a double-write replica takes over from a CRD-mode one at its clean stop, and
from a killed double-write leader); identity GC deletes in both stores only what is
unused in both."""

from __future__ import annotations

import functools
import signal
from pathlib import Path

import pytest
from helpers import backend_for, eventually
from test_crd_operator import CrdOperatorProcess
from test_operator import LAYOUT, OperatorProcess, operators, recording, register
from test_operator import claims as kv_claims

from controlplane.apiserver import KubeServer
from controlplane.config import CrdConfig, EtcdClusterConfig, KvstoreConfig
from controlplane.crd.client import KubeClient
from controlplane.crd.resources import ENDPOINTS, IDENTITIES, NODES, POD_CIDRS
from controlplane.kvstore.backend import EtcdBackend
from controlplane.kvstore.embedded import EmbeddedEtcd
from controlplane.metrics import StoreMetrics
from controlplane.migrate.side import open_side
from controlplane.model import Identity, Labels, NodeName, NumericIdentity, parse_cidr
from controlplane.store_types import CIDRClaim
from tests.crdop_support import endpoint_object, kube_client, node_object

pytest_plugins = ["tests.kube_fixtures"]
pytestmark = pytest.mark.timeout(240)

# Long leases: renewals never miss their deadline on a loaded machine; nothing below
# waits for an expiry except the killed-leader test, which waits without an upper bound.
LONG = ["--lease-duration=20", "--renew-deadline=14", "--retry-period=0.3"]


class DoubleWriteProcess(OperatorProcess):
    def __init__(
        self,
        tmp_path: Path,
        name: str,
        read: str,
        kube: KubeServer,
        etcd: EmbeddedEtcd,
        *extra: str,
    ) -> None:
        super().__init__(
            tmp_path,
            name,
            etcd.client_urls,
            f"--store=doublewrite-read{read}",
            f"--kubeconfig={kube.kubeconfig}",
            "--migration-drift-interval=1",
            *LONG,
            *extra,
        )


async def crd_claims(client: KubeClient) -> dict[str, list[str]]:
    """Node -> the CIDRs its PodCIDR claims hold."""
    out: dict[str, list[str]] = {}
    for obj in (await client.list(POD_CIDRS)).items:
        out.setdefault(obj["spec"]["node"], []).append(obj["spec"]["cidr"])
    return out


async def pod_cidrs_of(client: KubeClient, node: str) -> list[str] | None:
    obj = await client.get_or_none(NODES, node)
    return None if obj is None else (obj.get("spec") or {}).get("podCIDRs")


async def same_cidr_in_both(
    client: KubeClient, backend: EtcdBackend, node: str
) -> list[str] | None:
    crd = (await crd_claims(client)).get(node)
    kv = [c.replace("_", "/") for c in (await kv_claims(backend)).get(node, [])]
    cidrs = await pod_cidrs_of(client, node)
    return crd if crd and crd == kv == cidrs else None


async def _following(proc: OperatorProcess, leader: str) -> bool:
    try:
        _, body = await proc.health()
    except (OSError, TimeoutError):
        return False
    return f"following {leader}" in str(body["checks"]["election"]["detail"])


async def _metric_at_least(proc: OperatorProcess, name: str, labels: str, value: float) -> bool:
    current = await proc.sample(name, labels)
    return current is not None and current >= value


@pytest.mark.parametrize("read", ["crd", "kvstore"])
async def test_a_joining_node_gets_one_cidr_in_both_stores_and_the_heartbeat_is_written(
    read: str, kube: KubeServer, etcd1: EmbeddedEtcd, tmp_path: Path
) -> None:
    op = DoubleWriteProcess(tmp_path, "dw-a", read, kube, etcd1)
    async with (
        backend_for(etcd1.client_urls) as backend,
        kube_client(kube) as client,
        recording(backend) as beats,
        operators(op),
    ):
        # the lowest CIDR of the pool is held in the other store by a node the read store
        # does not know: refused (counted), the joining node gets the next one
        taken = CIDRClaim("default", parse_cidr("10.0.0.0/24"), NodeName("node-other"))
        other = CrdConfig(kubeconfig=str(kube.kubeconfig)) if read == "kvstore" else None
        kv = _kv(etcd1) if read == "crd" else None
        op.start()
        await eventually(op.is_leader, timeout=60, message="the double-write operator leads")
        target = other or kv
        assert target is not None
        async with open_side(target, StoreMetrics.create()) as side:
            assert await side.write_claim(taken) is None
        # a node joins: an agent in this mode registers in both stores
        await client.create(NODES, node_object("node-0"))
        await register(backend, "node-0")
        cidrs = await eventually(
            lambda: same_cidr_in_both(client, backend, "node-0"),
            timeout=60,
            message="node-0 has one CIDR, the same in both stores and in spec.podCIDRs",
        )
        assert cidrs == ["10.0.1.0/24"]
        await eventually(
            lambda: _metric_at_least(op, "cp_doublewrite_conflicts_total", 'resource="cidr"', 1.0),
            message="the conflicting CIDR counted",
        )
        assert "not double-written: the other store has it for node node-other" in op.log()
        read_claims = await (crd_claims(client) if read == "crd" else kv_claims(backend))
        assert "node-other" not in read_claims  # the read store's claim was undone
        # the kvstore heartbeat, written by this operator, in both modes
        await eventually(lambda: len(beats.by("dw-a")) >= 2, message="heartbeats by dw-a")
        # drift for free: both stores are at hand
        await eventually(
            lambda: op.sample("cp_migration_drift_last_success_timestamp_seconds"),
            message="drift computed",
        )
    assert "Traceback" not in op.log()


async def test_one_leader_across_the_modes(
    kube: KubeServer, etcd1: EmbeddedEtcd, tmp_path: Path
) -> None:
    """A CRD-mode operator leads; a double-write replica beside it waits (it needs the
    Lease) and takes over at the CRD operator's clean stop; then CRD-mode and
    kvstore-mode operators started beside it follow it and never lead."""
    crd_a = CrdOperatorProcess(tmp_path, "crd-a", kube.kubeconfig, lease=20)
    dw = DoubleWriteProcess(tmp_path, "dw-b", "crd", kube, etcd1)
    crd_c = CrdOperatorProcess(tmp_path, "crd-c", kube.kubeconfig, lease=20)
    kv_d = OperatorProcess(tmp_path, "kv-d", etcd1.client_urls, *LONG)
    async with (
        backend_for(etcd1.client_urls) as backend,
        kube_client(kube) as client,
        operators(crd_a, dw, crd_c, kv_d),
    ):
        crd_a.start()
        await eventually(crd_a.is_leader, timeout=60, message="crd-a leads")
        dw.start()
        await eventually(lambda: _following(dw, "crd-a"), timeout=60, message="dw-b waits")
        assert not await dw.is_leader()
        crd_a.signal(signal.SIGTERM)
        assert await crd_a.wait_exit() == 0
        await eventually(dw.is_leader, timeout=60, message="dw-b leads after crd-a's stop")
        crd_c.start()
        kv_d.start()
        await eventually(lambda: _following(crd_c, "dw-b"), timeout=60, message="crd-c follows")
        await eventually(lambda: _following(kv_d, "dw-b"), timeout=60, message="kv-d follows")
        # work done after they joined is the double-write leader's alone
        await client.create(NODES, node_object("node-0"))
        await register(backend, "node-0")
        await eventually(
            lambda: same_cidr_in_both(client, backend, "node-0"),
            timeout=60,
            message="node-0 served by dw-b",
        )
        assert await dw.is_leader()
        assert not await crd_c.is_leader()
        assert not await kv_d.is_leader()
        assert "leading" not in crd_c.log() + kv_d.log()


async def test_a_killed_double_write_leader_fails_over_to_another_replica(
    kube: KubeServer, etcd1: EmbeddedEtcd, tmp_path: Path
) -> None:
    short = ["--lease-duration=8", "--renew-deadline=6"]
    a = DoubleWriteProcess(tmp_path, "dw-a", "kvstore", kube, etcd1, *short)
    b = DoubleWriteProcess(tmp_path, "dw-b", "kvstore", kube, etcd1, *short)
    async with (
        backend_for(etcd1.client_urls) as backend,
        kube_client(kube) as client,
        recording(backend) as beats,
        operators(a, b),
    ):
        a.start()
        await eventually(a.is_leader, timeout=60, message="dw-a leads")
        b.start()
        await eventually(lambda: _following(b, "dw-a"), timeout=60, message="dw-b follows")
        a.signal(signal.SIGKILL)  # no resignation: dw-b waits out both leases
        await eventually(b.is_leader, timeout=120, message="dw-b leads")
        await client.create(NODES, node_object("node-1"))
        await register(backend, "node-1")
        await eventually(
            lambda: same_cidr_in_both(client, backend, "node-1"),
            timeout=60,
            message="node-1 served by dw-b",
        )
        await eventually(lambda: beats.by("dw-b"), message="dw-b writes the heartbeat")
        assert "Traceback" not in b.log()


async def test_identity_gc_deletes_in_both_stores_only_what_both_do_not_use(
    kube: KubeServer, etcd1: EmbeddedEtcd, tmp_path: Path
) -> None:
    unused, used_in_crd, used_in_kv = 1001, 1002, 1003
    op = DoubleWriteProcess(tmp_path, "dw-a", "crd", kube, etcd1, "--gc-interval=0.3")
    kv = _kv(etcd1)
    crd = CrdConfig(kubeconfig=str(kube.kubeconfig))
    metrics = StoreMetrics.create()
    async with (
        backend_for(etcd1.client_urls) as backend,
        kube_client(kube) as client,
        operators(op),
    ):
        op.start()
        await eventually(op.is_leader, timeout=60, message="dw-a leads (CRDs installed)")
        identities = {
            n: Identity(NumericIdentity(n), Labels.from_strings([f"k8s:app=a{n}"]))
            for n in (unused, used_in_crd, used_in_kv)
        }
        async with open_side(crd, metrics) as crd_side, open_side(kv, metrics) as kv_side:
            for n, identity in identities.items():
                assert await crd_side.write_identity(identity, []) is None
                # a kvstore user: a reference on the copy's (long) migration lease
                users = [NodeName("node-k")] if n == used_in_kv else []
                assert await kv_side.write_identity(identity, users) is None
        # a CRD user: an Endpoint of that identity
        await client.create(ENDPOINTS, endpoint_object("pod", "10.0.0.5", used_in_crd, "node-c"))

        async def gone_in_both() -> bool:
            return not await _in_crd(client, unused) and not await _in_kv(backend, unused)

        await eventually(gone_in_both, timeout=60, message="the unused identity collected")
        for n in (used_in_crd, used_in_kv):
            assert await _in_crd(client, n), n
            assert await _in_kv(backend, n), n
    assert "Traceback" not in op.log()


async def _in_crd(client: KubeClient, ident: int) -> bool:
    return await client.get_or_none(IDENTITIES, str(ident)) is not None


async def _in_kv(backend: EtcdBackend, ident: int) -> bool:
    return await backend.get(LAYOUT.identity_id(ident)) is not None


def _kv(etcd: EmbeddedEtcd) -> KvstoreConfig:
    return KvstoreConfig(clusters=(EtcdClusterConfig("default", tuple(etcd.client_urls)),))


async def test_the_node_gc_collects_in_both_stores_what_neither_lists(
    kube: KubeServer, etcd1: EmbeddedEtcd, tmp_path: Path
) -> None:
    op = DoubleWriteProcess(tmp_path, "dw-a", "kvstore", kube, etcd1, "--node-gc-grace=1")
    nodes = ["node-gone", "node-half", "node-live"]
    async with (
        backend_for(etcd1.client_urls) as backend,
        kube_client(kube) as client,
        operators(op),
    ):
        op.start()
        await eventually(op.is_leader, timeout=60, message="dw-a leads")
        for node in nodes:
            await client.create(NODES, node_object(node))
            await register(backend, node)
        for node in nodes:
            await eventually(
                functools.partial(same_cidr_in_both, client, backend, node),
                timeout=60,
                message=f"{node} has its CIDR in both stores",
            )
        # gone from both stores; node-half only from the read store (the kvstore)
        await client.delete(NODES, "node-gone")
        for node in ("node-gone", "node-half"):
            await backend.delete(LAYOUT.node("default", node))

        async def collected() -> bool:
            crd, kv = await crd_claims(client), await kv_claims(backend)
            return "node-gone" not in crd and "node-gone" not in kv

        await eventually(collected, timeout=60, message="node-gone's claims freed in both")
        crd, kv = await crd_claims(client), await kv_claims(backend)
        for node in ("node-half", "node-live"):
            assert node in crd and node in kv, node  # listed in a store: present
    assert "Traceback" not in op.log()
