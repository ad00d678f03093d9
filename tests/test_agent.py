"""The agent against real etcd: local API, caches and ipcache, restarts, heartbeat health."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from dataclasses import replace
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import pytest

from controlplane import codec
from controlplane.agent.agent import Agent, AgentExit
from controlplane.agent.api import request
from controlplane.agent.settings import EXIT_RESTART, AgentSettings, RestartMode
from controlplane.cli import status_cmd
from controlplane.config import EtcdClusterConfig, KvstoreConfig
from controlplane.datapath.ipcache import FLAG_LOCAL, FLAG_NODE
from controlplane.ipam.cidr import ClusterPoolAllocator
from controlplane.kvstore.backend import EtcdBackend
from controlplane.kvstore.embedded import EmbeddedEtcd
from controlplane.kvstore.heartbeat import Heartbeat, write_heartbeat
from controlplane.kvstore.ipam import KvCIDRStore
from controlplane.kvstore.keys import KeyLayout
from controlplane.kvstore.shards import ShardMap
from controlplane.metrics import StoreMetrics
from controlplane.model import (
    CIDRPool,
    Endpoint,
    IPNetwork,
    Node,
    NodeName,
    NumericIdentity,
    parse_ip,
)
from tests.helpers import FAST, backend_for, eventually, holds_for, running

LAYOUT = KeyLayout()
REPO = Path(__file__).resolve().parent.parent
POOL = CIDRPool(ip_network("10.20.0.0/16"), 24)


def kv_config(etcd: EmbeddedEtcd) -> KvstoreConfig:
    return KvstoreConfig((EtcdClusterConfig("default", tuple(etcd.client_urls)),), client=FAST)


def agent_settings(tmp_path: Path, node: str, ip: str, **overrides: Any) -> AgentSettings:
    base = AgentSettings(
        node=NodeName(node),
        node_ips=(parse_ip(ip),),
        lease_ttl=60,
        status_check_interval=0.2,
        quorum_check_timeout=1.0,
        restart_delay=0.05,
        restart_spread=0.1,
        api_socket=tmp_path / f"{node}.sock",
        telemetry_port=0,
    )
    return replace(base, **overrides)


async def give_cidrs(etcd: EmbeddedEtcd, *nodes: str) -> dict[str, IPNetwork]:
    """Do what the operator does: claim a CIDR of the pool for each node."""
    async with ShardMap(kv_config(etcd), own_connection=True) as shards:
        allocator = ClusterPoolAllocator(KvCIDRStore(shards, LAYOUT, StoreMetrics.create()), POOL)
        await allocator.restore()
        return {n: await allocator.allocate(NodeName(n)) for n in nodes}


async def api(agent_or_socket: Agent | Path, method: str, path: str, body: Any = None) -> Any:
    sock = (
        agent_or_socket.settings.api_socket
        if isinstance(agent_or_socket, Agent)
        else agent_or_socket
    )
    return await request(sock, method, path, body, timeout=20)


async def create(agent: Agent | Path, ns: str, name: str, labels: list[str]) -> dict[str, Any]:
    status, body = await api(agent, "POST", "/v1/endpoints", {
        "namespace": ns, "name": name, "labels": labels,
    })  # fmt: skip
    assert status in (200, 201), body
    result: dict[str, Any] = body
    return result


def armed(agent: Agent) -> bool:
    """A connection failure would restart ``agent`` (a ready session read a quorum)."""
    shards = agent.shard_health()
    return bool(shards) and all(s.arm.connection for s in shards)


def cached(agent: Agent, ip: str) -> int | None:
    """The identity ``agent``'s ipcache holds for ``ip``/32, or None."""
    found = agent.ipcache.get(ip_network(f"{ip}/32"))
    return None if found is None else int(found.identity)


class Beats:
    """A stand-in for the operator's heartbeat writer (interval 0.3 s)."""

    def __init__(self, backend: EtcdBackend, interval: float = 0.3) -> None:
        self.backend = backend
        self.interval = interval
        self.seq = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.seq += 1
            beat = Heartbeat(time.time(), self.seq, "test-operator", self.interval)
            await write_heartbeat(self.backend, LAYOUT, beat)
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="test-heartbeat")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


# ---------------------------------------------------------------------------------------


async def test_endpoints_through_the_local_api(etcd1: EmbeddedEtcd, tmp_path: Path) -> None:
    cidrs = await give_cidrs(etcd1, "node-a", "node-b")
    config = kv_config(etcd1)
    a = Agent(agent_settings(tmp_path, "node-a", "127.0.0.11"), config)
    b = Agent(agent_settings(tmp_path, "node-b", "127.0.0.12"), config)
    async with running(a), running(b):
        await asyncio.wait_for(asyncio.gather(a.wait_ready(), b.wait_ready()), 20)
        web_a = await create(a, "default", "web-1", ["k8s:app=web", "k8s:tier=front"])
        web_b = await create(b, "default", "web-2", ["k8s:tier=front", "k8s:app=web"])
        db = await create(b, "default", "db-1", ["k8s:app=db"])
        assert ip_address(web_a["ip"]) in cidrs["node-a"]
        assert ip_address(web_b["ip"]) in cidrs["node-b"]
        assert web_a["identity"] == web_b["identity"] != db["identity"]
        # Idempotent; other labels for the same name conflict.
        again = await create(a, "default", "web-1", ["k8s:app=web", "k8s:tier=front"])
        assert "write_issued_at" in web_a  # only a creation writes
        assert again == {k: v for k, v in web_a.items() if k != "write_issued_at"}
        status, body = await api(a, "POST", "/v1/endpoints", {
            "namespace": "default", "name": "web-1", "labels": ["k8s:app=other"],
        })  # fmt: skip
        assert status == 409 and "other labels" in body["error"]
        # Each agent's cache and ipcache learn the other's endpoints.
        await eventually(lambda: cached(a, db["ip"]) == db["identity"], message="a sees db")
        await eventually(lambda: cached(b, web_a["ip"]) == web_a["identity"], message="b sees web")
        entry = b.ipcache.get(ip_network(f"{web_a['ip']}/32"))
        assert entry is not None and str(entry.tunnel_endpoint) == "127.0.0.11"
        assert web_a["ip"] in b.cache.endpoints
        # Node records come on their own watch: no order against the endpoints' one.
        await eventually(
            lambda: cached(b, "127.0.0.11") == 6,  # reserved:remote-node
            message="b holds node-a's IP as a remote node",
        )
        await eventually(lambda: web_a["identity"] in {i.id for i in b.cache.identities.values()})
        # Listing and status.
        status, listed = await api(a, "GET", "/v1/endpoints")
        assert status == 200 and [e["name"] for e in listed] == ["web-1"]
        status, st = await api(a, "GET", "/v1/status")
        assert status == 200 and st["node"] == "node-a" and st["cidr"] == str(cidrs["node-a"])
        assert st["endpoints"] == 1 and st["kvstore"]["healthy"] and st["ready"]

        async def a_map_entries() -> int:
            _, now = await api(a, "GET", "/v1/status")
            return int(now["datapath"]["maps"]["cp_ipcache"]["entries"])

        # web-2 and node-b reach a on their own watches: wait for them, then count
        await eventually(
            lambda: cached(a, web_b["ip"]) == web_b["identity"] and cached(a, "127.0.0.12") == 6,
            message="a holds web-2 and node-b",
        )
        assert await a_map_entries() >= 4
        # Delete reverses all three.
        status, _ = await api(a, "DELETE", "/v1/endpoints/default/web-1")
        assert status == 200
        status, _ = await api(a, "DELETE", "/v1/endpoints/default/web-1")
        assert status == 404
        await eventually(lambda: cached(b, web_a["ip"]) is None, message="b forgets web-1")
        async with backend_for(etcd1.client_urls) as raw:
            leases = await raw.list_prefix(LAYOUT.ipam_node_leases("node-a"))
            assert leases.kvs == ()
        # b still holds the shared identity; a dropped its reference.
        assert b.cache.identities[str(web_b["identity"])].labels.to_strings() == [
            "k8s:app=web",
            "k8s:tier=front",
        ]


async def test_bad_requests_get_400_and_the_agent_keeps_serving(
    etcd1: EmbeddedEtcd, tmp_path: Path
) -> None:
    await give_cidrs(etcd1, "node-a")
    a = Agent(agent_settings(tmp_path, "node-a", "127.0.0.11"), kv_config(etcd1))
    async with running(a):
        await asyncio.wait_for(a.wait_ready(), 20)
        sock = a.settings.api_socket
        bad_bodies: list[Any] = [
            {"namespace": "default"},
            {"namespace": "Bad_NS", "name": "x", "labels": []},
            {"namespace": "default", "name": "x", "labels": "k8s:app=web"},
            {"namespace": "default", "name": "x", "labels": ["k8s:app=we b"]},
            [1, 2],
        ]
        for body in bad_bodies:
            status, answer = await api(sock, "POST", "/v1/endpoints", body)
            assert status == 400 and "error" in answer, (body, answer)
        reader, writer = await asyncio.open_unix_connection(str(sock))
        writer.write(b"POST /v1/endpoints HTTP/1.1\r\nContent-Length: 5\r\n\r\n{nope")
        await writer.drain()
        raw = await reader.read()
        writer.close()
        assert raw.startswith(b"HTTP/1.1 400")
        reader, writer = await asyncio.open_unix_connection(str(sock))
        writer.write(b"garbage\r\n\r\n")
        await writer.drain()
        assert (await reader.read()).startswith(b"HTTP/1.1 400")
        writer.close()
        assert (await api(sock, "GET", "/v2/nothing"))[0] == 404
        assert (await api(sock, "PUT", "/v1/status"))[0] == 405
        assert (await api(sock, "GET", "/v1/status"))[0] == 200


async def test_a_client_closing_before_its_request_is_no_error(
    etcd1: EmbeddedEtcd, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A client cancelled between connecting and writing (a test's churn loop) closes an
    empty connection: the agent logs no error and keeps serving."""
    await give_cidrs(etcd1, "node-a")
    a = Agent(agent_settings(tmp_path, "node-a", "127.0.0.11"), kv_config(etcd1))
    async with running(a):
        await asyncio.wait_for(a.wait_ready(), 20)
        sock = a.settings.api_socket
        for _ in range(3):
            _, writer = await asyncio.open_unix_connection(str(sock))
            writer.close()
            await writer.wait_closed()
        assert (await api(sock, "GET", "/v1/status"))[0] == 200  # served after them
    assert not [r for r in caplog.records if r.name == "controlplane.agent.api"]


async def test_inprocess_restart_keeps_endpoints_and_peers_never_lose_them(
    etcd1: EmbeddedEtcd, tmp_path: Path
) -> None:
    await give_cidrs(etcd1, "node-a", "node-b")
    config = kv_config(etcd1)
    a = Agent(agent_settings(tmp_path, "node-a", "127.0.0.11"), config)
    b = Agent(agent_settings(tmp_path, "node-b", "127.0.0.12"), config)
    async with running(a), running(b):
        await asyncio.wait_for(asyncio.gather(a.wait_ready(), b.wait_ready()), 20)
        made = [await create(a, "ns1", f"pod-{i}", [f"k8s:app=a{i % 3}"]) for i in range(6)]
        for ep in made:
            await eventually(lambda ep=ep: cached(b, ep["ip"]) == ep["identity"])
            await eventually(lambda ep=ep: cached(a, ep["ip"]) == ep["identity"])
        await eventually(lambda: a.ipcache.dump() == a.reconciler.desired(), message="flushed")
        a_ipcache_before = a.ipcache.dump()
        a_updates = a.reconciler.stats.updates
        lost: list[str] = []

        async def watch_b() -> None:
            while True:
                lost.extend(ep["ip"] for ep in made if cached(b, ep["ip"]) != ep["identity"])
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch_b())
        try:
            a.restart("test")
            await eventually(lambda: a.restarts == 1 and a.ready, message="a restarted")
            status, listed = await api(a, "GET", "/v1/endpoints")
            assert status == 200
            assert {(e["name"], e["ip"], e["identity"]) for e in listed} == {
                (e["name"], e["ip"], e["identity"]) for e in made
            }
            await eventually(lambda: a.reconciler.stats.resyncs >= 2, message="a resynced")
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        assert lost == [], f"b's ipcache lost {sorted(set(lost))} during a's restart"
        # a's own map was reconciled, not flushed: nothing was rewritten.
        assert a.ipcache.dump() == a_ipcache_before
        assert a.reconciler.stats.updates == a_updates
        assert a.last_restart_reason == "test"
        metric = a.metrics.registry.get_sample_value(
            "cp_agent_kvstore_restarts_total", {"reason": "test"}
        )
        assert metric == 1


async def test_stale_heartbeat_restarts_once_then_recovers(
    etcd1: EmbeddedEtcd, tmp_path: Path
) -> None:
    await give_cidrs(etcd1, "node-a")
    interval, check, max_errors = 0.3, 0.2, 2
    settings = agent_settings(
        tmp_path,
        "node-a",
        "127.0.0.11",
        heartbeat_interval=interval,
        status_check_interval=check,
        max_consecutive_quorum_errors=max_errors,
    )
    async with backend_for(etcd1.client_urls) as raw:
        beats = Beats(raw, interval)
        beats.start()
        a = Agent(settings, kv_config(etcd1))
        try:
            async with running(a):
                await asyncio.wait_for(a.wait_ready(), 20)
                ep = await create(a, "default", "web", ["k8s:app=web"])
                # Healthy and armed: the heartbeat was seen advancing.
                await eventually(
                    lambda: (
                        a.shard_health()
                        and a.shard_health()[0].arm.heartbeat
                        and a.shard_health()[0].healthy
                    ),
                    message="heartbeat seen advancing",
                )
                await beats.stop()
                stopped = time.monotonic()
                await eventually(
                    lambda: a.restarts >= 1 or not a.status()["kvstore"]["healthy"],
                    timeout=10,
                    interval=0.01,
                    message="unhealthy",
                )
                took = time.monotonic() - stopped
                bound = 2 * interval + (max_errors + 1) * check
                assert took <= bound + 0.5, f"noticed after {took:.2f}s (bound {bound:.2f}s)"
                await eventually(lambda: a.restarts == 1 and a.ready, message="restarted once")
                assert a.last_restart_reason == "heartbeat-stale"
                # The operator stays down: unhealthy, but no second restart.
                await eventually(
                    lambda: a.status()["kvstore"]["state"].startswith(
                        "unhealthy: default: heartbeat stale"
                    ),
                    message="reports stale heartbeat",
                )
                health = a.health_checks()
                assert health["etcd"].ok and not health["heartbeat"].ok
                await holds_for(lambda: a.restarts == 1, 3.0, "restarted again while down")
                # The operator comes back: healthy again, still one restart.
                beats.start()
                await eventually(lambda: a.status()["kvstore"]["healthy"], message="healthy")
                assert a.restarts == 1
                _status, listed = await api(a, "GET", "/v1/endpoints")
                assert [(e["ip"], e["identity"]) for e in listed] == [(ep["ip"], ep["identity"])]
        finally:
            await beats.stop()


async def test_malformed_values_are_skipped_and_counted(
    etcd1: EmbeddedEtcd, tmp_path: Path
) -> None:
    await give_cidrs(etcd1, "node-a")
    a = Agent(agent_settings(tmp_path, "node-a", "127.0.0.11"), kv_config(etcd1))
    async with backend_for(etcd1.client_urls) as raw, running(a):
        await asyncio.wait_for(a.wait_ready(), 20)
        await raw.put(LAYOUT.ip("default", "10.99.0.1"), b"\xc1garbage")
        await raw.put(LAYOUT.ip("default", "not-an-ip"), b"\x00")
        await raw.put(LAYOUT.node("default", "broken"), b"{}")
        await raw.put(LAYOUT.identity_id(77777), b"nope")
        await raw.put(LAYOUT.heartbeat, b"nope")

        def skipped() -> float:
            return float(a.status()["malformed_skipped"])

        await eventually(lambda: skipped() >= 5, message="malformed values counted")
        ep = await create(a, "default", "web", ["k8s:app=web"])
        await eventually(lambda: cached(a, ep["ip"]) == ep["identity"])
        assert a.restarts == 0 and a.ready


async def test_own_node_ip_stays_host_whatever_else_claims_it(
    etcd1: EmbeddedEtcd, tmp_path: Path
) -> None:
    """A stale record of another node (say a recycled machine) with this node's IP, and an
    endpoint record claiming it, do not turn this node's host traffic into theirs."""
    await give_cidrs(etcd1, "node-b")
    b = Agent(agent_settings(tmp_path, "node-b", "127.0.0.12"), kv_config(etcd1))
    async with backend_for(etcd1.client_urls) as raw, running(b):
        await asyncio.wait_for(b.wait_ready(), 20)
        await eventually(lambda: cached(b, "127.0.0.12") == 1, message="host entry")  # host
        stale = Node(name=NodeName("aaa-old-node"), ips=(parse_ip("127.0.0.12"),))
        await raw.put(LAYOUT.node("default", "aaa-old-node"), codec.encode("node", stale.to_dict()))
        squatter = Endpoint(
            ip=parse_ip("127.0.0.12"),
            identity=NumericIdentity(4242),
            node=NodeName("aaa-old-node"),
            host_ip=parse_ip("127.0.0.12"),
            name="squatter",
            namespace="default",
        )
        await raw.put(
            LAYOUT.ip("default", "127.0.0.12"), codec.encode("endpoint", squatter.to_dict())
        )
        await eventually(lambda: len(b.cache.nodes) == 2 and "127.0.0.12" in b.cache.endpoints)
        await holds_for(lambda: cached(b, "127.0.0.12") == 1, 0.5, "the host entry holds")
        entry = b.ipcache.get(ip_network("127.0.0.12/32"))
        assert entry is not None and entry.flags == FLAG_LOCAL | FLAG_NODE


async def test_cpctl_status_talks_to_the_agent(
    etcd1: EmbeddedEtcd, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await give_cidrs(etcd1, "node-a")
    a = Agent(agent_settings(tmp_path, "node-a", "127.0.0.11"), kv_config(etcd1))
    async with running(a):
        await asyncio.wait_for(a.wait_ready(), 20)
        await create(a, "default", "web", ["k8s:app=web"])
        assert await status_cmd.show(a.settings.api_socket, as_json=False) == 0
        out = capsys.readouterr().out
        assert "node-a" in out and "healthy" in out and "endpoints" in out
        assert await status_cmd.show(a.settings.api_socket, as_json=True) == 0
        assert '"node": "node-a"' in capsys.readouterr().out
    with pytest.raises(status_cmd.CommandError, match="agent not running"):
        await status_cmd.show(tmp_path / "nobody.sock", as_json=False)


# --- the process ------------------------------------------------------------------------


def agent_argv(etcd: EmbeddedEtcd, tmp_path: Path, node: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "controlplane.agent.main",
        "--kvstore-endpoints",
        ",".join(etcd.client_urls),
        "--node-name",
        node,
        "--node-ip",
        "127.0.0.21",
        "--api-socket",
        str(tmp_path / f"{node}-proc.sock"),
        "--metrics-address",
        "0",
        "--status-check-interval",
        "0.2",
        "--restart-delay",
        "0.05",
        "--restart-spread",
        "0.1",
        "--lease-ttl",
        "60",
        "--datapath",  # never the machine-wide pinned ipcache (tests/test_agent_kernel.py)
        "userspace",
        *extra,
    ]


async def start_process(argv: list[str]) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        cwd=REPO,
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    assert line.startswith(b"cp-agent: node"), line
    assert b"metrics http://127.0.0.1:" in line and b":0 " not in line
    return proc


async def process_ready(sock: Path) -> bool:
    try:
        status, body = await request(sock, "GET", "/v1/status", timeout=5)
    except (OSError, TimeoutError):
        return False
    return status == 200 and bool(body["ready"])


async def test_agent_process_survives_kill_9(etcd1: EmbeddedEtcd, tmp_path: Path) -> None:
    await give_cidrs(etcd1, "proc-node", "node-b")
    argv = agent_argv(etcd1, tmp_path, "proc-node")
    sock = tmp_path / "proc-node-proc.sock"
    b = Agent(agent_settings(tmp_path, "node-b", "127.0.0.12"), kv_config(etcd1))
    proc = await start_process(argv)
    try:
        async with running(b):
            await eventually(lambda: process_ready(sock), timeout=30, message="process ready")
            made = [await create(sock, "ns", f"p{i}", [f"k8s:app=x{i % 2}"]) for i in range(4)]
            await asyncio.wait_for(b.wait_ready(), 20)
            for ep in made:
                await eventually(lambda ep=ep: cached(b, ep["ip"]) == ep["identity"])
            lost: list[str] = []

            async def watch_b() -> None:
                while True:
                    lost.extend(ep["ip"] for ep in made if cached(b, ep["ip"]) != ep["identity"])
                    await asyncio.sleep(0.005)

            watcher = asyncio.create_task(watch_b())
            try:
                proc.kill()
                await proc.wait()
                proc = await start_process(argv)
                await eventually(lambda: process_ready(sock), timeout=30, message="ready again")
                status, listed = await request(sock, "GET", "/v1/endpoints")
                assert status == 200
                assert {(e["name"], e["ip"], e["identity"]) for e in listed} == {
                    (e["name"], e["ip"], e["identity"]) for e in made
                }
                # New endpoints do not reuse an IP the old process leased.
                extra = await create(sock, "ns", "p-new", ["k8s:app=x0"])
                assert extra["ip"] not in {e["ip"] for e in made}
                assert extra["identity"] == made[0]["identity"]
            finally:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)
            assert lost == [], f"b's ipcache lost {sorted(set(lost))} across kill -9"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        assert not sock.exists()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_restart_mode_exit_exits_with_its_own_status(
    etcd1: EmbeddedEtcd, tmp_path: Path
) -> None:
    await give_cidrs(etcd1, "exit-node")
    argv = agent_argv(
        etcd1,
        tmp_path,
        "exit-node",
        "--restart-mode=exit",
        "--heartbeat-interval",
        "0.3",
    )
    async with backend_for(etcd1.client_urls) as raw:
        beats = Beats(raw)
        beats.start()
        proc = await start_process(argv)
        try:
            sock = tmp_path / "exit-node-proc.sock"
            await eventually(lambda: process_ready(sock), timeout=30, message="ready")
            # Let it see the heartbeat advance, then stop the "operator".
            seen = await _wait_armed(sock)
            assert seen
            await beats.stop()
            assert await asyncio.wait_for(proc.wait(), 20) == EXIT_RESTART
        finally:
            await beats.stop()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def _wait_armed(sock: Path) -> bool:
    async def armed() -> bool:
        _status, body = await request(sock, "GET", "/v1/status", timeout=5)
        shards = body["kvstore"]["shards"]
        return bool(shards) and all(s["restart_armed"]["heartbeat"] for s in shards)

    return await eventually(armed, timeout=20, message="heartbeat restart armed")


async def test_inprocess_exit_mode_raises_agent_exit(etcd1: EmbeddedEtcd, tmp_path: Path) -> None:
    await give_cidrs(etcd1, "node-a")
    settings = agent_settings(tmp_path, "node-a", "127.0.0.11", restart_mode=RestartMode.EXIT)
    a = Agent(settings, kv_config(etcd1))
    with pytest.raises(AgentExit) as info:  # running() re-raises what run() raised
        async with running(a) as task:
            await asyncio.wait_for(a.wait_ready(), 20)
            a.restart("test")
            await asyncio.wait({task}, timeout=10)
    assert info.value.status == EXIT_RESTART


@pytest.mark.parametrize(
    "flags",
    [
        ["--status-check-interval", "-1"],
        ["--restart-mode", "sometimes"],
        ["--node-ip", "not-an-ip"],
        ["--metrics-address", "nohost"],
    ],
)
async def test_bad_flags_exit_2_with_one_line(flags: list[str], tmp_path: Path) -> None:
    argv = [
        sys.executable,
        "-m",
        "controlplane.agent.main",
        "--kvstore-endpoints",
        "http://127.0.0.1:1",
        *flags,
    ]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "CP_KVSTORE_ENDPOINTS": ""},
    )
    _out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cp-agent: error:"), lines


async def test_missing_kvstore_is_a_usage_error(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CP_KVSTORE")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "controlplane.agent.main",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert len(err.decode().strip().splitlines()) == 1


async def test_etcd_outage_restarts_once_and_recovers(etcd1: EmbeddedEtcd, tmp_path: Path) -> None:
    await give_cidrs(etcd1, "node-a")
    a = Agent(agent_settings(tmp_path, "node-a", "127.0.0.11"), kv_config(etcd1))
    async with running(a):
        await asyncio.wait_for(a.wait_ready(), 20)
        ep = await create(a, "default", "web", ["k8s:app=web"])
        await eventually(lambda: cached(a, ep["ip"]) == ep["identity"], message="in the map")
        await eventually(lambda: armed(a), message="ready and a quorum read since: armed")
        etcd1.pause_member(0)
        try:
            await eventually(lambda: a.restarts == 1, timeout=20, message="restarted")
            assert a.last_restart_reason == "no-quorum"
            await eventually(
                lambda: "no quorum" in a.status()["kvstore"]["state"], message="reports no quorum"
            )
            await holds_for(lambda: a.restarts == 1, 3.0, "restarted again during the outage")
            assert not a.health_checks()["etcd"].ok
            assert cached(a, ep["ip"]) == ep["identity"], "the map must keep forwarding"
        finally:
            etcd1.resume_member(0)
        await eventually(lambda: a.ready and a.status()["kvstore"]["healthy"], timeout=30)
        assert a.restarts == 1
        status, listed = await api(a, "GET", "/v1/endpoints")
        assert status == 200 and [e["ip"] for e in listed] == [ep["ip"]]


async def test_cleanup_on_exit_withdraws_everything(etcd1: EmbeddedEtcd, tmp_path: Path) -> None:
    await give_cidrs(etcd1, "node-a")
    settings = agent_settings(tmp_path, "node-a", "127.0.0.11", cleanup_on_exit=True)
    a = Agent(settings, kv_config(etcd1))
    async with running(a):
        await asyncio.wait_for(a.wait_ready(), 20)
        await create(a, "default", "web", ["k8s:app=web"])
    async with backend_for(etcd1.client_urls) as raw:
        assert (await raw.list_prefix(LAYOUT.ip_prefix("default"))).kvs == ()
        assert (await raw.list_prefix(LAYOUT.ipam_node_leases("node-a"))).kvs == ()
        assert await raw.get(LAYOUT.node("default", "node-a")) is None
