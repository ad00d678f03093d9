"""Flow observability end to end, on the two-node setup of tests/test_e2e_datapath.py: two
in-process agents with kernel datapaths, pods made by cp-cni, real TCP and ICMP between
network namespaces, and the real ``cpctl observe`` against each agent's Observer socket.

- an allowed TCP connection shows as FORWARDED flows both ways, on both nodes, with the
  pods, namespaces and identities of both sides (the remote pod named from the store);
- a denied one as DROPPED, reason POLICY_DENIED; a denied echo likewise (ICMPv4);
- ``--follow`` streams a new connection's flows as they happen;
- cp-relay finds both agents through their node records and merges both nodes' flows in
  time order; with one agent stopped it reports that node unavailable and the other
  node's flows go on;
- filters, outputs and ``cpctl observe status``; bad flags and an unreachable server are
  one line and a non-zero exit; the flow metrics on the agent's registry.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_asyncio
from prometheus_client import CollectorRegistry

from controlplane.agent.agent import Agent
from controlplane.agent.settings import DatapathMode
from controlplane.kvstore.embedded import EmbeddedEtcd
from controlplane.kvstore.policies import KvPolicyStore
from controlplane.kvstore.shards import ShardMap
from controlplane.metrics import StoreMetrics
from controlplane.relay.daemon import Relay, RelaySettings
from controlplane.relay.main import kvstore_nodes
from controlplane.relay.observer import MergeSettings
from controlplane.relay.peers import PeerSettings
from tests.helpers import eventually, kernel_tests_unmet, requires, running
from tests.icmp_echo import ping
from tests.test_agent import agent_settings, api, give_cidrs, kv_config
from tests.test_e2e_datapath import (
    LAYOUT,
    NODE_IPS,
    PORT,
    Cluster,
    Topology,
    _bring_up,
    _connect,
    _policy,
    topology,
)

pytestmark = requires(kernel_tests_unmet("ip", "nsenter"))
__all__ = ["topology"]  # the fixture, imported

CPCTL = [sys.executable, "-m", "controlplane.cli.main"]
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


@pytest_asyncio.fixture
async def cluster(
    etcd1: EmbeddedEtcd, tmp_path: Path, topology: Topology
) -> AsyncIterator[Cluster]:
    await give_cidrs(etcd1, *NODE_IPS)
    settings = {
        node: agent_settings(
            tmp_path,
            node,
            ip,
            datapath=DatapathMode.KERNEL,
            bpf_pin_dir=topology.pin_dirs[node],
            routes=True,
            routes_netns=topology.netns[node],
            flows_socket=tmp_path / f"{node}-observer.sock",
            flows_listen="127.0.0.1:0",  # published in the node record, for the relay
        )
        for node, ip in NODE_IPS.items()
    }
    c = Cluster(etcd1, topology, settings)
    try:
        yield c
    finally:
        await c.stop_all()


async def cpctl(*argv: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, [*CPCTL, *argv], capture_output=True, text=True, env=ENV, timeout=60
    )


async def observe(agent: Agent, *argv: str) -> list[dict[str, Any]]:
    """``cpctl observe --json`` against ``agent``: the responses."""
    ran = await cpctl("observe", "--server", str(agent.settings.flows_socket), "--json", *argv)
    assert ran.returncode == 0, ran.stderr
    return [json.loads(line) for line in ran.stdout.splitlines()]


def _side(flow: dict[str, Any], side: str) -> tuple[str, str, int]:
    ep = flow.get(side, {})
    return ep.get("namespace", ""), ep.get("pod_name", ""), int(ep.get("identity", 0))


async def test_flows_of_allowed_and_denied_traffic(cluster: Cluster) -> None:
    c = cluster
    n1, n2, ips = await _bring_up(c)
    db_ip = ips["db"]
    _, web_ep = await api(n1, "GET", "/v1/endpoints/default/web")
    _, other_ep = await api(n1, "GET", "/v1/endpoints/default/other")
    _, db_ep = await api(n2, "GET", "/v1/endpoints/default/db")
    web = ("default", "web", web_ep["identity"])
    other = ("default", "other", other_ep["identity"])
    db = ("default", "db", db_ep["identity"])

    async with ShardMap(kv_config(c.etcd), own_connection=True) as shards:
        store = KvPolicyStore(shards, LAYOUT, StoreMetrics.create())
        await store.put(_policy("app=web"))
        await eventually(
            lambda: any(r.allow for r in n2.policy_maps.rows(db_ep["endpoint_id"])),
            message="db's policy map holds web",
        )

    # node2 must know web and other (the store's endpoints) to name them
    await eventually(
        lambda: {ips["web"], ips["other"]} <= set(n2.cache.endpoints), message="node2's cache"
    )
    got = await asyncio.to_thread(_connect, c.topo.netns["web"], c.topo.netns["db"], db_ip, 5.0)
    assert got == "ok"
    denied = await asyncio.to_thread(
        _connect, c.topo.netns["other"], c.topo.netns["db"], db_ip, 1.5
    )
    assert denied == "timeout"
    assert not await asyncio.to_thread(ping, c.topo.netns["web"], db_ip, 1.0)

    # node2 (db's node): web's SYN as a policy verdict, db's SYN-ACK back as a reply
    async def node2_tcp() -> list[dict[str, Any]]:
        flows = await observe(n2, "--protocol", "tcp", "--to-port", str(PORT), "--last", "100")
        replies = await observe(n2, "--protocol", "tcp", "--from-port", str(PORT), "--last", "9")
        return flows + replies if flows and replies else []

    tcp = await eventually(node2_tcp, message="node2's TCP flows")
    forwarded = [r["flow"] for r in tcp if r["flow"]["verdict"] == "FORWARDED"]
    syn = next(f for f in forwarded if _side(f, "source") == web)
    assert _side(syn, "destination") == db and syn["node_name"] == "node2"
    assert syn["event_type"]["type"] == 5 and syn["traffic_direction"] == "INGRESS"
    assert syn["l4"]["TCP"]["flags"].get("SYN") and syn["is_reply"] is False
    back = next(f for f in forwarded if _side(f, "source") == db)
    assert _side(back, "destination") == web and back["is_reply"] is True
    assert back["l4"]["TCP"]["flags"] == {"SYN": True, "ACK": True}

    drops = [r["flow"] for r in tcp if r["flow"]["verdict"] == "DROPPED"]
    assert drops and all(_side(f, "source") == other for f in drops)
    assert all(f["drop_reason_desc"] == "POLICY_DENIED" for f in drops)

    icmp = await eventually(
        lambda: observe(
            n2, "--protocol", "icmp", "--verdict", "DROPPED", "--from-pod", "default/web"
        ),
        message="web's echo dropped on node2",
    )  # fmt: skip
    assert icmp[0]["flow"]["l4"]["ICMPv4"]["type"] == 8
    assert icmp[0]["flow"]["drop_reason_desc"] == "POLICY_DENIED"

    # node1 (web's node): the same connection leaving web, and db's answer coming back
    node1 = await eventually(
        lambda: observe(n1, "--pod", "default/web", "--to-port", str(PORT), "--last", "50"),
        message="node1's flows of web",
    )
    point = "trace_observation_point"
    out = next(r["flow"] for r in node1 if r["flow"][point] == "FROM_ENDPOINT")
    assert _side(out, "source") == web and _side(out, "destination") == db
    assert out["traffic_direction"] == "EGRESS" and out["node_name"] == "node1"

    # compact and table outputs, --not, the status, the metrics
    ran = await cpctl(
        "observe", "--server", str(n2.settings.flows_socket), "--verdict", "DROPPED",
        "--protocol", "tcp", "--not", "--from-pod", "default/web", "--last", "3",
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.splitlines()
    assert lines
    assert all("default/other:" in ln and "DROPPED (POLICY_DENIED)" in ln for ln in lines), lines
    assert all(" -> default/db:5432 " in ln and "[node2]" in ln for ln in lines)
    ran = await cpctl("observe", "--server", str(n2.settings.flows_socket), "-o", "table")
    assert ran.returncode == 0 and ran.stdout.startswith("TIMESTAMP"), ran.stderr
    ran = await cpctl("observe", "status", "--server", str(n2.settings.flows_socket), "--json")
    assert ran.returncode == 0, ran.stderr
    status = json.loads(ran.stdout)
    assert int(status["max_flows"]) == 4095 and int(status["seen_flows"]) >= len(tcp)
    sample = n2.metrics.registry.get_sample_value(
        "cp_flow_drops_total", {"reason": "POLICY_DENIED", "protocol": "TCP"}
    )
    assert sample is not None and sample >= len(drops)
    _, st = await api(n2, "GET", "/v1/status")
    assert st["flows"]["source"] == "kernel ring buffer" and st["flows"]["aggregation"] == "medium"


async def test_follow_bad_flags_and_no_server(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    _, n2, ips = await _bring_up(c)
    db_ip = ips["db"]
    argv = ["observe", "--server", str(n2.settings.flows_socket), "--follow", "--json"]
    argv += ["--from-pod", "default/other", "--to-port", str(PORT)]
    follower = await asyncio.create_subprocess_exec(
        *CPCTL, *argv, stdout=asyncio.subprocess.PIPE, env=ENV
    )
    assert follower.stdout is not None
    try:
        await eventually(
            lambda: n2.flows is not None and n2.flows.server.readers == 1,
            message="the follower is connected",
        )
        other_ns, db_ns = c.topo.netns["other"], c.topo.netns["db"]
        got = await asyncio.to_thread(_connect, other_ns, db_ns, db_ip, 5)
        assert got == "ok"  # no policy: default allow
        line = await asyncio.wait_for(follower.stdout.readline(), 20)
        flow = json.loads(line)["flow"]
        assert flow["source"]["pod_name"] == "other" and flow["verdict"] == "FORWARDED"
        assert flow["l4"]["TCP"]["destination_port"] == PORT
    finally:
        follower.terminate()
        await follower.wait()

    sock = str(n2.settings.flows_socket)
    for argv, words in (
        (("observe", "--server", sock, "--verdict", "MAYBE"), "--verdict"),
        (("observe", "--server", sock, "--port", "x"), "--port"),
        (("observe", "--server", sock, "--first", "2", "--follow"), "first and follow"),
        (("observe", "--server", str(tmp_path / "none.sock")), "no flow server"),
        (("observe", "status", "--server", str(tmp_path / "none.sock")), "no flow server"),
    ):
        ran = await cpctl(*argv)
        assert ran.returncode != 0, argv
        assert len(ran.stderr.strip().splitlines()) == 1 and words in ran.stderr, ran.stderr


async def test_relay_merges_both_nodes(cluster: Cluster) -> None:
    c = cluster
    _, _, ips = await _bring_up(c)
    db_ip = ips["db"]
    settings = RelaySettings(
        listen="127.0.0.1:0",
        peers=PeerSettings(check_interval=0.2, backoff_min=0.05, backoff_max=0.5),
        merge=MergeSettings(drain_timeout=0.2),
        metrics_port=0,
    )
    relay = Relay(settings, lambda: kvstore_nodes(kv_config(c.etcd), "default"),
                  CollectorRegistry())  # fmt: skip
    async with running(relay, name="e2e-relay"):
        await eventually(
            lambda: {p.name for p in relay.peers.connected()} == {"node1", "node2"},
            message="the relay connected to both agents",
        )
        server = f"127.0.0.1:{relay.observer.port}"
        got = await asyncio.to_thread(_connect, c.topo.netns["web"], c.topo.netns["db"], db_ip, 5)
        assert got == "ok"

        async def merged() -> list[dict[str, Any]]:
            ran = await cpctl("observe", "--server", server, "--json", "--to-port", str(PORT),
                              "--protocol", "tcp", "--last", "200")  # fmt: skip
            assert ran.returncode == 0, ran.stderr
            rs = [json.loads(line) for line in ran.stdout.splitlines()]
            flows = [r["flow"] for r in rs if "flow" in r]
            return rs if {f["node_name"] for f in flows} == {"node1", "node2"} else []

        responses = await eventually(merged, message="flows of both nodes through the relay")
        assert responses[0]["node_status"]["state_change"] == "NODE_CONNECTED"
        times = [r["flow"]["time"] for r in responses if "flow" in r]
        assert times == sorted(times)  # RFC 3339 with the same precision: text order is time
        by_node = {r["flow"]["node_name"]: r["flow"] for r in responses if "flow" in r}
        assert by_node["node1"]["trace_observation_point"] == "FROM_ENDPOINT"
        assert by_node["node2"]["trace_observation_point"] == "TO_ENDPOINT"

        # node1's agent dies: the relay says so, node2's flows keep coming through it
        follower = await asyncio.create_subprocess_exec(
            *CPCTL, "observe", "--server", server, "--follow", "--json",
            stdout=asyncio.subprocess.PIPE, env=ENV,
        )  # fmt: skip
        assert follower.stdout is not None
        try:
            await eventually(lambda: relay.observer.streams == 1, message="the follower")
            await c.kill("node1")
            lines: list[dict[str, Any]] = []

            async def unavailable() -> bool:
                line = await asyncio.wait_for(follower.stdout.readline(), 20)  # type: ignore[union-attr]
                lines.append(json.loads(line))
                st = lines[-1].get("node_status", {})
                return st.get("state_change") == "NODE_UNAVAILABLE" and st["node_names"] == [
                    "node1"
                ]

            await eventually(unavailable, message="node1 unavailable in the relay's stream")
            other, db = c.topo.netns["other"], c.topo.netns["db"]
            assert await asyncio.to_thread(_connect, other, db, db_ip, 5) == "ok"

            async def from_node2() -> bool:
                line = await asyncio.wait_for(follower.stdout.readline(), 20)  # type: ignore[union-attr]
                flow = json.loads(line).get("flow", {})
                source = flow.get("source", {})
                return flow.get("node_name") == "node2" and source.get("pod_name") == "other"

            await eventually(from_node2, message="node2's new flows through the relay")
            status = await cpctl("observe", "status", "--server", server, "--json")
            assert json.loads(status.stdout)["unavailable_nodes"] == ["node1"]
        finally:
            follower.terminate()
            await follower.wait()
