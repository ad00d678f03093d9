"""The agent in CRD mode, on the local Kubernetes API server (on a real etcd): endpoints
and identities as custom resources that kubectl sees, an API-server outage that empties
no map and restarts nothing, an agent restart that keeps IPs and identities, and objects
deleted by hand that come back."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest_asyncio

from controlplane.agent.agent import Agent
from controlplane.apiserver import KubeServer, KubeServerSettings
from controlplane.config import CrdConfig
from controlplane.crd.client import KubeClient
from controlplane.crd.install import install_crds
from controlplane.crd.ipam import CrdCIDRStore
from controlplane.crd.kubeconfig import load_connection
from controlplane.ipam.cidr import ClusterPoolAllocator
from controlplane.kvstore.embedded import EmbeddedEtcd
from controlplane.metrics import StoreMetrics
from controlplane.model import CIDRPool, IPNetwork, NodeName
from tests.helpers import eventually, holds_for, running
from tests.kube_fixtures import kubectl_flags
from tests.test_agent import agent_settings, api, cached, create

POOL = CIDRPool(ip_network("10.30.0.0/16"), 24)


class ApiServer:
    """A local API server on an external etcd that can be stopped and started again on
    the same port, data directory, CA and token (the agents' kubeconfig stays valid)."""

    def __init__(self, etcd: EmbeddedEtcd, data_dir: Path) -> None:
        self.settings = KubeServerSettings(
            data_dir=data_dir, etcd_endpoints=tuple(etcd.client_urls), bookmark_interval=0.5
        )
        self.server: KubeServer | None = None
        self.kubeconfig = data_dir / "kubeconfig"

    async def start(self) -> None:
        server = KubeServer(self.settings)
        await server.start()
        self.server = server
        self.settings = replace(self.settings, port=int(server.url.rsplit(":", 1)[1]))

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
            self.server = None

    def config(self) -> CrdConfig:
        return CrdConfig(kubeconfig=str(self.kubeconfig), request_timeout=2.0)

    def client(self) -> KubeClient:
        return KubeClient(load_connection(str(self.kubeconfig)), request_timeout=5.0)


@pytest_asyncio.fixture
async def apiserver(etcd1: EmbeddedEtcd, tmp_path: Path) -> AsyncIterator[ApiServer]:
    server = ApiServer(etcd1, tmp_path / "kube")
    await server.start()
    try:
        async with server.client() as client:
            await install_crds(client)
        yield server
    finally:
        await server.stop()


async def give_cidrs(server: ApiServer, *nodes: str) -> dict[str, IPNetwork]:
    """Do what the operator does: claim a CIDR of the pool for each node."""
    async with server.client() as client:
        allocator = ClusterPoolAllocator(CrdCIDRStore(client, StoreMetrics.create()), POOL)
        await allocator.restore()
        return {n: await allocator.allocate(NodeName(n)) for n in nodes}


async def kubectl(kubeconfig: Path, *args: str) -> str:
    """kubectl as a child process (the API server runs in this event loop)."""
    proc = await asyncio.create_subprocess_exec(
        "kubectl",
        *kubectl_flags(kubeconfig),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, f"kubectl {' '.join(args)}: {err.decode()}"
    return out.decode()


def crd_agent(server: ApiServer, tmp_path: Path, node: str, ip: str) -> Agent:
    return Agent(agent_settings(tmp_path, node, ip, pool=POOL.name), server.config())


def map_entries(agent: Agent) -> dict[str, int]:
    return {str(k): int(v.identity) for k, v in agent.ipcache.entries()}


async def endpoints_of(agent: Agent) -> dict[str, tuple[str, int]]:
    status, body = await api(agent, "GET", "/v1/endpoints")
    assert status == 200, body
    return {f"{e['namespace']}/{e['name']}": (e["ip"], e["identity"]) for e in body}


async def test_endpoints_propagate_and_kubectl_sees_them(
    apiserver: ApiServer, tmp_path: Path
) -> None:
    await give_cidrs(apiserver, "node-a", "node-b")
    a = crd_agent(apiserver, tmp_path, "node-a", "127.0.0.11")
    b = crd_agent(apiserver, tmp_path, "node-b", "127.0.0.12")
    async with running(a), running(b):
        await asyncio.wait_for(asyncio.gather(a.wait_ready(), b.wait_ready()), 30)
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
        listed = json.loads(
            await kubectl(
                apiserver.kubeconfig,
                "get",
                "identities,endpoints.controlplane.io",
                "-A",
                "-o",
                "json",
            )
        )
        kinds: dict[str, list[dict[str, Any]]] = {}
        for item in listed["items"]:
            kinds.setdefault(item["kind"], []).append(item)
        assert {int(i["metadata"]["name"]) for i in kinds["Identity"]} == {
            web["identity"],
            db["identity"],
        }
        by_name = {e["metadata"]["name"]: e["spec"] for e in kinds["Endpoint"]}
        assert by_name["web"]["node"] == "node-a" and by_name["db"]["node"] == "node-b"
        assert by_name["web"]["addressing"][0]["ip"] == web["ip"]
        assert by_name["web-2"]["identity"]["id"] == web["identity"]
        table = await kubectl(apiserver.kubeconfig, "get", "endpoints.controlplane.io", "-A")
        assert "web-2" in table and web2["ip"] in table and "node-b" in table
        status = a.status()
        assert status["store"]["mode"] == "crd"
        assert status["kvstore"]["shards"][0]["name"] == "apiserver"
        assert status["kvstore"]["healthy"]
        json.dumps(status, allow_nan=False)  # strict JSON: no heartbeat infinity
        code, out, err = await cpctl("status", "--socket", str(a.settings.api_socket))
        assert code == 0, err
        assert "store:      crd: Kubernetes API https://" in out and "healthy" in out


async def test_api_server_outage_empties_no_map_and_restarts_nothing(
    apiserver: ApiServer, tmp_path: Path
) -> None:
    await give_cidrs(apiserver, "node-a", "node-b")
    a = crd_agent(apiserver, tmp_path, "node-a", "127.0.0.11")
    b = crd_agent(apiserver, tmp_path, "node-b", "127.0.0.12")
    async with running(a), running(b):
        await asyncio.wait_for(asyncio.gather(a.wait_ready(), b.wait_ready()), 30)
        web = await create(a, "default", "web", ["k8s:app=web"])
        db = await create(b, "default", "db", ["k8s:app=db"])
        for agent in (a, b):
            for ep in (web, db):
                await eventually(
                    lambda agent=agent, ep=ep: cached(agent, ep["ip"]) == ep["identity"],
                    message="converged before the outage",
                )
        before = {agent.settings.node: map_entries(agent) for agent in (a, b)}

        await apiserver.stop()
        await eventually(
            lambda: not a.status()["kvstore"]["healthy"], message="a sees the API server down"
        )
        status, body = await api(a, "POST", "/v1/endpoints", {
            "namespace": "default", "name": "late", "labels": ["k8s:app=late"],
        })  # fmt: skip
        assert status == 503 and "Kubernetes API" in body["error"], body
        await holds_for(
            lambda: all(map_entries(agent) == before[agent.settings.node] for agent in (a, b)),
            2.0,
            "a map lost or changed an entry during the outage",
        )

        await apiserver.start()
        await eventually(
            lambda: a.status()["kvstore"]["healthy"] and b.status()["kvstore"]["healthy"],
            timeout=30,
            message="healthy again after the API server returned",
        )
        late = await create(a, "default", "late", ["k8s:app=late"])
        await eventually(
            lambda: cached(b, late["ip"]) == late["identity"],
            timeout=30,
            message="a change after the outage reaches the other agent (its watch resumed)",
        )
        for agent in (a, b):
            assert all(
                map_entries(agent).get(k) == v for k, v in before[agent.settings.node].items()
            )
            assert agent.status()["restarts"]["count"] == 0


async def test_agent_restart_keeps_ips_and_identities(apiserver: ApiServer, tmp_path: Path) -> None:
    await give_cidrs(apiserver, "node-a")
    a = crd_agent(apiserver, tmp_path, "node-a", "127.0.0.11")
    async with running(a) as task:
        await asyncio.wait_for(a.wait_ready(), 30)
        await create(a, "default", "web", ["k8s:app=web"])
        await create(a, "default", "db", ["k8s:app=db"])
        before = await endpoints_of(a)
        task.cancel()  # killed: no shutdown, no cleanup
        await asyncio.gather(task, return_exceptions=True)
    # a new process: nothing in memory, everything from the API server
    again = crd_agent(apiserver, tmp_path, "node-a", "127.0.0.11")
    async with running(again):
        await asyncio.wait_for(again.wait_ready(), 30)
        assert await endpoints_of(again) == before
        fresh = await create(again, "default", "cache", ["k8s:app=cache"])
        assert fresh["ip"] not in {ip for ip, _ in before.values()}, "an IP handed out twice"


async def test_objects_deleted_by_hand_come_back(apiserver: ApiServer, tmp_path: Path) -> None:
    await give_cidrs(apiserver, "node-a")
    a = crd_agent(apiserver, tmp_path, "node-a", "127.0.0.11")
    async with running(a):
        await asyncio.wait_for(a.wait_ready(), 30)
        web = await create(a, "default", "web", ["k8s:app=web"])
        kubeconfig = apiserver.kubeconfig
        await kubectl(kubeconfig, "delete", "endpoints.controlplane.io", "web", "-n", "default")
        await kubectl(kubeconfig, "delete", "nodes.controlplane.io", "node-a")

        async def restored() -> bool:
            out = json.loads(
                await kubectl(
                    kubeconfig,
                    "get",
                    "endpoints.controlplane.io,nodes.controlplane.io",
                    "-A",
                    "-o",
                    "json",
                )
            )
            names = {(i["kind"], i["metadata"]["name"]) for i in out["items"]}
            return {("Endpoint", "web"), ("Node", "node-a")} <= names

        await eventually(restored, timeout=30, message="the agent re-created its objects")
        assert cached(a, web["ip"]) == web["identity"]
        assert a.status()["restarts"]["count"] == 0


async def cpctl(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "controlplane.cli.main",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if not k.startswith("CP_")},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cpctl_reads_and_writes_the_crd_store(apiserver: ApiServer, tmp_path: Path) -> None:
    cidrs = await give_cidrs(apiserver, "node-a")
    a = crd_agent(apiserver, tmp_path, "node-a", "127.0.0.11")
    kc = ["--kubeconfig", str(apiserver.kubeconfig), "--json"]
    async with running(a):
        await asyncio.wait_for(a.wait_ready(), 30)
        web = await create(a, "default", "web", ["k8s:app=web"])

        code, out, err = await cpctl("identity", "list", *kc)
        assert code == 0, err
        rows = {r["id"]: r for r in json.loads(out)["identities"]}
        assert rows[web["identity"]]["labels"] == ["k8s:app=web"]
        assert rows[web["identity"]]["references"] == ["default/web"]

        code, out, err = await cpctl("endpoint", "list", *kc)
        assert code == 0, err
        assert [(e["ip"], e["identity"]) for e in json.loads(out)["endpoints"]] == [
            (web["ip"], web["identity"])
        ]
        code, out, err = await cpctl("node", "list", *kc)
        assert code == 0, err
        assert [n["name"] for n in json.loads(out)["nodes"]] == ["node-a"]
        code, out, err = await cpctl("ipam", "list", *kc)
        assert code == 0, err
        listed = json.loads(out)
        assert listed["cidrs"][0]["cidr"] == str(cidrs["node-a"])
        assert listed["leases"]["node-a"][web["ip"]] == "default/web"

        policy = tmp_path / "policy.yaml"
        policy.write_text(
            "name: db\nnamespace: default\nendpoint_selector: [app=db]\n"
            "ingress:\n  - from_selector: [app=web]\n    ports: [{port: 5432, proto: TCP}]\n"
        )
        code, out, err = await cpctl("policy", "put", str(policy), *kc)
        assert code == 0, err
        out = await kubectl(apiserver.kubeconfig, "get", "networkpolicies.controlplane.io", "-A")
        assert "db" in out
        await eventually(
            lambda: a.status()["cache"]["identities"] >= 1, message="the agent's caches fed"
        )
        code, out, err = await cpctl("policy", "list", *kc)
        assert code == 0, err
        assert [p["name"] for p in json.loads(out)["policies"]] == ["db"]
        code, out, err = await cpctl("policy", "delete", "default/db", *kc)
        assert code == 0, err
        code, out, err = await cpctl("policy", "delete", "default/db", *kc)
        assert code == 1 and err.strip() == "cpctl: policy default/db not found"

        # services: Kubernetes Services and EndpointSlices; put writes both, the agent
        # balances it, list shows it, delete removes both
        service = tmp_path / "service.yaml"
        service.write_text(
            "namespace: default\nname: web\ncluster_ip: 10.96.0.10\n"
            "frontends: [{port: 80, protocol: TCP}]\n"
            f"backends: [{{ip: {web['ip']}, port: 8080}}]\n"
        )
        code, out, err = await cpctl("service", "put", str(service), *kc)
        assert code == 0, err
        out = await kubectl(apiserver.kubeconfig, "get", "services,endpointslices", "-A")
        assert "10.96.0.10" in out and "web-cpctl" in out
        await eventually(lambda: a.status()["services"]["frontends"] == 1, message="balanced")
        code, out, err = await cpctl("service", "list", *kc)
        assert code == 0, err
        [row] = json.loads(out)["services"]
        assert row["backends"] == [{"ip": web["ip"], "port": 8080}]
        assert row["backend_endpoints"] == {f"{web['ip']}:8080": "default/web"}
        code, out, err = await cpctl("service", "delete", "default/web", *kc)
        assert code == 0, err
        await eventually(lambda: a.status()["services"]["frontends"] == 0, message="removed")

    # no store reachable: one line, no traceback
    code, out, err = await cpctl("identity", "list", "--kubeconfig", str(tmp_path / "none"))
    assert code == 2 and err.strip().startswith("cpctl: kubeconfig") and "Traceback" not in err
