"""cp-relay: two flow servers behind real gRPC listeners, the relay merging them.

- the node records name the peers (their published address); GetFlows merges both nodes'
  flows in time order, with node status first; ServerStatus sums, GetNodes lists;
- --follow streams both; a node that stops is reported NODE_UNAVAILABLE while the other's
  flows continue, and NODE_CONNECTED again when it is back (reconnect with backoff); a
  node whose record goes is NODE_GONE;
- a bad filter is INVALID_ARGUMENT from the relay;
- with a real etcd: agents publish their flow server's address in their node record, and
  the relay finds them there (the kvstore node watch); its metrics and health.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import grpc.aio
import pytest
from prometheus_client import CollectorRegistry

from controlplane.agent.agent import Agent
from controlplane.datapath.flowevents import decode_event
from controlplane.flows.client import ObserverClient
from controlplane.flows.observer import ObserverServer
from controlplane.flows.proto import flow_pb2 as pb
from controlplane.flows.proto import observer_pb2 as obs
from controlplane.flows.proto import relay_pb2 as rpb
from controlplane.flows.server import FlowServer, FlowSettings
from controlplane.kvstore.embedded import EmbeddedEtcd
from controlplane.model import Node, NodeName, parse_ip
from controlplane.relay.daemon import Relay, RelaySettings
from controlplane.relay.main import kvstore_nodes
from controlplane.relay.observer import MergeSettings
from controlplane.relay.peers import PeerSettings
from controlplane.store_types import EventKind, StoreEvent
from tests.helpers import eventually, running
from tests.test_agent import agent_settings, give_cidrs, kv_config
from tests.test_e2e_flows import CPCTL, ENV
from tests.test_flows_api import DB, RESOLVER, WEB, record

FAST_PEERS = PeerSettings(check_interval=0.2, backoff_min=0.05, backoff_max=0.3, timeout=1.0)
FAST_MERGE = MergeSettings(sort_buffer=100, drain_timeout=0.2)


class Agentish:
    """A flow server on a TCP port, as an agent with --flows-listen serves it."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.server = FlowServer(node, FlowSettings(capacity=1000), RESOLVER, CollectorRegistry())
        self.api = ObserverServer(self.server)
        self.port = 0

    async def start(self) -> None:
        self.api = ObserverServer(self.server)
        await self.api.start(listen=f"127.0.0.1:{self.port}")
        assert self.api.port is not None
        self.port = self.api.port

    def feed(self, *dports: int, at: list[int] | None = None) -> None:
        for i, port in enumerate(dports):
            raw = decode_event(record(WEB, DB, dport=port))
            if at is not None:
                raw = replace(raw, ktime_ns=at[i])
            self.server.ingest(raw)
        self.server.end_batch()


class Nodes:
    """A node watch fed by the test."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[StoreEvent[Node]] = asyncio.Queue()

    def put(self, name: str, address: str) -> None:
        node = Node(name=NodeName(name), ips=(parse_ip("127.0.0.1"),), flows_address=address)
        self.queue.put_nowait(StoreEvent(EventKind.UPSERT, name, node, 0))

    def delete(self, name: str) -> None:
        self.queue.put_nowait(StoreEvent(EventKind.DELETE, name, None, 0))

    async def watch(self) -> AsyncIterator[StoreEvent[Node]]:
        yield StoreEvent(EventKind.SYNCED, "", None, 0)
        while True:
            yield await self.queue.get()


@contextlib.asynccontextmanager
async def relay_of(
    nodes: Nodes, registry: CollectorRegistry | None = None
) -> AsyncIterator[tuple[Relay, ObserverClient]]:
    settings = RelaySettings(
        listen="127.0.0.1:0", peers=FAST_PEERS, merge=FAST_MERGE, metrics_port=0
    )
    relay = Relay(settings, nodes.watch, registry or CollectorRegistry())
    async with running(relay, name="test-relay"):
        assert relay.observer.port is not None
        client = ObserverClient(f"127.0.0.1:{relay.observer.port}")
        try:
            yield relay, client
        finally:
            await client.close()


@pytest.fixture
async def two() -> AsyncIterator[tuple[Agentish, Agentish, Nodes]]:
    a, b = Agentish("node-a"), Agentish("node-b")
    await a.start()
    await b.start()
    nodes = Nodes()
    nodes.put("node-a", f"127.0.0.1:{a.port}")
    nodes.put("node-b", f"127.0.0.1:{b.port}")
    try:
        yield a, b, nodes
    finally:
        await a.api.close()
        await b.api.close()


def _connected(relay: Relay, *names: str) -> bool:
    return {p.name for p in relay.peers.connected()} == set(names)


async def test_merge_in_time_order_status_and_nodes(two: tuple[Agentish, Agentish, Nodes]) -> None:
    a, b, nodes = two
    base = time.monotonic_ns()
    a.feed(1, 3, 5, at=[base + 1_000_000, base + 3_000_000, base + 5_000_000])
    b.feed(2, 4, 6, at=[base + 2_000_000, base + 4_000_000, base + 6_000_000])
    async with relay_of(nodes) as (relay, client):
        await eventually(lambda: _connected(relay, "node-a", "node-b"), message="both connected")
        got = [r async for r in client.get_flows(obs.GetFlowsRequest(), timeout=10)]
        status = got[0].node_status
        assert status.state_change == rpb.NODE_CONNECTED
        assert sorted(status.node_names) == ["node-a", "node-b"]
        flows = [r.flow for r in got if r.HasField("flow")]
        assert [f.l4.TCP.destination_port for f in flows] == [1, 2, 3, 4, 5, 6]
        assert [f.node_name for f in flows] == ["node-a", "node-b"] * 3
        last = [r async for r in client.get_flows(obs.GetFlowsRequest(number=2), timeout=10)]
        assert [r.flow.l4.TCP.destination_port for r in last if r.HasField("flow")] == [5, 6]

        status_all = await client.server_status()
        assert status_all.num_flows == 6 and status_all.max_flows == 2000
        assert status_all.num_connected_nodes.value == 2
        assert status_all.num_unavailable_nodes.value == 0
        listed = await client.get_nodes()
        assert [(n.name, n.state, n.num_flows) for n in listed.nodes] == [
            ("node-a", rpb.NODE_CONNECTED, 3), ("node-b", rpb.NODE_CONNECTED, 3),
        ]  # fmt: skip
        assert listed.nodes[0].address == f"127.0.0.1:{a.port}"

        server = f"127.0.0.1:{relay.observer.port}"
        ran = await asyncio.to_thread(
            subprocess.run, [*CPCTL, "observe", "nodes", "--server", server, "--json"],
            capture_output=True, text=True, env=ENV, check=False,
        )  # fmt: skip
        assert ran.returncode == 0, ran.stderr
        assert [n["state"] for n in json.loads(ran.stdout)] == ["NODE_CONNECTED"] * 2
        ran = await asyncio.to_thread(
            subprocess.run, [*CPCTL, "observe", "--server", server, "--last", "2"],
            capture_output=True, text=True, env=ENV, check=False,
        )  # fmt: skip
        lines = ran.stdout.splitlines()
        assert lines[0] == "NODE STATUS: NODE_CONNECTED node-a, node-b", ran.stdout
        assert "[node-a]" in lines[1] and "[node-b]" in lines[2] and len(lines) == 3

        with pytest.raises(grpc.aio.AioRpcError) as info:
            bad = obs.GetFlowsRequest(whitelist=[pb.FlowFilter(protocol=["nope"])])
            [r async for r in client.get_flows(bad, timeout=10)]
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_follow_with_a_node_going_away_and_back(
    two: tuple[Agentish, Agentish, Nodes],
) -> None:
    a, b, nodes = two
    registry = CollectorRegistry()
    async with relay_of(nodes, registry) as (relay, client):
        await eventually(lambda: _connected(relay, "node-a", "node-b"), message="both connected")
        seen: list[obs.GetFlowsResponse] = []

        async def read() -> None:
            async for r in client.get_flows(obs.GetFlowsRequest(follow=True)):
                seen.append(r)

        reader = asyncio.create_task(read())
        try:
            await eventually(lambda: relay.observer.streams == 1, message="the follower")
            await eventually(
                lambda: a.server.readers == 1 and b.server.readers == 1,
                message="the relay streams from both nodes",
            )
            a.feed(10)
            b.feed(20)

            def ports() -> list[int]:
                return [r.flow.l4.TCP.destination_port for r in seen if r.HasField("flow")]

            await eventually(lambda: sorted(ports()) == [10, 20], message="both nodes' flows")

            def states(name: str) -> list[int]:
                return [
                    r.node_status.state_change for r in seen
                    if r.HasField("node_status") and name in r.node_status.node_names
                ]  # fmt: skip

            # node-a stops: reported unavailable, node-b's flows keep coming
            await a.api.close()
            await eventually(
                lambda: states("node-a")[-1:] == [rpb.NODE_UNAVAILABLE],
                message="node-a unavailable in the stream",
            )
            b.feed(21)
            await eventually(lambda: 21 in ports(), message="node-b's flows go on")
            status = await client.server_status()
            assert list(status.unavailable_nodes) == ["node-a"]

            # node-a is back on its port: connected again (backoff retries), streamed again
            await a.start()
            await eventually(
                lambda: states("node-a")[-1:] == [rpb.NODE_CONNECTED],
                message="node-a connected again",
            )
            await eventually(lambda: a.server.readers == 1, message="the relay streams node-a")
            a.feed(11)
            await eventually(lambda: 11 in ports(), message="node-a's new flows")

            # node-b's record goes: NODE_GONE
            nodes.delete("node-b")
            await eventually(
                lambda: states("node-b")[-1:] == [rpb.NODE_GONE], message="node-b gone"
            )
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        unavailable = registry.get_sample_value(
            "cp_relay_node_state_changes_total", {"state": "NODE_UNAVAILABLE"}
        )
        assert unavailable is not None and unavailable >= 1
        assert registry.get_sample_value("cp_relay_nodes", {"state": "NODE_CONNECTED"}) == 1


async def test_relay_finds_agents_in_the_kvstore(etcd1: EmbeddedEtcd, tmp_path: Path) -> None:
    """Agents with --flows-listen publish their Observer API's address in their node record;
    the relay's kvstore node watch finds them and merges their flows."""
    await give_cidrs(etcd1, "node-a", "node-b")
    agents = [
        Agent(agent_settings(tmp_path, n, ip, flows_listen="127.0.0.1:0"), kv_config(etcd1))
        for n, ip in (("node-a", "127.0.0.21"), ("node-b", "127.0.0.22"))
    ]
    async with running(agents[0]), running(agents[1]):
        await asyncio.wait_for(asyncio.gather(*(ag.wait_ready() for ag in agents)), 20)
        for ag in agents:
            assert ag.flows_address().startswith("127.0.0.1:")
        settings = RelaySettings(
            listen="127.0.0.1:0", peers=FAST_PEERS, merge=FAST_MERGE, metrics_port=0
        )
        relay = Relay(settings, lambda: kvstore_nodes(kv_config(etcd1), "default"),
                      CollectorRegistry())  # fmt: skip
        async with running(relay, name="test-relay"):
            await eventually(lambda: _connected(relay, "node-a", "node-b"), message="connected")
            addresses = {p.name: p.address for p in relay.peers.peers.values()}
            assert addresses == {ag.settings.node: ag.flows_address() for ag in agents}
            assert relay.health()["nodes"].ok and relay.health()["store"].ok
            for i, ag in enumerate(agents):
                assert ag.flows is not None
                ag.flows.server.ingest(decode_event(record(WEB, DB, dport=100 + i)))
                ag.flows.server.end_batch()
            async with ObserverClient(f"127.0.0.1:{relay.observer.port}") as client:
                got = [r async for r in client.get_flows(obs.GetFlowsRequest(), timeout=10)]
            flows = sorted((r.flow.node_name, r.flow.l4.TCP.destination_port)
                           for r in got if r.HasField("flow"))  # fmt: skip
            assert flows == [("node-a", 100), ("node-b", 101)]


def test_manifests_use_real_flags() -> None:
    """The relay's Deployment and the agent DaemonSet's flow flags parse as the daemons'."""
    import yaml

    from controlplane.agent.settings import build_parser as agent_parser
    from controlplane.agent.settings import settings_from_args
    from controlplane.relay.main import build_parser as relay_parser

    repo = Path(__file__).resolve().parents[1]
    docs = {d["kind"]: d for d in yaml.safe_load_all((repo / "relay/deployment.yaml").read_text())}
    (relay,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    args = relay_parser().parse_args(relay["args"])
    assert args.listen == ("0.0.0.0", 4245) and args.peer_port == 4244
    assert args.store == "crd" and args.ui_listen == ("0.0.0.0", 12000)
    assert docs["Service"]["spec"]["ports"][0]["port"] == 4245
    account = docs["Deployment"]["spec"]["template"]["spec"]["serviceAccountName"]
    assert account == docs["ServiceAccount"]["metadata"]["name"] == "cp-relay"
    (rule,) = docs["ClusterRole"]["rules"]
    assert rule == {
        "apiGroups": ["controlplane.io"],
        "resources": ["nodes"],
        "verbs": ["get", "list", "watch"],
    }
    ds = yaml.safe_load((repo / "agent/daemonset.yaml").read_text())
    agent = next(c for c in ds["spec"]["template"]["spec"]["containers"] if c["name"] == "agent")
    argv = [
        a.replace("$(NODE_NAME)", "n1").replace("$(NODE_IP)", "10.0.0.7") for a in agent["args"]
    ]
    settings = settings_from_args(agent_parser().parse_args(argv))
    assert settings.flows_listen == "10.0.0.7:4244"
    assert str(settings.flows_socket) == "/var/run/cp/observer.sock"


async def test_relay_finds_agents_in_crd_mode(etcd1: EmbeddedEtcd, tmp_path: Path) -> None:
    """CRD mode: the agents publish spec.flowsAddress in their Node objects and the relay's
    CRD node watch (the read-only CrdNodeStore) finds them."""
    from controlplane.relay.main import node_watch
    from tests.test_agent_crd import POOL, ApiServer
    from tests.test_agent_crd import give_cidrs as give_crd_cidrs

    server = ApiServer(etcd1, tmp_path / "kube")
    await server.start()
    try:
        from controlplane.crd.install import install_crds

        async with server.client() as client:
            await install_crds(client)
        await give_crd_cidrs(server, "node-a", "node-b")
        agents = [
            Agent(
                agent_settings(tmp_path, n, ip, pool=POOL.name, flows_listen="127.0.0.1:0"),
                server.config(),
            )
            for n, ip in (("node-a", "127.0.0.31"), ("node-b", "127.0.0.32"))
        ]
        async with running(agents[0]), running(agents[1]):
            await asyncio.wait_for(asyncio.gather(*(ag.wait_ready() for ag in agents)), 30)
            settings = RelaySettings(
                listen="127.0.0.1:0", peers=FAST_PEERS, merge=FAST_MERGE, metrics_port=0
            )
            relay = Relay(settings, node_watch(server.config(), "default"), CollectorRegistry())
            async with running(relay, name="test-relay-crd"):
                await eventually(
                    lambda: _connected(relay, "node-a", "node-b"), message="connected (CRD)"
                )
                addresses = {p.name: p.address for p in relay.peers.peers.values()}
                assert addresses == {ag.settings.node: ag.flows_address() for ag in agents}
    finally:
        await server.stop()


async def test_tls_between_agent_relay_and_client(tmp_path: Path) -> None:
    """TLS end to end: the agent's flow server (its --flows-tls-cert/--flows-tls-key), the
    relay's peers verified by --peer-tls-ca, the relay's own listener (--tls-cert), a client
    verifying it; a client without the CA is refused."""
    from controlplane.agent.flows import AgentFlows
    from controlplane.agent.watches import AgentCache
    from tests.pki import make_test_pki

    pki = make_test_pki(tmp_path / "pki")
    ca = pki.ca_file.read_bytes()
    agent = AgentFlows(
        NodeName("node-a"), AgentCache(), FlowSettings(), CollectorRegistry(),
        kernel=False, pin_dir=tmp_path,
    )  # fmt: skip
    await agent.start(None, "127.0.0.1:0", (pki.server_cert, pki.server_key))
    try:
        assert agent.error is None and agent.api.port is not None
        agent.server.ingest(decode_event(record(WEB, DB, dport=443)))
        agent.server.end_batch()
        nodes = Nodes()
        nodes.put("node-a", f"127.0.0.1:{agent.api.port}")
        server_tls = grpc.ssl_server_credentials(
            [(pki.server_key.read_bytes(), pki.server_cert.read_bytes())]
        )
        settings = RelaySettings(
            listen="127.0.0.1:0",
            peers=replace(FAST_PEERS, credentials=grpc.ssl_channel_credentials(ca)),
            merge=FAST_MERGE,
            metrics_port=None,
            server_credentials=server_tls,
        )
        relay = Relay(settings, nodes.watch, CollectorRegistry())
        async with running(relay, name="test-relay-tls"):
            await eventually(lambda: _connected(relay, "node-a"), message="connected over TLS")
            target = f"127.0.0.1:{relay.observer.port}"
            creds = grpc.ssl_channel_credentials(ca)
            async with ObserverClient(target, credentials=creds) as client:
                got = [r async for r in client.get_flows(obs.GetFlowsRequest(), timeout=10)]
                nodes_seen = await client.get_nodes()
            assert [r.flow.l4.TCP.destination_port for r in got if r.HasField("flow")] == [443]
            assert nodes_seen.nodes[0].tls.enabled
            async with ObserverClient(target) as plain:  # no TLS: refused
                with pytest.raises(grpc.aio.AioRpcError):
                    await plain.server_status(timeout=2)
    finally:
        await agent.close()


def test_agent_tls_flags_go_together() -> None:
    from controlplane.agent.settings import build_parser as agent_parser
    from controlplane.agent.settings import settings_from_args
    from controlplane.config import ConfigError

    args = agent_parser().parse_args(["--node-name=n1", "--flows-tls-cert=/tmp/c.pem"])
    with pytest.raises(ConfigError, match="--flows-tls-cert and --flows-tls-key go together"):
        settings_from_args(args)
    args = agent_parser().parse_args(["--flows-tls-cert=/c", "--flows-tls-key=/k"])
    assert settings_from_args(args).flows_tls == (Path("/c"), Path("/k"))
