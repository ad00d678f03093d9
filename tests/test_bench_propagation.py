"""The propagation benchmark in both store modes, side by side, run small against a real
etcd (structure only, no timing claims), its flags, and what ``write_issued_at`` stamps:
the moment the endpoint's write request is issued, after the reads that guard it, in both
stores."""

from __future__ import annotations

import time
from dataclasses import replace
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest

from controlplane.apiserver import KubeServer, KubeServerSettings
from controlplane.bench.propagation import run_propagation_bench
from controlplane.cli.main import main
from controlplane.config import EtcdClusterConfig, KvstoreConfig
from controlplane.crd.client import KubeClient
from controlplane.crd.endpoints import CrdEndpointStore
from controlplane.crd.install import install_crds
from controlplane.crd.kubeconfig import load_connection
from controlplane.crd.resources import NAMESPACES
from controlplane.kvstore.embedded import EmbeddedEtcd
from controlplane.kvstore.endpoints import KvEndpointStore
from controlplane.kvstore.keys import KeyLayout
from controlplane.kvstore.owner import Owners
from controlplane.kvstore.shards import ShardMap
from controlplane.metrics import StoreMetrics
from controlplane.model import Endpoint, NodeName, NumericIdentity

SUMMARY = {"p50_ms", "p99_ms", "max_ms", "mean_ms"}


async def test_propagation_bench_both_modes(etcd1: EmbeddedEtcd, tmp_path: Path) -> None:
    config = KvstoreConfig((EtcdClusterConfig("default", tuple(etcd1.client_urls)),))
    lines: list[str] = []
    record = await run_propagation_bench(
        config,
        agents=3,
        endpoints=3,
        rounds=2,
        stores=("kvstore", "crd"),
        bare=False,
        interval=0.02,
        workdir=tmp_path,
        progress=lines.append,
    )
    assert record["stores"] == ["kvstore", "crd"]
    assert record["interval_s"] == 0.02
    assert set(record["modes"]) == {"kvstore", "crd"}
    for mode in record["modes"].values():
        for key in ("all_datapaths", "each_datapath", "agent_create_request"):
            assert set(mode[key]) == SUMMARY
            assert mode[key]["max_ms"] >= mode[key]["p50_ms"] > 0
        assert "ratio_to_bare" not in mode
        assert mode["writes_per_s"] > 0
        assert mode["create_503_retries"] >= 0
    assert set(record["ratio_crd_kvstore"]) == {"p50", "p99", "max"}
    assert all(v > 0 for v in record["ratio_crd_kvstore"].values())
    assert "bare_all_watchers" not in record and "ratio_p99" not in record
    assert len(record["load_average_start"]) == 3
    # both modes delivered every round to both receiving agents
    for store in ("kvstore", "crd"):
        assert sum(f"{store} agents: all 2 datapaths" in line for line in lines) == 2
    assert not any("bare" in line for line in lines if line.startswith("round"))
    # the run's processes are gone, the CRD side's API server with them
    assert any(line.startswith("stopping") for line in lines)


@pytest.mark.parametrize(
    "argv",
    [
        ["--store", "etcd"],
        ["--stores", "crd,kvstore,x"],
        ["--stores", ""],
        ["--store", "crd", "--stores", "kvstore"],
    ],
)
def test_propagation_rejects_bad_store_flags(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "propagation", "--embedded", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--store" in err


def _endpoint(node: str) -> Endpoint:
    return Endpoint(
        ip=ip_address("10.9.0.7"),
        identity=NumericIdentity(1000),
        node=NodeName(node),
        host_ip=ip_address("192.168.0.1"),
        name="pod-a",
        namespace="bench",
    )


def _stamping(obj: Any, name: str, calls: list[tuple[str, float]]) -> None:
    """Record when ``obj.name`` is called (before it runs)."""
    original = getattr(obj, name)

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append((name, time.monotonic()))
        return await original(*args, **kwargs)

    setattr(obj, name, wrapper)


async def test_crd_upsert_returns_when_the_create_was_issued(
    etcd1: EmbeddedEtcd, tmp_path: Path
) -> None:
    settings = KubeServerSettings(
        data_dir=tmp_path / "kube", etcd_endpoints=tuple(etcd1.client_urls)
    )
    async with (
        KubeServer(settings) as server,
        KubeClient(load_connection(str(server.kubeconfig))) as client,
    ):
        await install_crds(client)
        ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bench"}}
        await client.create(NAMESPACES, ns)
        store = CrdEndpointStore(client, StoreMetrics.create(), node=NodeName("node-a"))
        calls: list[tuple[str, float]] = []
        for name in ("list", "get_or_none", "create", "replace"):
            _stamping(client, name, calls)
        issued = await store.upsert(_endpoint("node-a"))
        # reads first (the address's holders, the current object), then the create
        assert [c[0] for c in calls] == ["list", "get_or_none", "create"]
        assert calls[1][1] < issued <= calls[2][1]
        calls.clear()
        moved = replace(_endpoint("node-a"), identity=NumericIdentity(1001))
        issued = await store.upsert(moved)  # another identity: an update this time
        assert [c[0] for c in calls] == ["list", "get_or_none", "replace"]
        assert calls[1][1] < issued <= calls[2][1]
        calls.clear()
        before = time.monotonic()
        issued = await store.upsert(moved)  # already so: no write, so nothing was issued
        assert [c[0] for c in calls] == ["list", "get_or_none"]
        assert issued >= before


async def test_kvstore_upsert_returns_when_the_transaction_was_issued(
    etcd1: EmbeddedEtcd,
) -> None:
    config = KvstoreConfig((EtcdClusterConfig("default", tuple(etcd1.client_urls)),))
    metrics = StoreMetrics.create()
    async with ShardMap(config) as shards:
        owners = Owners(metrics)
        store = KvEndpointStore(shards, KeyLayout("cp/"), metrics, owners, node=NodeName("node-a"))
        backend = shards.shard_for("endpoints", NodeName("node-a"))
        calls: list[tuple[str, float]] = []
        for name in ("get", "txn"):
            _stamping(backend, name, calls)
        try:
            issued = await store.upsert(_endpoint("node-a"))
            names = [c[0] for c in calls]
            assert names[-2:] == ["get", "txn"]  # the guard's read, then the write
            assert calls[-2][1] < issued <= calls[-1][1]
        finally:
            for owner in owners.all():
                await owner.leases.revoke_all()
