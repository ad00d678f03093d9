"""The agent's double-write modes: agents (in-process, each with its own connections) on
a local API server (its own etcd) and a kvstore (another etcd), reading one and writing
both. Endpoints land in both with the same IPs and identity numbers, drift stays at the
CIDR claims only the operator writes (closed by `cpctl migrate`), and an identity whose
number the other store gives to other labels is refused with a clear error."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import FAST, eventually, running
from test_agent import Beats, agent_settings, api, cached, create
from test_agent_crd import POOL, ApiServer, apiserver, give_cidrs

from controlplane.agent.agent import Agent
from controlplane.agent.settings import build_parser
from controlplane.config import (
    ConfigError,
    CrdConfig,
    DoubleWriteConfig,
    EtcdClusterConfig,
    KvstoreConfig,
)
from controlplane.crd.resources import NODES
from controlplane.flags import double_write_store_config, store_config
from controlplane.kvstore.embedded import EmbeddedEtcd
from controlplane.kvstore.ipam import KvCIDRStore
from controlplane.kvstore.keys import KeyLayout
from controlplane.kvstore.shards import ShardMap
from controlplane.metrics import StoreMetrics
from controlplane.migrate.plan import drift, read_snapshot
from controlplane.migrate.run import copy_missing
from controlplane.migrate.side import open_side
from controlplane.model import Identity, Labels, NodeName, NumericIdentity
from controlplane.store_types import CIDRClaim

__all__ = ["apiserver"]  # the fixture, re-exported for pytest


def kv_config(etcd: EmbeddedEtcd) -> KvstoreConfig:
    return KvstoreConfig(clusters=(EtcdClusterConfig("b", tuple(etcd.client_urls)),), client=FAST)


def dw_agent(config: DoubleWriteConfig, tmp_path: Path, node: str, ip: str) -> Agent:
    return Agent(agent_settings(tmp_path, node, ip, pool=POOL.name), config)


async def both(server: ApiServer, kv: KvstoreConfig) -> tuple[object, object]:
    metrics = StoreMetrics.create()
    async with open_side(server.config(), metrics) as crd, open_side(kv, metrics) as k:
        return await read_snapshot(crd), await read_snapshot(k)


async def test_doublewrite_readcrd_writes_both_with_the_same_numbers(
    apiserver: ApiServer, second_etcd: EmbeddedEtcd, tmp_path: Path
) -> None:
    kv = kv_config(second_etcd)
    config = DoubleWriteConfig(read=apiserver.config(), other=kv)
    given = await give_cidrs(apiserver, "node-a", "node-b")  # the CRD-mode operator's part
    a = dw_agent(config, tmp_path, "node-a", "127.0.0.11")
    b = dw_agent(config, tmp_path, "node-b", "127.0.0.12")
    async with running(a), running(b):
        await asyncio.wait_for(asyncio.gather(a.wait_ready(), b.wait_ready()), 30)
        async with apiserver.client() as client:  # ... and the Nodes' spec.podCIDRs
            for node, cidr in given.items():
                await client.patch(NODES, node, {"spec": {"podCIDRs": [str(cidr)]}})
        web = await create(a, "default", "web", ["k8s:app=web"])
        web2 = await create(b, "default", "web-2", ["k8s:app=web"])
        db = await create(b, "default", "db", ["k8s:app=db"])
        assert web["identity"] == web2["identity"] != db["identity"]
        for agent in (a, b):
            for ep in (web, web2, db):
                await eventually(
                    lambda agent=agent, ep=ep: cached(agent, ep["ip"]) == ep["identity"],
                    message=f"{ep['ip']} in {agent.settings.node}'s ipcache",
                )
        crd, kvs = await both(apiserver, kv)
        assert crd.endpoints == kvs.endpoints  # type: ignore[attr-defined]
        assert {str(web["identity"]), str(db["identity"])} <= set(kvs.identities)  # type: ignore[attr-defined]
        assert crd.identities == kvs.identities  # type: ignore[attr-defined]
        assert crd.leases == kvs.leases  # type: ignore[attr-defined]
        found = drift(crd, kvs)  # type: ignore[arg-type]
        # only the operator's claims are missing (the CRD operator writes CRD only)
        assert {r: c for r, c in found.counts.items() if sum(c.values())} == {
            "cidrs": {"only_crd": 2, "only_kvstore": 0, "different": 0}
        }
        metrics = StoreMetrics.create()
        async with open_side(apiserver.config(), metrics) as src, open_side(kv, metrics) as dst:
            outcome = await copy_missing(src, dst)
        assert outcome.written["cidrs"] == 2
        crd, kvs = await both(apiserver, kv)
        assert drift(crd, kvs).total == 0  # type: ignore[arg-type]

        # a delete goes to both
        status, _ = await api(b, "DELETE", "/v1/endpoints/default/db")
        assert status == 200
        crd, kvs = await both(apiserver, kv)
        assert db["ip"] not in crd.endpoints and db["ip"] not in kvs.endpoints  # type: ignore[attr-defined]
        assert drift(crd, kvs).total == 0  # type: ignore[arg-type]
        assert a.status()["kvstore"]["healthy"]  # no kvstore-mode operator: heartbeat not judged


async def test_an_identity_number_taken_in_the_other_store_is_refused(
    apiserver: ApiServer, second_etcd: EmbeddedEtcd, tmp_path: Path
) -> None:
    kv = kv_config(second_etcd)
    labels = Labels.from_strings(["k8s:app=clash"])
    # the kvstore already has these labels under a number the CRD store will not pick
    metrics = StoreMetrics.create()
    async with open_side(kv, metrics) as kv_side:
        assert await kv_side.write_identity(Identity(NumericIdentity(65000), labels), []) is None
    await give_cidrs(apiserver, "node-a")
    a = dw_agent(
        DoubleWriteConfig(read=apiserver.config(), other=kv), tmp_path, "node-a", "127.0.0.11"
    )
    async with running(a):
        await asyncio.wait_for(a.wait_ready(), 30)
        status, body = await api(a, "POST", "/v1/endpoints", {
            "namespace": "default", "name": "clash", "labels": ["k8s:app=clash"],
        })  # fmt: skip
        assert status == 503, body
        assert "not double-written" in body["error"] and "65000" in body["error"], body
        conflicts = a.metrics.registry.get_sample_value(
            "cp_doublewrite_conflicts_total", {"resource": "identity"}
        )
        assert conflicts == 1.0
        crd, kvs = await both(apiserver, kv)
        assert crd.endpoints == {} and kvs.endpoints == {}  # type: ignore[attr-defined]
        assert crd.leases == {} and kvs.leases == {}  # type: ignore[attr-defined]
        # other labels still work
        ok = await create(a, "default", "fine", ["k8s:app=fine"])
        crd, kvs = await both(apiserver, kv)
        assert crd.endpoints[ok["ip"]] == kvs.endpoints[ok["ip"]]  # type: ignore[attr-defined]


async def test_doublewrite_readkvstore_writes_the_crd_store_too(
    apiserver: ApiServer, second_etcd: EmbeddedEtcd, tmp_path: Path
) -> None:
    kv = kv_config(second_etcd)
    layout = KeyLayout()
    async with ShardMap(kv) as shards:
        # the kvstore-mode operator's part: a claim per node, and heartbeats
        cidrs = KvCIDRStore(shards, layout, StoreMetrics.create())
        for i, node in enumerate(("node-a", "node-b")):
            net = list(POOL.cidr.subnets(new_prefix=POOL.mask_size))[i]
            assert await cidrs.claim(CIDRClaim(POOL.name, net, NodeName(node)))
        beats = Beats(shards.all()[0])
        beats.start()
        try:
            config = DoubleWriteConfig(read=kv, other=apiserver.config())
            a = dw_agent(config, tmp_path, "node-a", "127.0.0.11")
            b = dw_agent(config, tmp_path, "node-b", "127.0.0.12")
            async with running(a), running(b):
                await asyncio.wait_for(asyncio.gather(a.wait_ready(), b.wait_ready()), 30)
                web = await create(a, "default", "web", ["k8s:app=web"])
                db = await create(b, "default", "db", ["k8s:app=db"])
                for ep in (web, db):
                    await eventually(
                        lambda ep=ep: cached(a, ep["ip"]) == ep["identity"],
                        message=f"{ep['ip']} in node-a's ipcache",
                    )
                crd, kvs = await both(apiserver, kv)
                assert crd.endpoints == kvs.endpoints  # type: ignore[attr-defined]
                assert crd.identities == kvs.identities  # type: ignore[attr-defined]
                assert crd.leases == kvs.leases  # type: ignore[attr-defined]
                # the kvstore operator's claims (and so the CRD Nodes' spec.podCIDRs) reach
                # the CRD store through `cpctl migrate`
                metrics = StoreMetrics.create()
                async with (
                    open_side(kv, metrics) as src,
                    open_side(apiserver.config(), metrics) as dst,
                ):
                    await copy_missing(src, dst)
                crd, kvs = await both(apiserver, kv)
                assert drift(crd, kvs).total == 0, drift(crd, kvs)  # type: ignore[arg-type]
        finally:
            await beats.stop()


def test_the_double_write_modes_are_agent_flags_that_need_both_stores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for var in ("CP_STORE", "CP_KVSTORE_ENDPOINTS", "CP_KVSTORE_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    parse = build_parser().parse_args
    config = double_write_store_config(
        parse(["--store=doublewrite-readkvstore", "--kvstore-endpoints=http://127.0.0.1:2379",
               "--kubeconfig=/k"])
    )  # fmt: skip
    assert isinstance(config, DoubleWriteConfig)
    assert isinstance(config.read, KvstoreConfig) and isinstance(config.other, CrdConfig)
    assert config.mode == "doublewrite-readkvstore"
    with pytest.raises(ConfigError, match="needs the kvstore"):
        double_write_store_config(parse(["--store=doublewrite-readcrd"]))
    monkeypatch.setenv("CP_STORE", "doublewrite-readcrd")  # not a mode of cpctl or the operator
    with pytest.raises(ConfigError, match="expected one of crd, kvstore"):
        store_config(parse(["--kvstore-endpoints=http://127.0.0.1:2379"]))


async def test_a_failed_write_to_the_other_store_is_repaired_when_it_is_back(
    apiserver: ApiServer, second_etcd: EmbeddedEtcd, tmp_path: Path
) -> None:
    kv = replace(kv_config(second_etcd), client=replace(FAST, request_timeout=1.0))
    config = DoubleWriteConfig(read=apiserver.config(), other=kv)
    await give_cidrs(apiserver, "node-a")
    a = dw_agent(config, tmp_path, "node-a", "127.0.0.11")
    async with running(a):
        await asyncio.wait_for(a.wait_ready(), 30)
        web = await create(a, "default", "web", ["k8s:app=web"])
        crd, kvs = await both(apiserver, kv)
        assert web["ip"] in kvs.endpoints  # type: ignore[attr-defined]

        await second_etcd.stop_member(0)
        status, body = await api(a, "DELETE", "/v1/endpoints/default/web")
        assert status == 200, body  # the read store answered; the other is repaired later
        pending = a.metrics.registry.get_sample_value("cp_doublewrite_pending")
        assert pending is not None and pending >= 1
        await second_etcd.start_member(0)
        await eventually(
            lambda: a.metrics.registry.get_sample_value("cp_doublewrite_pending") == 0.0,
            timeout=30,
            message="the other store's writes repaired",
        )
        crd, kvs = await both(apiserver, kv)
        assert web["ip"] not in crd.endpoints and web["ip"] not in kvs.endpoints  # type: ignore[attr-defined]
        repaired = a.metrics.registry.get_sample_value(
            "cp_doublewrite_repairs_total", {"resource": "endpoint"}
        )
        assert repaired == 1.0
