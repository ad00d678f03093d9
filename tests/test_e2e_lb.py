"""End to end: service load balancing on two nodes, real sockets through the socket LB.

Topology (``tests/test_e2e_datapath.py``'s two node namespaces, agents in kernel mode)::

    client, b1 (pods) --veth-- node1 ==veth== node2 --veth-- b2, b3 (pods)

Each node's agent attaches the socket load balancer (``bpf/cp_sock_lb.c``) to a cgroup of
its own (``--lb-cgroup``), created by the test; the client runs as a process in its pod's
network namespace and moves itself into node1's cgroup, as a pod's processes live under
the node's pod cgroup. Backends b1..b3 are ``tests/lb_traffic.py serve`` processes that
answer TCP connections and UDP datagrams with their name on port 8080, so every
connection to the VIP says which backend it reached.

Needs root, clang, libbpf, ``ip``, ``nsenter`` and a cgroup v2 mount.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from controlplane.agent.agent import Agent
from controlplane.agent.api import request
from controlplane.apiserver import KubeServer, KubeServerSettings
from controlplane.cli.main import build_parser
from controlplane.config import CrdConfig
from controlplane.crd.client import KubeClient
from controlplane.crd.install import install_crds
from controlplane.crd.ipam import CrdCIDRStore
from controlplane.crd.kubeconfig import load_connection
from controlplane.crd.policies import CrdPolicyStore
from controlplane.crd.resources import NODES
from controlplane.crd.services import CrdServiceStore
from controlplane.datapath.lbmap import FrontendAddr
from controlplane.datapath.sock_lb import cgroup2_mount
from controlplane.ipam.cidr import ClusterPoolAllocator
from controlplane.kvstore.embedded import EmbeddedEtcd
from controlplane.kvstore.keys import KeyLayout
from controlplane.kvstore.policies import KvPolicyStore
from controlplane.kvstore.services import KvServiceStore
from controlplane.kvstore.shards import ShardMap
from controlplane.metrics import StoreMetrics
from controlplane.model import NetworkPolicy, NodeName, Service
from controlplane.processes import Daemon
from controlplane.store import PolicyStore, ServiceStore
from tests.helpers import eventually, kernel_tests_unmet, missing_tool, requires
from tests.test_agent import POOL, kv_config
from tests.test_e2e_datapath import (
    NODE_IPS,
    Cluster,
    Topology,
    _bring_up,
    _drops,
    build_topology,
    running_cluster,
)

pytestmark = requires(
    kernel_tests_unmet("ip", "nsenter")
    or (
        missing_tool("no cgroup v2 mount (the socket LB hangs on one)")
        if cgroup2_mount() is None
        else None
    )
)

LB_PODS = {
    "client": ("node1", "app=client"),
    "b1": ("node1", "app=b1"),
    "b2": ("node2", "app=b2"),
    "b3": ("node2", "app=b3"),
}
VIP = "10.96.0.10"
EMPTY_VIP = "10.96.0.20"
HTTP, DNS, BACKEND_PORT = 80, 53, 8080
TCP, UDP = 6, 17
TRAFFIC = Path(__file__).resolve().parent / "lb_traffic.py"
LAYOUT = KeyLayout()


@dataclass
class Lb:
    cluster: Cluster
    n1: Agent
    n2: Agent
    ips: dict[str, str]
    cgroups: dict[str, Path]
    services: ServiceStore
    policies: PolicyStore
    store_args: list[str]
    """cpctl's and cp-agent's flags for the store (kvstore endpoints or a kubeconfig)."""
    mode: str = "kvstore"

    def backends(self, vip: str = VIP, port: int = HTTP, proto: int = TCP) -> list[str] | None:
        """node1's current backend set of a frontend (the client's node), as pod names."""
        by_ip = {ip: pod for pod, ip in self.ips.items()}
        want = FrontendAddr(IPv4Address(vip), port, proto)
        for entry in self.n1.lb_maps.entries():
            if entry.frontend == want:
                return sorted(by_ip.get(str(b.ip), str(b.ip)) if b else "?" for b in entry.backends)
        return None


def web(lb: Lb, *pods: str) -> Service:
    """The service under test: http (TCP 80) and dns (UDP 53) on VIP, served by ``pods``."""
    return Service.from_dict({
        "namespace": "default",
        "name": "web",
        "cluster_ip": VIP,
        "frontends": [{"port": HTTP, "protocol": "TCP", "name": "http"},
                      {"port": DNS, "protocol": "UDP", "name": "dns"}],
        "backends": [{"ip": lb.ips[pod], "port": BACKEND_PORT, "node": LB_PODS[pod][0],
                      "frontend": frontend}
                     for pod in pods for frontend in ("http", "dns")],
    })  # fmt: skip


async def programmed(lb: Lb, *pods: str) -> None:
    want = sorted(pods)
    await eventually(
        lambda: lb.backends() == want and lb.backends(port=DNS, proto=UDP) == want,
        timeout=10,
        message=f"node1's LB maps hold backends {want}",
    )


@dataclass
class Traffic:
    """A running ``lb_traffic.py client`` and the attempts it reported so far."""

    proc: asyncio.subprocess.Process
    results: list[tuple[float, str, str, float]] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    async def read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            t, outcome, peer, took = json.loads(line)
            self.results.append((t, outcome, peer, took))

    async def finish(self, timeout: float = 30) -> list[tuple[float, str, str, float]]:
        """Close its stdin (a client without --count stops), wait for its last line."""
        assert self.proc.stdin is not None and self.reader is not None
        self.proc.stdin.close()
        await asyncio.wait_for(self.reader, timeout)
        assert self.proc.stderr is not None
        err = await self.proc.stderr.read()
        assert await self.proc.wait() == 0, err.decode()
        return self.results

    def outcomes(self, since: float = 0.0) -> Counter[str]:
        return Counter(outcome for t, outcome, _, _ in self.results if t >= since)


async def start_client(lb: Lb, port: int, proto: str = "tcp", **options: Any) -> Traffic:
    argv = [
        "nsenter", f"--net=/run/netns/{lb.cluster.topo.netns['client']}",
        sys.executable, str(TRAFFIC), "client", VIP if "vip" not in options else options.pop("vip"),
        str(port), "--proto", proto, "--cgroup", str(lb.cgroups["node1"]),
    ]  # fmt: skip
    for key, value in options.items():
        argv += [f"--{key}", str(value)]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    traffic = Traffic(proc)
    traffic.reader = asyncio.create_task(traffic.read(), name="lb-client-reader")
    return traffic


async def attempts(lb: Lb, port: int, proto: str, count: int, **options: Any) -> Traffic:
    """``count`` attempts, one new socket each; returns once all are reported."""
    traffic = await start_client(lb, port, proto, count=count, **options)
    await traffic.finish()
    assert len(traffic.results) == count
    return traffic


async def cpctl(lb: Lb, *argv: str) -> int:
    """``cpctl ARGV`` in this process (its real parser) against the test's store."""
    args = build_parser().parse_args([*argv, *lb.store_args])
    status: int = await args.run(args)
    return status


def counter(agent: Agent, frontend: str, result: str, service: str = "default/web") -> float:
    labels = {"service": service, "frontend": frontend, "result": result}
    return agent.metrics.registry.get_sample_value("cp_service_connections_total", labels) or 0.0


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def lb_topology() -> Iterator[tuple[Topology, dict[str, Path]]]:
    root = cgroup2_mount()
    assert root is not None
    tok = secrets.token_hex(3)
    cgroups = {node: root / f"cp-e2e-lb-{tok}-{node}" for node in ("node1", "node2")}
    try:
        for path in cgroups.values():
            path.mkdir()
        with build_topology(LB_PODS) as topo:  # its teardown unpins the links: detached
            yield topo, cgroups
    finally:
        for path in cgroups.values():
            with contextlib.suppress(FileNotFoundError):
                path.rmdir()


@contextlib.asynccontextmanager
async def mode_stores(
    mode: str, etcd: EmbeddedEtcd, tmp_path: Path
) -> AsyncIterator[tuple[CrdConfig | None, ServiceStore, PolicyStore, list[str]]]:
    """The agents' config, the service and policy stores the tests write, cpctl's flags:
    kvstore mode on ``etcd``, or CRD mode on a local API server on it (the nodes' CIDRs
    given as the operator would, services as Kubernetes Services and EndpointSlices)."""
    metrics = StoreMetrics.create()
    if mode == "kvstore":
        async with ShardMap(kv_config(etcd), own_connection=True) as shards:
            yield (
                None,
                KvServiceStore(shards, LAYOUT, metrics),
                KvPolicyStore(shards, LAYOUT, metrics),
                ["--kvstore-endpoints", ",".join(etcd.client_urls)],
            )
        return
    settings = KubeServerSettings(
        data_dir=tmp_path / "kube", etcd_endpoints=tuple(etcd.client_urls), bookmark_interval=0.5
    )
    async with (
        KubeServer(settings) as server,
        KubeClient(load_connection(str(server.kubeconfig))) as client,
    ):
        await install_crds(client)
        allocator = ClusterPoolAllocator(CrdCIDRStore(client, metrics), POOL)
        for node in NODE_IPS:
            cidr = await allocator.allocate(NodeName(node))
            # and the operator's Node.spec.podCIDRs, which the agents route by (they add
            # their addresses to the object with a merge patch)
            node_object = {"metadata": {"name": node}, "spec": {"podCIDRs": [str(cidr)]}}
            await client.create(NODES, {"apiVersion": NODES.api_version, "kind": "Node",
                                        **node_object})  # fmt: skip
        config = CrdConfig(kubeconfig=str(server.kubeconfig), request_timeout=2.0)
        yield (
            config,
            CrdServiceStore(client, metrics),
            CrdPolicyStore(client, metrics),
            ["--store", "crd", "--kubeconfig", str(server.kubeconfig)],
        )


@pytest_asyncio.fixture(params=["kvstore", "crd"])
async def lb(
    request: pytest.FixtureRequest,
    etcd1: EmbeddedEtcd,
    tmp_path: Path,
    lb_topology: tuple[Topology, dict[str, Path]],
) -> AsyncIterator[Lb]:
    topo, cgroups = lb_topology
    servers: list[asyncio.subprocess.Process] = []
    mode: str = request.param
    async with (
        mode_stores(mode, etcd1, tmp_path) as (config, services, policies, store_args),
        running_cluster(etcd1, tmp_path, topo, config, lb_cgroup=lambda node: cgroups[node]) as c,
    ):
        try:
            n1, n2, ips = await _bring_up(c)
            for agent in (n1, n2):
                assert agent.sock_lb.attached, agent.sock_lb.detail
            for pod in ("b1", "b2", "b3"):
                proc = await asyncio.create_subprocess_exec(
                    "nsenter", f"--net=/run/netns/{topo.netns[pod]}", sys.executable,
                    str(TRAFFIC), "serve", pod, str(BACKEND_PORT),
                    stdout=asyncio.subprocess.PIPE,
                )  # fmt: skip
                servers.append(proc)
                assert proc.stdout is not None
                line = await asyncio.wait_for(proc.stdout.readline(), 20)
                assert line == b"ready\n", f"backend {pod} did not start: {line!r}"
            yield Lb(c, n1, n2, ips, cgroups, services, policies, store_args, mode)
        finally:
            for proc in servers:
                proc.kill()
                await proc.wait()


# -- tests ------------------------------------------------------------------------------


async def test_vip_spreads_over_backends_on_both_nodes_tcp_and_udp(
    lb: Lb, capsys: pytest.CaptureFixture[str]
) -> None:
    await lb.services.put(web(lb, "b1", "b2"))
    await programmed(lb, "b1", "b2")
    # cpctl service list: each backend with the endpoint at its address
    assert await cpctl(lb, "service", "list", "--json") == 0
    [listed] = json.loads(capsys.readouterr().out)["services"]
    assert listed["backend_endpoints"] == {
        f"{lb.ips[pod]}:{BACKEND_PORT}": f"default/{pod}" for pod in ("b1", "b2")
    }

    tcp = await attempts(lb, HTTP, "tcp", 60)
    spread = tcp.outcomes()
    assert set(spread) == {"b1", "b2"} and min(spread.values()) >= 10, spread
    # the socket went to the backend itself: no NAT on the wire
    assert {peer for _, o, peer, _ in tcp.results} == {
        f"{lb.ips['b1']}:{BACKEND_PORT}",
        f"{lb.ips['b2']}:{BACKEND_PORT}",
    }

    udp = await attempts(lb, DNS, "udp", 60)
    spread = udp.outcomes()
    assert set(spread) == {"b1", "b2"} and min(spread.values()) >= 10, spread
    # replies come back from the VIP (recvmsg4's reverse translation)
    assert {peer for _, _, peer, _ in udp.results} == {f"{VIP}:{DNS}"}

    # per-frontend counters, on /metrics and in cpctl bpf lb list
    assert counter(lb.n1, f"{VIP}:{HTTP}/TCP", "connect") >= 60
    assert counter(lb.n1, f"{VIP}:{DNS}/UDP", "datagram") >= 60
    pin_dir = lb.cluster.topo.pin_dirs["node1"]
    args = build_parser().parse_args(["bpf", "lb", "list", "--pin-dir", str(pin_dir), "--json"])
    assert await args.run(args) == 0
    rows = {row["frontend"]: row for row in json.loads(capsys.readouterr().out)}
    http = rows[f"{VIP}:{HTTP}/TCP"]
    assert sorted(http["backends"]) == sorted(f"{lb.ips[p]}:{BACKEND_PORT}" for p in ("b1", "b2"))
    assert http["counters"]["connects"] >= 60 and http["counters"]["refused"] == 0


@pytest.mark.parametrize(("port", "proto"), [(HTTP, "tcp"), (DNS, "udp")])
async def test_scaling_changes_new_connections_within_a_second(
    lb: Lb, port: int, proto: str
) -> None:
    await lb.services.put(web(lb, "b1", "b2"))
    await programmed(lb, "b1", "b2")
    traffic = await start_client(lb, port, proto, interval=0.005)
    try:
        await eventually(lambda: traffic.outcomes()["b1"] > 0, message="client connecting")
        scaled_up = time.monotonic()
        await lb.services.put(web(lb, "b1", "b2", "b3"))
        await programmed(lb, "b1", "b2", "b3")
        await eventually(lambda: traffic.outcomes(scaled_up)["b3"] > 0, message="b3 reached")
        scaled_down = time.monotonic()
        await lb.services.put(web(lb, "b2", "b3"))
        await programmed(lb, "b2", "b3")
        await eventually(
            lambda: sum(traffic.outcomes(scaled_down + 1.0).values()) >= 50,
            message="client connections past the scale-down",
        )
    finally:
        results = await traffic.finish()
    first_b3 = min(t for t, outcome, _, _ in results if outcome == "b3")
    assert first_b3 - scaled_up < 1.0, f"b3 first reached {first_b3 - scaled_up:.3f}s after"
    late_b1 = [
        t - scaled_down for t, outcome, _, _ in results if outcome == "b1" and t > scaled_down
    ]
    assert not late_b1 or max(late_b1) < 1.0, f"b1 still reached {max(late_b1):.3f}s after removal"
    after = traffic.outcomes(scaled_down + 1.0)
    assert set(after) == {"b2", "b3"}, after  # every connection lands, on the new set
    errors = {o: n for o, n in traffic.outcomes().items() if o.startswith("E:")}
    assert not errors, f"connections failed while scaling: {errors}"


async def test_service_without_backends_is_refused_at_once(lb: Lb) -> None:
    empty = Service.from_dict({
        "namespace": "default",
        "name": "empty",
        "cluster_ip": EMPTY_VIP,
        "frontends": [{"port": HTTP, "protocol": "TCP", "name": "http"},
                      {"port": DNS, "protocol": "UDP", "name": "dns"}],
    })  # fmt: skip
    await lb.services.put(empty)
    await eventually(
        lambda: lb.backends(EMPTY_VIP) == [] and lb.backends(EMPTY_VIP, DNS, UDP) == [],
        message="node1 holds the empty frontends",
    )
    for port, proto in ((HTTP, "tcp"), (DNS, "udp")):
        traffic = await attempts(lb, port, proto, 5, vip=EMPTY_VIP, timeout=3)
        assert traffic.outcomes() == Counter({"E:ECONNREFUSED": 5}), traffic.results
        slowest = max(took for _, _, _, took in traffic.results)
        assert slowest < 0.5, f"a refusal took {slowest:.3f}s (not at once)"
    for frontend in (f"{EMPTY_VIP}:{HTTP}/TCP", f"{EMPTY_VIP}:{DNS}/UDP"):
        assert counter(lb.n1, frontend, "refused", "default/empty") == 5


def agent_process(lb: Lb, node: str, log: Path) -> Daemon:
    """``cp-agent`` for ``node`` as a process of its own, with the in-process agent's
    settings (same pins, cgroup, socket, routes namespace)."""
    s = lb.cluster.settings[node]
    assert s.lb_cgroup is not None
    return Daemon(
        f"agent-{node}",
        "controlplane.agent.main",
        [
            *lb.store_args,
            "--node-name", node, "--node-ip", str(s.node_ips[0]),
            "--api-socket", str(s.api_socket), "--metrics-address", "0",
            "--lease-ttl", str(s.lease_ttl), "--status-check-interval", "0.2",
            "--datapath", "kernel", "--bpf-pin-dir", str(s.bpf_pin_dir),
            "--routes", "--routes-netns", str(s.routes_netns), "--lb-cgroup", str(s.lb_cgroup),
        ],
        log,
    )  # fmt: skip


async def test_agents_sigkilled_and_restarted_while_a_client_connects(
    lb: Lb, tmp_path: Path
) -> None:
    c = lb.cluster
    await lb.services.put(web(lb, "b1", "b2"))
    await programmed(lb, "b1", "b2")
    before = lb.n1.lb_maps.entries()
    # node1 (the client's node) runs its agent as a real process, to SIGKILL it
    await c.kill("node1")
    daemon = agent_process(lb, "node1", tmp_path / "agent-node1.log")
    await daemon.start()
    try:

        async def daemon_synced() -> bool:
            try:
                _, st = await request(c.settings["node1"].api_socket, "GET", "/v1/status")
            except (OSError, TimeoutError):
                return False
            lb_state = st["datapath"]["socket_lb"]
            assert not st["ready"] or lb_state["attached"], lb_state
            return bool(st["ready"] and st["services"]["flushes"] > 0)

        await eventually(daemon_synced, message="cp-agent process for node1 ready")
        traffic = await start_client(lb, HTTP, "tcp", interval=0.005)
        try:
            await eventually(lambda: sum(traffic.outcomes().values()) >= 20, message="client warm")
            killed = time.monotonic()
            assert daemon.process is not None
            daemon.process.kill()  # SIGKILL: no cleanup of any kind
            await daemon.process.wait()
            await c.kill("node2")
            await eventually(
                lambda: sum(traffic.outcomes(killed).values()) >= 20,
                message="connections while no agent runs",
            )
            n1, n2 = await c.start("node1"), await c.start("node2")
            for agent in (n1, n2):
                assert agent.sock_lb.attached and "replaced" in agent.sock_lb.detail

            def intact() -> bool:
                assert n1.lb_maps.entries() == before, "the LB maps changed during the restart"
                return n1.ready and n1.services.synced_revision > 0

            await eventually(intact, interval=0.01, message="node1 agent restarted and synced")
            restarted = time.monotonic()
            await eventually(
                lambda: sum(traffic.outcomes(restarted).values()) >= 20,
                message="connections after the restart",
            )
        finally:
            results = await traffic.finish()
    finally:
        await daemon.stop()
    assert n1.lb_maps.stats.updates == 0 and n1.lb_maps.stats.deletes == 0  # adopted as is
    outcomes = Counter(outcome for _, outcome, _, _ in results)
    failed = {o: n for o, n in outcomes.items() if o not in ("b1", "b2")}
    assert not failed, f"{sum(failed.values())}/{len(results)} connections failed: {failed}"
    assert set(outcomes) == {"b1", "b2"}


async def test_policy_applies_to_the_backend_after_translation(lb: Lb) -> None:
    db = Service.from_dict({
        "namespace": "default",
        "name": "db",
        "cluster_ip": VIP,
        "frontends": [{"port": HTTP, "protocol": "TCP"}],
        "backends": [{"ip": lb.ips["b2"], "port": BACKEND_PORT}],
    })  # fmt: skip
    await lb.services.put(db)
    await eventually(lambda: lb.backends() == ["b2"], message="node1 holds db's backend")
    assert (await attempts(lb, HTTP, "tcp", 3)).outcomes() == Counter({"b2": 3})

    def policy(source: str) -> NetworkPolicy:
        return NetworkPolicy.from_dict({
            "name": "b2",
            "namespace": "default",
            "endpoint_selector": ["app=b2"],
            "ingress": [{"from_selector": [source],
                         "ports": [{"port": BACKEND_PORT, "proto": "TCP"}]}],
        })  # fmt: skip

    def enforced() -> Callable[[], bool]:
        return lambda: any(r.allow for r in lb.n2.policy_maps.rows())

    # b2 admits app=b1 only: the client's connections through the VIP are dropped at b2
    await lb.policies.put(policy("app=b1"))
    await eventually(enforced(), message="b2's policy programmed")
    drops = _drops(lb.cluster.topo.pin_dirs["node2"])
    denied = await attempts(lb, HTTP, "tcp", 2, timeout=1)
    assert denied.outcomes() == Counter({"E:timeout": 2}), denied.results
    assert _drops(lb.cluster.topo.pin_dirs["node2"]) > drops
    # ... and once it admits app=client, they pass
    await lb.policies.put(policy("app=client"))

    async def admitted() -> bool:
        return (await attempts(lb, HTTP, "tcp", 1, timeout=1)).outcomes() == Counter({"b2": 1})

    await eventually(admitted, message="client admitted through the VIP")
