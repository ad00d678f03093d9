"""End to end: two nodes, pods made by ``cp-cni ADD``, policy enforced on real TCP traffic.

Topology, all in network namespaces this test creates (nothing on the host's own network)::

    web, other (pods) --veth-- node1 (10.219.0.1) ==veth== node2 (10.219.0.2) --veth-- db

Each "node" is a network namespace with ip_forward on, running an in-process agent against
the etcd1 fixture (kernel datapath, maps pinned in a per-test directory under
/sys/fs/bpf, routes to the other node's pod CIDR programmed inside its node namespace by
``routes_netns``). The operator's CIDR claims are simulated (``give_cidrs``). The plugin
runs as a subprocess inside the node's network namespace (``nsenter --net``, which keeps
the real bpffs), so pod traffic crosses node1's routing table, the inter-node veth, node2
and the tc program on db's host-side veth.

Needs root, clang, libbpf, ``ip`` and ``nsenter``; the module is skipped (reason printed)
otherwise. Sockets are opened inside a namespace with ``loader.in_netns`` and used from a
worker thread (``asyncio.to_thread``), as the agents share the test's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import select
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from controlplane.agent.agent import Agent
from controlplane.agent.settings import AgentSettings, DatapathMode
from controlplane.config import CrdConfig, KvstoreConfig
from controlplane.datapath import loader
from controlplane.datapath.counters import pinned_verdict_counts
from controlplane.datapath.routes import RTPROT_CP
from controlplane.kvstore.embedded import EmbeddedEtcd
from controlplane.kvstore.keys import KeyLayout
from controlplane.kvstore.policies import KvPolicyStore
from controlplane.kvstore.shards import ShardMap
from controlplane.metrics import StoreMetrics
from controlplane.model import NetworkPolicy
from tests.helpers import eventually, ip, kernel_tests_unmet, requires
from tests.icmp_echo import echo_reply, echo_request, ping, raw_icmp
from tests.test_agent import agent_settings, api, give_cidrs, kv_config
from tests.test_cni import Ran, cni

pytestmark = requires(kernel_tests_unmet("ip", "nsenter"))

PORT = 5432
TCP = 6
ICMP = 1
NODE_IPS = {"node1": "10.219.0.1", "node2": "10.219.0.2"}
PODS = {"web": ("node1", "app=web"), "other": ("node1", "app=other"), "db": ("node2", "app=db")}
LAYOUT = KeyLayout()


@dataclass
class Topology:
    netns: dict[str, str]  # node or pod name -> network namespace
    pin_dirs: dict[str, Path]  # node -> bpffs directory
    pods: Mapping[str, tuple[str, str]] = field(default_factory=lambda: PODS)
    """Pod -> (node, label); ``cni`` ADDs them."""
    token: str = ""


def _remove_pins(pin_dir: Path) -> None:
    if pin_dir.exists():
        for pin in pin_dir.iterdir():
            pin.unlink()
        pin_dir.rmdir()


@pytest.fixture
def topology() -> Iterator[Topology]:
    with build_topology(PODS) as topo:
        yield topo


@contextlib.contextmanager
def build_topology(pods: Mapping[str, tuple[str, str]]) -> Iterator[Topology]:
    """The two node namespaces joined by a veth, and an (empty) namespace per pod."""
    tok = secrets.token_hex(3)
    netns = {name: f"cpe2e-{tok}-{name}" for name in (*NODE_IPS, *pods)}
    pin_dirs = {node: Path(f"/sys/fs/bpf/cp-e2e-{tok}-{node}") for node in NODE_IPS}
    try:
        for ns in netns.values():
            ip("netns", "add", ns)
        n1, n2 = netns["node1"], netns["node2"]
        ip("-n", n1, "link", "add", f"e2e{tok}a", "type", "veth",
            "peer", "name", f"e2e{tok}b", "netns", n2)  # fmt: skip
        for node, dev in (("node1", f"e2e{tok}a"), ("node2", f"e2e{tok}b")):
            ns = netns[node]
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "addr", "add", f"{NODE_IPS[node]}/24", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            with loader.in_netns(ns):
                Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
                for conf in ("all", "default"):
                    Path(f"/proc/sys/net/ipv4/conf/{conf}/rp_filter").write_text("0\n")
        yield Topology(netns, pin_dirs, pods, tok)
    finally:
        # Deleting a node namespace takes its veths (and their tc programs and routes).
        for ns in netns.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        for pin_dir in pin_dirs.values():
            _remove_pins(pin_dir)


@dataclass
class Cluster:
    etcd: EmbeddedEtcd
    topo: Topology
    settings: dict[str, AgentSettings]
    agents: dict[str, Agent] = field(default_factory=dict)
    tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    config: KvstoreConfig | CrdConfig | None = None
    """The agents' store (None: kvstore mode on ``etcd``)."""

    async def start(self, node: str) -> Agent:
        agent = Agent(self.settings[node], self.config or kv_config(self.etcd))
        self.agents[node] = agent
        self.tasks[node] = asyncio.create_task(agent.run(), name=f"e2e-agent:{node}")
        await asyncio.wait_for(agent.started.wait(), 10)
        return agent

    async def kill(self, node: str) -> None:
        """Cancel the agent's task: no cleanup, as if the process died."""
        task = self.tasks.pop(node)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def stop_all(self) -> None:
        for node, task in list(self.tasks.items()):
            self.agents[node].stop()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 20)
            if not task.done():
                await self.kill(node)
        self.tasks.clear()

    def conf(self, node: str) -> dict[str, Any]:
        return {
            "cniVersion": "1.0.0",
            "name": "cp",
            "type": "cp-cni",
            "agentSocket": str(self.settings[node].api_socket),
            "pinDir": str(self.topo.pin_dirs[node]),
        }

    async def cni(self, command: str, pod: str) -> Ran:
        node, label = self.topo.pods[pod]
        env = {
            "CNI_CONTAINERID": f"ctr-{pod}",
            "CNI_NETNS": f"/run/netns/{self.topo.netns[pod]}",
            "CNI_IFNAME": "eth0",
            "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod};"
            f"CP_LABELS=k8s:{label}",
        }
        return await cni(command, self.conf(node), node=self.topo.netns[node], env=env)


@pytest_asyncio.fixture
async def cluster(
    etcd1: EmbeddedEtcd, tmp_path: Path, topology: Topology
) -> AsyncIterator[Cluster]:
    async with running_cluster(etcd1, tmp_path, topology) as c:
        yield c


@contextlib.asynccontextmanager
async def running_cluster(
    etcd: EmbeddedEtcd,
    tmp_path: Path,
    topology: Topology,
    config: KvstoreConfig | CrdConfig | None = None,
    **overrides: Any,
) -> AsyncIterator[Cluster]:
    """A :class:`Cluster` over ``topology`` (agents not started yet); ``overrides`` of
    the agents' settings take a callable of the node name. With a CRD ``config`` the
    caller has given the nodes their CIDRs."""
    if config is None:
        await give_cidrs(etcd, *NODE_IPS)
    settings = {
        node: agent_settings(
            tmp_path,
            node,
            ip,
            datapath=DatapathMode.KERNEL,
            bpf_pin_dir=topology.pin_dirs[node],
            routes=True,
            routes_netns=topology.netns[node],
            **{key: value(node) for key, value in overrides.items()},
        )
        for node, ip in NODE_IPS.items()
    }
    c = Cluster(etcd, topology, settings, config=config)
    try:
        yield c
    finally:
        await c.stop_all()


def _policy(*sources: str) -> NetworkPolicy:
    return NetworkPolicy.from_dict({
        "name": "db",
        "namespace": "default",
        "endpoint_selector": ["app=db"],
        "ingress": [
            {"from_selector": [src], "ports": [{"port": PORT, "proto": "TCP"}]} for src in sources
        ],
    })  # fmt: skip


def _exported_drops(agent: Agent) -> float:
    """The agent's Prometheus export of the same counter (read from the map at scrape)."""
    labels = {"reason": "drop_policy_deny", "verdict": "drop"}
    return agent.metrics.registry.get_sample_value("cp_datapath_packets_total", labels) or 0.0


def _drops(pin_dir: Path) -> int:
    counts = pinned_verdict_counts(pin_dir) or []
    return next((c.packets for c in counts if c.reason == "drop_policy_deny"), 0)


def _connect(src_ns: str, dst_ns: str, dst_ip: str, timeout: float) -> str:
    """One TCP connect from ``src_ns`` to a listener on ``dst_ip:PORT`` in ``dst_ns``, with
    a byte carried across: "ok", "timeout" or the error's name."""
    with loader.in_netns(dst_ns):
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((dst_ip, PORT))
        srv.listen(4)
        srv.settimeout(timeout)
        with loader.in_netns(src_ns):
            cli = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with cli:
            cli.settimeout(timeout)
            try:
                cli.connect((dst_ip, PORT))
            except TimeoutError:
                return "timeout"
            except OSError as exc:
                return type(exc).__name__
            conn, _ = srv.accept()
            with conn:
                cli.sendall(b"ping")
                conn.settimeout(timeout)
                return "ok" if conn.recv(4) == b"ping" else "short read"


async def _until(check: Callable[[], Awaitable[bool]], *, within: float, message: str) -> None:
    """Await ``check`` until it is true, or fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} within {within}s")
        await asyncio.sleep(0.1)


def _sync(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    """``check`` as an awaitable for ``_until``."""

    async def run() -> bool:
        return check()

    return run


async def _connects(c: Cluster, src: str, dst_ip: str, *, within: float = 20.0) -> None:
    """Poll until a connect from pod ``src`` to db succeeds (each try bounded by 1 s)."""
    src_ns, dst_ns = c.topo.netns[src], c.topo.netns["db"]
    await _until(
        lambda: _try(src_ns, dst_ns, dst_ip), within=within, message=f"{src} -> db:{PORT} connects"
    )


async def _try(src_ns: str, dst_ns: str, dst_ip: str) -> bool:
    return await asyncio.to_thread(_connect, src_ns, dst_ns, dst_ip, 1.0) == "ok"


def _routes(netns: str) -> set[str]:
    out = json.loads(ip("-n", netns, "-j", "-4", "route", "show", "proto", str(RTPROT_CP)))
    return {f"{r['dst']} via {r['gateway']}" for r in out}


async def _pings(c: Cluster, src: str, dst_ip: str, *, within: float = 20.0) -> None:
    """Poll until an echo from pod ``src`` to ``dst_ip`` is answered (each try bounded by 1 s)."""
    src_ns = c.topo.netns[src]

    async def answered() -> bool:
        return await asyncio.to_thread(ping, src_ns, dst_ip, 1.0)

    await _until(answered, within=within, message=f"{src} -> {dst_ip} echo answered")


@dataclass
class _Pinger:
    """Echo requests every ``interval`` seconds from one raw socket (own id, seq 1, 2, ...);
    ``run`` (in a worker thread) sends until ``stop`` is set, then waits up to ``drain``
    seconds for the replies still outstanding."""

    sock: socket.socket
    dst_ip: str
    interval: float = 0.02
    drain: float = 1.0
    ident: int = field(default_factory=lambda: secrets.randbelow(0x10000))
    sent: int = 0
    answered: set[int] = field(default_factory=set)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with self.sock:
            next_send = time.monotonic()
            drain_until: float | None = None
            while True:
                now = time.monotonic()
                if drain_until is None and self.stop.is_set():
                    drain_until = now + self.drain
                if drain_until is None:
                    if now >= next_send:
                        self.sent += 1
                        packet = echo_request(self.ident, self.sent & 0xFFFF)
                        self.sock.sendto(packet, (self.dst_ip, 0))
                        next_send += self.interval
                    wake = next_send
                elif now >= drain_until or len(self.answered) >= self.sent:
                    return
                else:
                    wake = drain_until
                ready, _, _ = select.select([self.sock], [], [], max(0.0, wake - now))
                if ready:
                    seq = echo_reply(self.sock.recv(65535), self.dst_ip, self.ident)
                    if seq is not None:
                        self.answered.add(seq)


async def _bring_up(c: Cluster) -> tuple[Agent, Agent, dict[str, str]]:
    """Start both agents, wait for the cross-node routes, ADD every pod: (n1, n2, pod IPs)."""
    n1, n2 = await c.start("node1"), await c.start("node2")
    await asyncio.wait_for(asyncio.gather(n1.wait_ready(), n2.wait_ready()), 20)
    assert n1.cidr is not None and n2.cidr is not None

    # each node routes the other's pod CIDR via the other's node IP, in its own netns
    await eventually(
        lambda: _routes(c.topo.netns["node1"]) == {f"{n2.cidr} via {NODE_IPS['node2']}"},
        message="node1 route to node2's pod CIDR",
    )
    await eventually(
        lambda: _routes(c.topo.netns["node2"]) == {f"{n1.cidr} via {NODE_IPS['node1']}"},
        message="node2 route to node1's pod CIDR",
    )
    status, st = await api(n1, "GET", "/v1/status")
    assert status == 200 and st["routes"]["enabled"] and st["routes"]["error"] is None

    # pods through the plugin, labels from CNI_ARGS
    ips: dict[str, str] = {}
    cidrs = {"node1": n1.cidr, "node2": n2.cidr}
    for pod, (node, _) in c.topo.pods.items():
        ran = await c.cni("ADD", pod)
        assert ran.rc == 0, ran
        ips[pod] = ran.out["ips"][0]["address"].split("/")[0]
        assert ip_network(f"{ips[pod]}/32").subnet_of(cidrs[node])  # type: ignore[arg-type]
    return n1, n2, ips


async def test_two_nodes_policy_restart_and_del(cluster: Cluster) -> None:
    c = cluster
    n1, n2, ips = await _bring_up(c)
    db_ip = ips["db"]

    # no policy yet: default allow, across the two nodes
    await _connects(c, "web", db_ip)
    await _connects(c, "other", db_ip)

    # db allows app=web on TCP 5432
    async with ShardMap(kv_config(c.etcd), own_connection=True) as shards:
        store = KvPolicyStore(shards, LAYOUT, StoreMetrics.create())
        await store.put(_policy("app=web"))
        status, db_ep = await api(n2, "GET", "/v1/endpoints/default/db")
        assert status == 200, db_ep
        _, web_ep = await api(n1, "GET", "/v1/endpoints/default/web")
        _, other_ep = await api(n1, "GET", "/v1/endpoints/default/other")
        ep = db_ep["endpoint_id"]

        def allowed() -> set[tuple[int, int, int]]:
            return {(r.identity, r.port, r.proto) for r in n2.policy_maps.rows(ep) if r.allow}

        await eventually(
            lambda: allowed() == {(web_ep["identity"], PORT, TCP)},
            message="db's policy map holds web on 5432",
        )
        await _connects(c, "web", db_ip)
        drops = await asyncio.to_thread(_exported_drops, n2)
        got = await asyncio.to_thread(
            _connect, c.topo.netns["other"], c.topo.netns["db"], db_ip, 2.0
        )
        assert got == "timeout"

        async def dropped() -> bool:
            return await asyncio.to_thread(_exported_drops, n2) > drops

        await _until(
            dropped, within=10, message="the agent's exported policy-deny drop counter rises"
        )

        # edit the policy: app=other allowed too, no agent restart
        await store.put(_policy("app=web", "app=other"))
        await eventually(
            lambda: (
                allowed() == {(web_ep["identity"], PORT, TCP), (other_ep["identity"], PORT, TCP)}
            ),
            message="db's policy map holds other too",
        )
        await _connects(c, "other", db_ip)

    # node2's agent dies: the pinned maps and the attached program keep enforcing
    before_rows = set(n2.policy_maps.rows(ep))
    before_ipcache = set(n2.ipcache.dump())
    await c.kill("node2")
    await _connects(c, "web", db_ip)
    await _connects(c, "other", db_ip)

    # ... and starts again: it adopts the maps without emptying them
    n2 = await c.start("node2")
    samples = 0

    def intact() -> bool:
        nonlocal samples
        samples += 1
        rows = set(n2.policy_maps.rows(ep))
        assert rows >= before_rows, f"policy map lost entries: {before_rows - rows}"
        lost = before_ipcache - set(n2.ipcache.dump())
        assert not lost, f"ipcache lost entries during the restart: {lost}"
        return n2.ready and n2.policy_computes > 0 and n2.routes_synced > 0

    await eventually(intact, interval=0.01, message="node2 agent restarted and synced")
    assert samples > 1
    assert set(n2.policy_maps.rows(ep)) == before_rows
    await _connects(c, "web", db_ip)
    await _connects(c, "other", db_ip)
    assert _routes(c.topo.netns["node2"]) == {f"{n1.cidr} via {NODE_IPS['node1']}"}

    # DEL every pod, twice each
    for pod in PODS:
        for _ in range(2):
            ran = await c.cni("DEL", pod)
            assert ran.rc == 0 and ran.out is None, (pod, ran)
    for agent in (n1, n2):
        status, listed = await api(agent, "GET", "/v1/endpoints")
        assert status == 200 and listed == []


async def test_icmp_follows_policy_and_survives_agent_restart(cluster: Cluster) -> None:
    c = cluster
    n1, n2, ips = await _bring_up(c)
    db_ip = ips["db"]
    await _pings(c, "web", db_ip)  # no policy yet: default allow
    await _pings(c, "other", db_ip)

    async with ShardMap(kv_config(c.etcd), own_connection=True) as shards:
        store = KvPolicyStore(shards, LAYOUT, StoreMetrics.create())
        status, db_ep = await api(n2, "GET", "/v1/endpoints/default/db")
        assert status == 200, db_ep
        _, web_ep = await api(n1, "GET", "/v1/endpoints/default/web")
        ep, web_id = db_ep["endpoint_id"], web_ep["identity"]

        def allowed() -> set[tuple[int, int, int]]:
            return {(r.identity, r.port, r.proto) for r in n2.policy_maps.rows(ep) if r.allow}

        # db allows app=web on TCP 5432 only: web's echo is dropped, and counted
        await store.put(_policy("app=web"))
        await eventually(
            lambda: allowed() == {(web_id, PORT, TCP)}, message="db's policy map holds web on 5432"
        )
        await _connects(c, "web", db_ip)
        drops = await asyncio.to_thread(_drops, c.topo.pin_dirs["node2"])
        assert not await asyncio.to_thread(ping, c.topo.netns["web"], db_ip, 1.0)

        async def dropped() -> bool:
            return await asyncio.to_thread(_drops, c.topo.pin_dirs["node2"]) > drops

        await _until(dropped, within=10, message="the policy-deny drop counter rises")

        # an ICMP rule for app=web: web's echo is answered, other's is not
        await store.put(
            NetworkPolicy.from_dict(
                {
                    "name": "db",
                    "namespace": "default",
                    "endpoint_selector": ["app=db"],
                    "ingress": [
                        {"from_selector": ["app=web"], "ports": [{"port": PORT, "proto": "TCP"}]},
                        {"from_selector": ["app=web"], "ports": [{"port": 0, "proto": "ICMP"}]},
                    ],
                }
            )
        )
        await eventually(
            lambda: allowed() == {(web_id, PORT, TCP), (web_id, 0, ICMP)},
            message="db's policy map holds web on ICMP",
        )
        await _pings(c, "web", db_ip)
        assert not await asyncio.to_thread(ping, c.topo.netns["other"], db_ip, 1.0)

    # a continuous ping from web loses nothing while node2's agent dies and starts again
    pinger = _Pinger(await asyncio.to_thread(raw_icmp, c.topo.netns["web"]), db_ip)
    task = asyncio.create_task(asyncio.to_thread(pinger.run), name="e2e-pinger")
    try:
        await _until(
            _sync(lambda: len(pinger.answered) >= 5), within=10, message="continuous ping warm"
        )
        before_kill = pinger.sent
        await c.kill("node2")
        n2 = await c.start("node2")
        await eventually(
            lambda: n2.ready and n2.policy_computes > 0 and n2.routes_synced > 0,
            interval=0.01,
            message="node2 agent restarted and synced",
        )
        after_start = pinger.sent
        await _until(
            _sync(lambda: pinger.sent >= after_start + 25),
            within=10,
            message="continuous ping ran on after the restart",
        )
    finally:
        pinger.stop.set()
        await task
    assert after_start > before_kill, "no echo was sent during the restart"
    lost = sorted(set(range(1, pinger.sent + 1)) - pinger.answered)
    assert not lost, f"{len(lost)}/{pinger.sent} echoes lost across the restart: {lost[:20]}"
    assert set(allowed()) == {(web_id, PORT, TCP), (web_id, 0, ICMP)}
    await _pings(c, "web", db_ip)
    assert not await asyncio.to_thread(ping, c.topo.netns["other"], db_ip, 1.0)
