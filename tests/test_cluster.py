"""Whole-cluster tests with real processes: operators, agents, etcd, and `cpctl up`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from helpers import eventually

from controlplane.agent.api import request
from controlplane.bench.propagation import run_propagation_bench
from controlplane.config import EtcdClusterConfig, KvstoreConfig
from controlplane.kvstore.embedded import EmbeddedEtcd
from controlplane.processes import Daemon, stop_all

HEARTBEAT = 0.5
CHECK = 0.3
MAX_ERRORS = 2


@dataclass
class Cluster:
    etcd: EmbeddedEtcd
    operators: list[Daemon]
    agents: list[Daemon]
    workdir: Path

    def socket(self, agent: Daemon) -> Path:
        return self.workdir / f"{agent.name}.sock"

    async def status(self, agent: Daemon) -> dict[str, Any]:
        _, body = await request(self.socket(agent), "GET", "/v1/status", timeout=5)
        assert isinstance(body, dict)
        return body


@pytest_asyncio.fixture
async def cluster(etcd1: EmbeddedEtcd, tmp_path: Path) -> AsyncIterator[Cluster]:
    endpoints = ",".join(etcd1.client_urls)
    operators = [
        Daemon(
            f"op-{i}",
            "controlplane.operator.main",
            [
                "--kvstore-endpoints",
                endpoints,
                "--id",
                f"op-{i}",
                "--heartbeat-interval",
                str(HEARTBEAT),
                "--lease-duration",
                "3",
                "--renew-deadline",
                "2",
                "--retry-period",
                "0.5",
                "--metrics-address",
                "127.0.0.1:0",
            ],
            tmp_path / f"op-{i}.log",
        )
        for i in range(2)
    ]
    agents = [
        Daemon(
            f"node-{i}",
            "controlplane.agent.main",
            [
                "--kvstore-endpoints",
                endpoints,
                "--node-name",
                f"node-{i}",
                "--api-socket",
                str(tmp_path / f"node-{i}.sock"),
                "--datapath",
                "userspace",
                "--metrics-address",
                "0",
                "--heartbeat-interval",
                str(HEARTBEAT),
                "--status-check-interval",
                str(CHECK),
                "--max-consecutive-quorum-errors",
                str(MAX_ERRORS),
                "--restart-delay",
                "0.2",
                "--restart-spread",
                "0.5",
            ],
            tmp_path / f"node-{i}.log",
        )
        for i in range(3)
    ]
    state = Cluster(etcd1, operators, agents, tmp_path)
    try:
        for daemon in operators + agents:
            await daemon.start()

        async def all_ready() -> bool:
            for agent in agents:
                assert agent.running, agent.log_tail()
                try:
                    if not (await state.status(agent)).get("ready"):
                        return False
                except (OSError, TimeoutError):
                    return False
            return True

        await eventually(all_ready, timeout=60, interval=0.2, message="agents ready")
        yield state
    finally:
        await stop_all(operators + agents)


async def endpoints_of(cluster: Cluster) -> dict[str, tuple[str, int]]:
    out: dict[str, tuple[str, int]] = {}
    for agent in cluster.agents:
        _, body = await request(cluster.socket(agent), "GET", "/v1/endpoints")
        for ep in body:
            out[f"{ep['namespace']}/{ep['name']}"] = (ep["ip"], ep["identity"])
    return out


async def test_stale_heartbeat_restarts_each_agent_once(cluster: Cluster) -> None:
    for i, agent in enumerate(cluster.agents):
        body = {"namespace": "t", "name": f"pod-{i}", "labels": [f"k8s:app=a{i % 2}"]}
        status, _ = await request(cluster.socket(agent), "POST", "/v1/endpoints", body)
        assert status == 201
    before = await endpoints_of(cluster)
    assert len(before) == 3

    async def heartbeat_fresh_everywhere() -> bool:
        for agent in cluster.agents:
            status = await cluster.status(agent)
            if not status["kvstore"]["healthy"]:
                return False
            # An agent restarts for a stale heartbeat only after it saw the heartbeat
            # advance (one old record proves nothing): wait until every agent has.
            if not all(s["restart_armed"]["heartbeat"] for s in status["kvstore"]["shards"]):
                return False
        return True

    await eventually(heartbeat_fresh_everywhere, timeout=30, message="healthy before pause")
    for op in cluster.operators:
        op.signal(signal.SIGSTOP)
    paused_at = time.monotonic()
    detected: dict[str, float] = {}

    async def all_unhealthy_and_restarted() -> bool:
        for agent in cluster.agents:
            status = await cluster.status(agent)
            if not status["kvstore"]["healthy"] and agent.name not in detected:
                detected[agent.name] = time.monotonic() - paused_at
            if agent.name not in detected or status["restarts"]["count"] != 1:
                return False
        return True

    try:
        await eventually(
            all_unhealthy_and_restarted,
            timeout=30,
            interval=0.05,
            message="every agent unhealthy and restarted once",
        )
    except AssertionError:
        for agent in cluster.agents:
            print(agent.name, json.dumps(await cluster.status(agent))[:2500])
            print(agent.log_tail(15))
        raise
    bound = 2 * HEARTBEAT + (MAX_ERRORS + 1) * CHECK
    print(f"detected after {detected} (bound {bound:.1f}s)")
    # Generous slack: process scheduling on a loaded 2-core machine, and our polling.
    assert max(detected.values()) < bound + 3.0

    # While the operators stay paused, agents stay unhealthy and do not restart again.
    observe_until = time.monotonic() + 6 * CHECK + 2 * HEARTBEAT
    while time.monotonic() < observe_until:
        for agent in cluster.agents:
            status = await cluster.status(agent)
            assert status["restarts"]["count"] == 1, status["restarts"]
            assert not status["kvstore"]["healthy"]
        await asyncio.sleep(CHECK)

    for op in cluster.operators:
        op.signal(signal.SIGCONT)
    await eventually(heartbeat_fresh_everywhere, timeout=30, message="healthy after resume")
    # (and re-armed: the next outage would restart them once more)
    assert await endpoints_of(cluster) == before  # same IPs, same identities
    for agent in cluster.agents:
        assert (await cluster.status(agent))["restarts"]["count"] == 1


@pytest.mark.parametrize("store", ["crd", "kvstore"])
async def test_cpctl_up_runs_a_cluster(store: str, tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "controlplane.cli.main",
        "up",
        "--store",
        store,
        "--agents",
        "2",
        "--duration",
        "3",
        "--refresh",
        "3",
        "--json",
        "--heartbeat-interval",
        "1",
        "--workdir",
        str(tmp_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 150)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    assert proc.returncode == 0, err.decode()[-2000:]
    views = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
    assert views, out.decode()
    last = views[-1]
    assert last["mode"] == store
    assert last["leader"] in ("operator-0", "operator-1")
    assert sorted(n["name"] for n in last["nodes"]) == ["node-0", "node-1"]
    assert all(len(n["cidrs"]) == 1 for n in last["nodes"])
    assert len(last["endpoints"]) == 5 and len(last["identities"]) == 4
    # every endpoint, plus the one node IP the agents on this host share
    assert all(a["ready"] for a in last["agents"].values())
    assert [a["ipcache"] for a in last["agents"].values()] == [6, 6]
    assert "userspace maps" in out.decode()
    if store == "crd":  # kubectl sees the custom resources
        kubeconfig = tmp_path / "kube" / "kubeconfig"
        assert f"KUBECONFIG={kubeconfig} kubectl" in out.decode()


async def test_propagation_bench_runs(etcd1: EmbeddedEtcd, tmp_path: Path) -> None:
    config = KvstoreConfig((EtcdClusterConfig("default", tuple(etcd1.client_urls)),))
    lines: list[str] = []
    record = await run_propagation_bench(
        config, agents=3, endpoints=5, rounds=2, workdir=tmp_path, progress=lines.append
    )
    for side in ("bare_all_watchers", "agents_all_datapaths"):
        assert set(record[side]) == {"p50_ms", "p99_ms", "max_ms", "mean_ms"}
        assert record[side]["max_ms"] >= record[side]["p50_ms"]
    assert record["ratio_p99"] > 0
    assert sum("agents: all 2 datapaths" in line for line in lines) == 2
    assert sum("bare: all 2 watchers" in line for line in lines) == 2
