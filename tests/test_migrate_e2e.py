"""A cluster of real cp-operator and cp-agent processes moved crd -> kvstore and back,
through every step of the runbook (docs/operations.md), with endpoint churn running:

    crd -> doublewrite-readcrd -> doublewrite-readkvstore -> kvstore
    kvstore -> doublewrite-readkvstore -> doublewrite-readcrd -> crd

the operators first into each double-write step and last out of double-write, each
switch a rolling one (the new operator started before the old one stops: it leads once
the old one resigns, the one leader across the modes).

Checked: the endpoints that live through the whole move never change IP or identity;
every agent's ipcache holds every one of them at every sample taken while it runs (from
the moment its new process first synced: the agents run with userspace maps, which a
process restart loses; pinned kernel maps would carry them across); drift reaches zero
before each operator switch, and then the store invariants hold in both stores (read
directly); `cpctl migrate` copies with exit 0 at every step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from helpers import eventually
from test_agent_crd import ApiServer

from controlplane.agent.api import request
from controlplane.config import EtcdClusterConfig, KvstoreConfig
from controlplane.crd.client import KubeClient
from controlplane.crd.install import install_crds
from controlplane.crd.resources import ENDPOINTS, IDENTITIES, NETWORK_POLICIES, NODES, POD_CIDRS
from controlplane.kvstore.embedded import EmbeddedEtcd
from controlplane.processes import Daemon, stop_all
from controlplane.scale.crd_store import read_crd_store
from controlplane.scale.invariants import read_store
from controlplane.telemetry import http_get

CPCTL = str(Path(sys.executable).with_name("cpctl"))
NODES_ = ("node-0", "node-1")
HEARTBEAT = 3.0

pytestmark = pytest.mark.timeout(420)


class Cluster:
    def __init__(self, tmp_path: Path, api: ApiServer, kv: EmbeddedEtcd) -> None:
        self.tmp = tmp_path
        self.api = api
        self.kv_urls = ",".join(kv.client_urls)
        self.agents: dict[str, Daemon] = {}
        self.operator: Daemon | None = None
        self.mode: dict[str, str] = {}
        self.synced: dict[str, bool] = {}
        self.generation = 0
        self.last_status = ""

    @property
    def kubeconfig(self) -> str:
        return str(self.api.kubeconfig)

    def socket(self, node: str) -> Path:
        return self.tmp / f"{node}.sock"

    # -- daemons ---------------------------------------------------------------------

    async def start_operator(self, mode: str) -> None:
        self.generation += 1
        common = ["--id", f"op-{mode}", "--metrics-address", "127.0.0.1:0", "--timeout", "3",
                  "--lease-duration", "8", "--renew-deadline", "6", "--retry-period", "0.5",
                  "--migration-drift-interval", "1",
                  "--heartbeat-interval", str(HEARTBEAT)]  # fmt: skip
        if mode == "crd":
            args = ["--store", "crd", "--kubeconfig", self.kubeconfig,
                    "--migration-peer-kvstore-endpoints", self.kv_urls]  # fmt: skip
        elif mode == "kvstore":
            args = ["--store", "kvstore", "--kvstore-endpoints", self.kv_urls,
                    "--migration-peer-kubeconfig", self.kubeconfig]  # fmt: skip
        else:  # a double-write mode: both stores, drift without peer flags
            args = ["--store", mode, "--kubeconfig", self.kubeconfig,
                    "--kvstore-endpoints", self.kv_urls]  # fmt: skip
        op = Daemon(
            f"op-{mode}",
            "controlplane.operator.main",
            [*args, *common],
            self.tmp / f"op-{mode}-{self.generation}.log",
        )
        await op.start()
        self.operator = op

    async def roll_operator(self, mode: str) -> None:
        """The operator to ``mode``: the new one started beside the old, which then stops
        (the new one leads once the old one resigned its elections)."""
        old = self.operator
        await self.start_operator(mode)
        new = self.operator
        assert new is not None
        if old is not None:
            # as a rolling update does: the old one stops once the new one is ready (it
            # sees the leader), so it takes over at once, the heartbeat never stale
            await eventually(lambda: self.ready_operator(new), timeout=60, message=f"{mode} ready")
            assert await old.stop() == 0, old.log_tail(20)
        await eventually(
            lambda: "leading (term" in new.log_file.read_text(errors="replace"),
            timeout=60,
            message=f"the {mode} operator leads",
        )

    @staticmethod
    async def ready_operator(op: Daemon) -> bool:
        found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", op.log_tail(200))
        if found is None:
            return False
        try:
            status, _ = await http_get("127.0.0.1", int(found.group(1)), "/readyz")
        except (OSError, TimeoutError):
            return False
        return status == 200

    async def start_agent(self, node: str, mode: str) -> None:
        self.generation += 1
        store = ["--store", mode]
        if mode != "kvstore":
            store += ["--kubeconfig", self.kubeconfig]
        if mode != "crd":
            store += ["--kvstore-endpoints", self.kv_urls]
        agent = Daemon(
            node,
            "controlplane.agent.main",
            [
                *store,
                "--node-name",
                node,
                "--api-socket",
                str(self.socket(node)),
                "--datapath",
                "userspace",
                "--no-routes",
                "--metrics-address",
                "0",
                "--heartbeat-interval",
                str(HEARTBEAT),
                "--status-check-interval",
                "0.5",
                "--lease-ttl",
                "60",
            ],
            self.tmp / f"{node}-{self.generation}.log",
        )
        self.synced[node] = False
        await agent.start()
        self.agents[node] = agent
        self.mode[node] = mode
        await eventually(
            lambda: self.ready(node), timeout=60, interval=0.2, message=f"{node} ready in {mode}"
        )

    async def switch(self, mode: str) -> None:
        """Every agent to ``mode``, one node at a time (a rolling restart)."""
        for node in NODES_:
            agent = self.agents[node]
            self.synced[node] = False  # stop sampling it: its process goes away
            assert await agent.stop() == 0, agent.log_tail(20)
            await self.start_agent(node, mode)

    async def ready(self, node: str) -> bool:
        try:
            status, body = await request(self.socket(node), "GET", "/v1/status", timeout=5)
        except (OSError, TimeoutError):
            return False
        return status == 200 and bool(body.get("ready"))

    async def stop(self) -> None:
        daemons = [*self.agents.values()]
        if self.operator is not None:
            daemons.append(self.operator)
        await stop_all(daemons)

    # -- endpoints -------------------------------------------------------------------

    async def create(self, node: str, name: str, app: str) -> dict[str, Any] | None:
        try:
            status, body = await request(self.socket(node), "POST", "/v1/endpoints", {
                "namespace": "default", "name": name, "labels": [f"k8s:app={app}"],
            }, timeout=10)  # fmt: skip
        except (OSError, TimeoutError):
            return None
        return body if status in (200, 201) else None

    async def delete(self, node: str, name: str) -> None:
        with contextlib.suppress(OSError, TimeoutError):
            await request(self.socket(node), "DELETE", f"/v1/endpoints/default/{name}", timeout=10)

    async def endpoints(self, node: str) -> dict[str, tuple[str, int]]:
        _, body = await request(self.socket(node), "GET", "/v1/endpoints", timeout=10)
        return {e["name"]: (e["ip"], e["identity"]) for e in body}

    async def ipcache(self, node: str) -> dict[str, int] | None:
        try:
            status, body = await request(self.socket(node), "GET", "/v1/ipcache", timeout=5)
        except (OSError, TimeoutError):
            return None
        if status != 200:
            return None
        return {str(row["prefix"]).removesuffix("/32"): int(row["identity"]) for row in body}

    # -- cpctl -----------------------------------------------------------------------

    async def cpctl(self, *args: str) -> tuple[int, str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CP_", "KUBECONFIG"))}
        proc = await asyncio.create_subprocess_exec(
            CPCTL, *args, "--kubeconfig", self.kubeconfig, "--kvstore-endpoints", self.kv_urls,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    async def copy(self, source: str, target: str) -> None:
        status, out, err = await self.cpctl("migrate", "--from", source, "--to", target)
        assert status == 0, out + err

    async def no_drift(self) -> bool:
        status, out, err = await self.cpctl("migrate", "status", "--json")
        self.last_status = out + err
        return status == 0 and json.loads(out)["total"] == 0


class Churn:
    """Creates and deletes short-lived endpoints on every node while it runs; errors
    (a node restarting, a store refusing) are expected and ignored."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.created = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        i = 0
        while True:
            i += 1
            node = NODES_[i % len(NODES_)]
            name = f"churn-{i}"
            if await self.cluster.create(node, name, f"churn{i % 3}") is not None:
                self.created += 1
            await asyncio.sleep(0.1)
            await self.cluster.delete(node, name)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        self._task = asyncio.create_task(self._run(), name="churn")
        try:
            yield
        finally:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class Sampler:
    """Every 0.2 s, every agent's ipcache must hold every stable endpoint with its
    identity (an agent counts from the first sample of its process that has them all)."""

    def __init__(self, cluster: Cluster, stable: dict[str, tuple[str, int]]) -> None:
        self.cluster = cluster
        self.stable = stable
        self.samples = 0
        self.unanswered = 0
        self.violations: list[str] = []

    async def _run(self) -> None:
        c = self.cluster
        while True:
            for node in NODES_:
                cache = await c.ipcache(node)
                if not c.synced.get(node, False):
                    # a new process: counted from its first sample that has them all
                    if cache is not None and all(
                        cache.get(ip) == ident for ip, ident in self.stable.values()
                    ):
                        c.synced[node] = True
                    continue
                if cache is None:
                    # no sample (the API did not answer in 5 s on a loaded test machine):
                    # counted apart, bounded below; a sample that answers must be whole
                    self.unanswered += 1
                    continue
                self.samples += 1
                missing = [
                    f"{name} {ip}"
                    for name, (ip, ident) in self.stable.items()
                    if cache.get(ip) != ident
                ]
                if missing:
                    self.violations.append(f"{node} ({c.mode[node]}): lacks {missing}")
            await asyncio.sleep(0.2)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        task = asyncio.create_task(self._run(), name="sampler")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_a_cluster_moves_to_kvstore_and_back_under_churn(
    etcd1: EmbeddedEtcd, second_etcd: EmbeddedEtcd, tmp_path: Path
) -> None:
    api = ApiServer(etcd1, tmp_path / "kube")
    await api.start()
    cluster = Cluster(tmp_path, api, second_etcd)
    try:
        async with api.client() as client:
            await install_crds(client)
        await cluster.start_operator("crd")
        for node in NODES_:
            await cluster.start_agent(node, "crd")
        stable: dict[str, tuple[str, int]] = {}
        for i, node in enumerate(NODES_):
            for app in ("web", "db"):
                name = f"{app}-{i}"
                body = await cluster.create(node, name, app)
                assert body is not None, name
                stable[name] = (body["ip"], body["identity"])
        sampler = Sampler(cluster, stable)
        churn = Churn(cluster)

        async def quiet_drift_zero() -> None:
            """With churn paused, the copy's catch-up and then no drift at all."""
            try:
                await eventually(cluster.no_drift, timeout=30, interval=1.0, message="no drift")
            except AssertionError:
                raise AssertionError(f"drift stays: {cluster.last_status}") from None
            await invariants_hold(cluster)

        async with sampler.running():
            await eventually(
                lambda: all(cluster.synced.values()), timeout=30, message="every ipcache synced"
            )
            # crd -> kvstore
            await cluster.copy("crd", "kvstore")
            await cluster.roll_operator("doublewrite-readcrd")
            async with churn.running():
                await cluster.switch("doublewrite-readcrd")
            await cluster.copy("crd", "kvstore")
            await quiet_drift_zero()
            await cluster.roll_operator("doublewrite-readkvstore")
            async with churn.running():
                await cluster.switch("doublewrite-readkvstore")
            await quiet_drift_zero()
            async with churn.running():
                await cluster.switch("kvstore")
            await cluster.roll_operator("kvstore")
            await same_endpoints(cluster, stable)

            # and back: the CRD store is stale now (the kvstore alone was written), so it
            # is emptied first, as the runbook says, then filled from the kvstore
            async with api.client() as client:
                await empty_crd_store(client)
            await cluster.copy("kvstore", "crd")
            await cluster.roll_operator("doublewrite-readkvstore")
            async with churn.running():
                await cluster.switch("doublewrite-readkvstore")
            await cluster.copy("kvstore", "crd")
            await quiet_drift_zero()
            await cluster.roll_operator("doublewrite-readcrd")
            async with churn.running():
                await cluster.switch("doublewrite-readcrd")
            await quiet_drift_zero()
            async with churn.running():
                await cluster.switch("crd")
            await cluster.roll_operator("crd")
            await eventually(
                lambda: all(cluster.synced.values()), timeout=30, message="synced at the end"
            )
        assert sampler.violations == [], sampler.violations[:10]
        assert sampler.samples > 50 and churn.created > 10
        assert sampler.unanswered <= sampler.samples // 10, (sampler.unanswered, sampler.samples)
        await same_endpoints(cluster, stable)
        logs = "".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob("*.log")))  # noqa: ASYNC240
        # Known and not of this work: an agent stopped (SIGTERM) while its local API serves
        # a request logs asyncio's "Exception in callback StreamReaderProtocol..." with
        # the cancelled handler's traceback. Any other traceback fails the test.
        known = "Exception in callback StreamReaderProtocol.connection_made"
        header = ""
        for line in logs.splitlines():
            if line[:4].isdigit():  # a log record's first line (a timestamp)
                header = line
            elif "Traceback" in line:
                assert known in header, f"a daemon logged a traceback after: {header}"
    finally:
        await cluster.stop()
        await api.stop()


async def invariants_hold(cluster: Cluster) -> None:
    """The scale harness's store invariants, read from each store directly: one ID per
    label set and one label set per ID, no IP held twice or outside its node's CIDR, no
    CIDR claimed twice or overlapping."""
    kv = KvstoreConfig((EtcdClusterConfig("default", tuple(cluster.kv_urls.split(","))),))
    for name, view in (
        ("kvstore", await read_store(kv)),
        ("crd", await read_crd_store(Path(cluster.kubeconfig))),
    ):
        broken = {kind: found[:5] for kind, found in view.violations.items() if found}
        assert not broken, f"{name}: {broken}"
        assert view.endpoints, f"{name}: no endpoint read"


async def same_endpoints(cluster: Cluster, stable: dict[str, tuple[str, int]]) -> None:
    """Each node still has its stable endpoints, with their IPs and identities."""
    for i, node in enumerate(NODES_):
        mine = {n: v for n, v in stable.items() if n.endswith(f"-{i}")}
        found = await cluster.endpoints(node)
        assert {n: v for n, v in found.items() if n in mine} == mine, node


async def empty_crd_store(client: KubeClient) -> None:
    for resource in (ENDPOINTS, NETWORK_POLICIES):
        for obj in (await client.list(resource)).items:
            meta = obj["metadata"]
            await client.delete(resource, meta["name"], namespace=meta.get("namespace"))
    for resource in (IDENTITIES, POD_CIDRS, NODES):
        for obj in (await client.list(resource)).items:
            await client.delete(resource, obj["metadata"]["name"])
