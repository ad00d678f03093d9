"""The flow server and its Observer API over a real gRPC unix socket, fed with datapath
records made here (the kernel's side is tests/test_flow_events.py and
tests/test_e2e_flows.py): enrichment, last/first/follow, filters, InvalidArgument, a slow
reader's lost events, ServerStatus, the flow metrics, and the committed generated modules.
"""

from __future__ import annotations

import asyncio
import ipaddress
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
import pytest_asyncio
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import CollectorRegistry

from controlplane.datapath.flowevents import FlowEvent, FlowFlag, FlowKind, FlowType, decode_event
from controlplane.datapath.layouts import MetricReason
from controlplane.flows.client import ObserverClient
from controlplane.flows.convert import PeerInfo, StaticResolver
from controlplane.flows.proto import flow_pb2 as pb
from controlplane.flows.proto import observer_pb2 as obs
from controlplane.flows.server import FlowServer, FlowSettings
from tests.helpers import eventually

REPO = Path(__file__).resolve().parents[1]
WEB, DB, OUT = "10.1.0.5", "10.2.0.9", "192.0.2.1"
RESOLVER = StaticResolver(
    peers={
        WEB: PeerInfo(1001, ("k8s:app=web",), "default", "web-7f", 11),
        DB: PeerInfo(1002, ("k8s:app=db", "k8s:tier=data"), "prod", "db-0", 22),
    },
    identity_labels={1001: ("k8s:app=web",), 1002: ("k8s:app=db",), 2: ("reserved:world",)},
)


def record(
    src: str,
    dst: str,
    *,
    sport: int = 40000,
    dport: int = 5432,
    proto: int = 6,
    kind: FlowKind = FlowKind.PORTS,
    type_: FlowType = FlowType.POLICY_VERDICT,
    reason: MetricReason = MetricReason.ALLOW_POLICY,
    tcp: int = 0x02,
    flags: FlowFlag = FlowFlag.TO_ENDPOINT | FlowFlag.IDENTITY,
    identity: int = 1001,
    endpoint: int = 22,
) -> bytes:
    """One ``cp_flow_event`` as the program writes it."""
    ev = FlowEvent()
    ev.ktime_ns = time.monotonic_ns()
    for field, addr in (("src", src), ("dst", dst)):
        packed = b"\x00" * 10 + b"\xff\xff" + ipaddress.IPv4Address(addr).packed
        getattr(ev, field)[:] = list(packed)
    ev.endpoint_id, ev.identity, ev.len = endpoint, identity, 60
    ev.sport, ev.dport, ev.proto, ev.type, ev.reason = sport, dport, proto, type_, reason
    ev.tcp_flags, ev.flags, ev.kind = tcp, flags, kind
    return bytes(ev)


def feed(server: FlowServer, *records: bytes) -> None:
    for raw in records:
        server.ingest(decode_event(raw))
    server.end_batch()


@pytest_asyncio.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[FlowServer, ObserverClient]]:
    from controlplane.flows.observer import ObserverServer

    server = FlowServer("node-a", FlowSettings(capacity=64), RESOLVER, CollectorRegistry())
    api = ObserverServer(server)
    sock = tmp_path / "observer.sock"
    await api.start(sock)
    client = ObserverClient(str(sock))
    try:
        yield server, client
    finally:
        await client.close()
        await api.close()


async def flows(client: ObserverClient, **kw: object) -> list[obs.GetFlowsResponse]:
    return [r async for r in client.get_flows(obs.GetFlowsRequest(**kw), timeout=10)]  # type: ignore[arg-type]


async def test_enriched_flow_and_last_first(served: tuple[FlowServer, ObserverClient]) -> None:
    server, client = served
    feed(
        server,
        record(WEB, DB, tcp=0x02),
        record(DB, WEB, sport=5432, dport=40000, tcp=0x12, flags=FlowFlag.REPLY, identity=0),
        record(
            OUT, DB, type_=FlowType.DROP, reason=MetricReason.DROP_POLICY_DENY, identity=2,
            flags=FlowFlag.TO_ENDPOINT | FlowFlag.IDENTITY,
        ),
    )  # fmt: skip
    got = await flows(client, number=10)
    assert [r.flow.verdict for r in got] == [pb.FORWARDED, pb.FORWARDED, pb.DROPPED]
    first = got[0].flow
    assert got[0].node_name == "node-a" and first.node_name == "node-a"
    assert (first.source.namespace, first.source.pod_name, first.source.identity) == (
        "default", "web-7f", 1001,
    )  # fmt: skip
    assert list(first.source.labels) == ["k8s:app=web"]
    assert (first.destination.pod_name, first.destination.ID) == ("db-0", 22)
    assert first.l4.TCP.destination_port == 5432 and first.l4.TCP.flags.SYN
    assert first.traffic_direction == pb.INGRESS and first.is_reply.value is False
    assert first.trace_observation_point == pb.TO_ENDPOINT
    assert first.event_type.type == 5 and first.IP.ipVersion == pb.IPv4
    reply = got[1].flow
    assert reply.is_reply.value and reply.traffic_direction == pb.INGRESS
    assert reply.trace_observation_point == pb.FROM_ENDPOINT
    assert reply.l4.TCP.flags.SYN and reply.l4.TCP.flags.ACK
    drop = got[2].flow
    assert drop.drop_reason_desc == pb.POLICY_DENIED and drop.drop_reason == 133
    assert drop.source.identity == 2 and list(drop.source.labels) == ["reserved:world"]
    assert drop.event_type.sub_type == pb.POLICY_DENIED

    assert [r.flow.verdict for r in await flows(client, number=1)] == [pb.DROPPED]
    assert [r.flow.verdict for r in await flows(client, number=1, first=True)] == [pb.FORWARDED]


async def test_filters(served: tuple[FlowServer, ObserverClient]) -> None:
    server, client = served
    feed(
        server,
        record(WEB, DB),
        record(OUT, DB, type_=FlowType.DROP, reason=MetricReason.DROP_POLICY_DENY, identity=2),
        record(WEB, DB, proto=17, dport=53, tcp=0),
        record(WEB, DB, proto=1, kind=FlowKind.ECHO_REQUEST, sport=7, dport=7, tcp=0),
    )

    async def count(*allow: pb.FlowFilter, deny: tuple[pb.FlowFilter, ...] = ()) -> int:
        return len(await flows(client, whitelist=list(allow), blacklist=list(deny)))

    assert await count(pb.FlowFilter(verdict=[pb.DROPPED])) == 1
    assert await count(pb.FlowFilter(source_pod=["default/web"])) == 3
    assert await count(pb.FlowFilter(source_pod=["default/"])) == 3
    assert await count(pb.FlowFilter(source_pod=["prod/"])) == 0
    assert await count(pb.FlowFilter(destination_pod=["db-"])) == 4
    assert await count(pb.FlowFilter(source_label=["app=web"])) == 3
    assert await count(pb.FlowFilter(destination_label=["k8s:tier in (data, x),app"])) == 4
    assert await count(pb.FlowFilter(source_label=["!app"])) == 1
    assert await count(pb.FlowFilter(source_identity=[2])) == 1
    assert await count(pb.FlowFilter(protocol=["udp"])) == 1
    assert await count(pb.FlowFilter(protocol=["icmp"])) == 1
    assert await count(pb.FlowFilter(destination_port=["53"])) == 1
    assert await count(pb.FlowFilter(source_ip=["192.0.2.0/24"])) == 1
    assert await count(pb.FlowFilter(tcp_flags=[pb.TCPFlags(SYN=True)])) == 2
    assert await count(pb.FlowFilter(node_name=["node-*"])) == 4
    assert await count(pb.FlowFilter(node_name=["other"])) == 0
    assert await count(pb.FlowFilter(reply=[False])) == 4
    assert await count(pb.FlowFilter(traffic_direction=[pb.INGRESS])) == 4
    # several filters: OR; the deny list wins
    assert await count(pb.FlowFilter(protocol=["udp"]), pb.FlowFilter(verdict=[pb.DROPPED])) == 2
    assert await count(deny=(pb.FlowFilter(protocol=["tcp"]),)) == 2


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (obs.GetFlowsRequest(whitelist=[pb.FlowFilter(source_ip=["10.0.0.300"])]), "source_ip"),
        (obs.GetFlowsRequest(whitelist=[pb.FlowFilter(protocol=["tcpx"])]), "protocol"),
        (obs.GetFlowsRequest(blacklist=[pb.FlowFilter(source_port=["70000"])]), "source_port"),
        (obs.GetFlowsRequest(whitelist=[pb.FlowFilter(source_label=["a=b=c"])]), "source_label"),
        (obs.GetFlowsRequest(whitelist=[pb.FlowFilter(verdict=[42])]), "verdict"),  # type: ignore[list-item]
        (obs.GetFlowsRequest(first=True, follow=True), "first and follow"),
        (
            obs.GetFlowsRequest(since=Timestamp(seconds=20), until=Timestamp(seconds=10)),
            "since is after until",
        ),
    ],
)
async def test_invalid_requests(
    served: tuple[FlowServer, ObserverClient], request_: obs.GetFlowsRequest, message: str
) -> None:
    _, client = served
    with pytest.raises(grpc.aio.AioRpcError) as info:
        [r async for r in client.get_flows(request_, timeout=10)]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (info.value.details() or "")


async def test_unknown_filter_fields_are_refused(served: tuple[FlowServer, ObserverClient]) -> None:
    """A Hubble client's filter on a field we do not implement (source_fqdn = 7) is not
    silently ignored."""
    _, client = served
    f = pb.FlowFilter()
    f.MergeFromString(b"\x3a\x03a.b")  # field 7, length-delimited "a.b"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        [r async for r in client.get_flows(obs.GetFlowsRequest(whitelist=[f]), timeout=10)]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "[7]" in (info.value.details() or "")


async def test_follow_streams_new_flows(served: tuple[FlowServer, ObserverClient]) -> None:
    server, client = served
    feed(server, record(WEB, DB, dport=1))
    stream = client.get_flows(
        obs.GetFlowsRequest(follow=True, whitelist=[pb.FlowFilter(destination_port=["2", "3"])])
    )
    received: list[int] = []

    async def read() -> None:
        async for r in stream:
            received.append(r.flow.l4.TCP.destination_port)
            if len(received) == 2:
                return

    reader = asyncio.create_task(read())
    try:
        await eventually(lambda: server.readers == 1, message="the follower is served")
        for port in (2, 4, 3):
            feed(server, record(WEB, DB, dport=port))
        await asyncio.wait_for(reader, 10)
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    assert received == [2, 3]


async def test_slow_reader_gets_lost_events(tmp_path: Path) -> None:
    """A reader that stops reading is lapped by the ring: it gets a HUBBLE_RING_BUFFER lost
    event with the count, and the server never waits for it."""
    from controlplane.flows.observer import ObserverServer

    server = FlowServer("node-a", FlowSettings(capacity=32), RESOLVER, CollectorRegistry())
    api = ObserverServer(server)
    await api.start(tmp_path / "o.sock")
    small = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
    client = ObserverClient(str(tmp_path / "o.sock"), options=small)
    call = client.get_flows(obs.GetFlowsRequest(follow=True))
    it = aiter(call)
    try:
        first_read = asyncio.ensure_future(anext(it))
        await eventually(lambda: server.readers == 1, message="the follower is served")
        feed(server, record(WEB, DB, dport=1))
        first = await asyncio.wait_for(first_read, 10)
        assert first.flow.l4.TCP.destination_port == 1
        # the reader stops; the server takes in far more than the ring and the stream's
        # windows hold, without ever blocking
        for _ in range(200):
            feed(server, *(record(WEB, DB, dport=2) for _ in range(100)))
            await asyncio.sleep(0)  # let the server's stream task write what it can
        assert server.seen == 20001
        lost = 0
        received = 0
        while received < 20000:  # every flow fed is either delivered or counted lost
            r = await asyncio.wait_for(anext(it), 10)
            if r.HasField("lost_events"):
                assert r.lost_events.source == pb.HUBBLE_RING_BUFFER
                lost += r.lost_events.num_events_lost
                received += r.lost_events.num_events_lost
            else:
                received += 1
        assert lost > 0 and received == 20000
        lapped = server.metrics.lost.labels("reader_lapped")._value.get()
        assert lapped == lost
    finally:
        call.cancel()  # type: ignore[attr-defined]
        await client.close()
        await api.close()


async def test_server_status_and_metrics(served: tuple[FlowServer, ObserverClient]) -> None:
    server, client = served
    feed(server, *(record(WEB, DB) for _ in range(100)))
    feed(server, record(OUT, DB, type_=FlowType.DROP, reason=MetricReason.DROP_POLICY_DENY))
    status = await client.server_status()
    assert (status.num_flows, status.max_flows, status.seen_flows) == (64, 64, 101)
    assert status.uptime_ns > 0 and status.version
    assert status.num_connected_nodes.value == 1
    sample = server.metrics.processed.labels("policy_verdict", "FORWARDED")._value.get()
    assert sample == 100
    assert server.metrics.drops.labels("POLICY_DENIED", "TCP")._value.get() == 1
    assert server.metrics.tcp_flags.labels("SYN", "IPv4")._value.get() == 101
    server.push_lost(pb.PERF_EVENT_RING_BUFFER, 7, "kernel_ring_buffer")
    got = await flows(client, number=1)
    assert got[-1].lost_events.num_events_lost == 7
    await eventually(
        lambda: server.metrics.lost.labels("kernel_ring_buffer")._value.get() == 7,
        message="lost metric",
    )


def test_generated_modules_are_current(tmp_path: Path) -> None:
    """The committed *_pb2.py[i] are what `make proto` makes from the .proto files."""
    out = tmp_path / "out"
    out.mkdir()
    protos = [f"controlplane/flows/proto/{n}.proto" for n in ("flow", "relay", "observer")]
    proc = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", f"--python_out={out}",
         f"--pyi_out={out}", *protos],
        cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for name in [f"{n}_pb2.{ext}" for n in ("flow", "relay", "observer") for ext in ("py", "pyi")]:
        made = (out / "controlplane/flows/proto" / name).read_text()
        committed = (REPO / "controlplane/flows/proto" / name).read_text()
        assert made == committed, f"{name} is stale: run `make proto`"


async def test_agent_flows_survive_an_unbindable_socket(tmp_path: Path) -> None:
    """The agent's flow server keeps running when its Observer socket cannot be bound: one
    warning, the reason in its status (the agent's other work is not at stake)."""
    from controlplane.agent.flows import AgentFlows
    from controlplane.agent.watches import AgentCache
    from controlplane.model import NodeName

    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    flows = AgentFlows(
        NodeName("n1"), AgentCache(), FlowSettings(), CollectorRegistry(),
        kernel=False, pin_dir=tmp_path,
    )  # fmt: skip
    await flows.start(blocked / "observer.sock", None)
    assert flows.error is not None and "observer.sock" in flows.error
    assert flows.api.socket is None
    await flows.close()
