"""The datapath's flow events for real: C/Python layout agreement of the flow section of
bpf/cp_maps.h, and events from the tc programs on db's veth (the topology of
tests/test_bpf_program.py) read by the flow server through the ring buffer's fd:
medium vs none aggregation, policy verdicts and drops with their reason and identity,
ICMP, and kernel-side losses (rate limit, full ring buffer) counted, never silent.
"""

from __future__ import annotations

import asyncio
import ctypes
import socket
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from prometheus_client import CollectorRegistry

from controlplane.datapath import flowevents as fe
from controlplane.datapath import layouts, loader
from controlplane.flows.convert import PeerInfo, StaticResolver
from controlplane.flows.proto import flow_pb2 as pb
from controlplane.flows.server import FlowServer, FlowSettings
from tests.helpers import eventually, holds_for, kernel_tests_unmet, requires
from tests.icmp_echo import ping
from tests.test_bpf_program import (
    BPF_DIR,
    DB_EP,
    OTHER_ID,
    PORT,
    WEB_ID,
    Topology,
    _connects_within,
    _Maps,
    _on_db,
    _tcp_listen,
    _try_connect,
    metric,
    topology,
)

pytestmark = requires(kernel_tests_unmet("ip"))
__all__ = ["topology"]  # the fixture, imported

_LAYOUTS: dict[str, type[ctypes.Structure]] = {
    "cp_flow_event": fe.FlowEvent,
    "cp_flow_config": fe.FlowConfig,
    "cp_flow_state": fe.FlowState,
    "cp_flow_rate": fe.FlowRate,
}
_CONSTS = {
    "CP_FLOW_EVENTS_BYTES": fe.FLOW_EVENTS_BYTES,
    "CP_FLOW_STATE_MAX_ENTRIES": fe.FLOW_STATE_MAX_ENTRIES,
    "CP_FLOW_LOST_MAX_ENTRIES": fe.FLOW_LOST_MAX_ENTRIES,
    **{f"CP_FLOW_AGG_{a.name}": int(a) for a in fe.Aggregation},
    **{f"CP_FLOW_T_{t.name}": int(t) for t in fe.FlowType},
    **{f"CP_FLOW_F_{f.name}": int(f) for f in fe.FlowFlag},
    **{f"CP_FLOW_KIND_{k.name}": int(k) for k in fe.FlowKind},
    **{f"CP_FLOW_LOST_{r.name}": int(r) for r in fe.LostReason},
}


def test_c_and_python_flow_layouts_agree(tmp_path: Path) -> None:
    lines = ["#include <stdio.h>", "#include <stddef.h>", '#include "cp_maps.h"', "int main(void){"]
    for cname, py in _LAYOUTS.items():
        lines.append(f'printf("{cname} - %zu\\n", sizeof(struct {cname}));')
        for fname, *_ in py._fields_:
            lines.append(
                f'printf("{cname} {fname} %zu %zu\\n", offsetof(struct {cname}, {fname}), '
                f"sizeof(((struct {cname} *)0)->{fname}));"
            )
    for name in _CONSTS:
        lines.append(f'printf("const {name} %lld\\n", (long long)({name}));')
    lines.append("return 0;}")
    src = tmp_path / "probe.c"
    src.write_text("\n".join(lines) + "\n")
    exe = tmp_path / "probe"
    cc = subprocess.run(
        ["clang", "-Wall", "-Werror", f"-I{BPF_DIR}", str(src), "-o", str(exe)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert cc.returncode == 0, cc.stderr
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    c = {(k, n): tuple(int(x) for x in rest) for k, n, *rest in map(str.split, out.splitlines())}
    for cname, py in _LAYOUTS.items():
        assert c[(cname, "-")] == (ctypes.sizeof(py),), cname
        for fname, *_ in py._fields_:
            field = getattr(py, fname)
            assert c[(cname, fname)] == (field.offset, field.size), f"{cname}.{fname}"
    for name, value in _CONSTS.items():
        assert c[("const", name)] == (value,), name


# --- events from real traffic --------------------------------------------------------


@asynccontextmanager
async def _db(t: Topology) -> AsyncIterator[_Maps]:
    """``_on_db`` from a worker thread (pyroute2 runs an event loop of its own)."""
    cm = _on_db(t)
    maps = await asyncio.to_thread(cm.__enter__)
    try:
        yield maps
    finally:
        await asyncio.to_thread(cm.__exit__, None, None, None)


def _resolver(t: Topology) -> StaticResolver:
    return StaticResolver(
        peers={
            t.ips["web"]: PeerInfo(WEB_ID, ("k8s:app=web",), "default", "web"),
            t.ips["other"]: PeerInfo(OTHER_ID, ("k8s:app=other",), "default", "other"),
            t.ips["db"]: PeerInfo(3000, ("k8s:app=db",), "default", "db", DB_EP),
        },
        identity_labels={WEB_ID: ("k8s:app=web",), OTHER_ID: ("k8s:app=other",)},
    )


@asynccontextmanager
async def _flow_server(t: Topology, settings: FlowSettings) -> AsyncIterator[FlowServer]:
    maps = fe.pinned_flow_maps(t.pin_dir)
    server = FlowServer("node", settings, _resolver(t), CollectorRegistry(), maps)
    task = asyncio.create_task(server.run(), name="test-flow-server")
    try:
        await eventually(
            lambda: maps.configuration().aggregation == settings.aggregation,
            message="the flow server configured the programs",
        )
        yield server
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        maps.close()


def _flows(server: FlowServer, match: Callable[[pb.Flow], bool]) -> list[pb.Flow]:
    out = []
    for _, entry in server.ring.newest_first():
        if entry.HasField("flow") and match(entry.flow):
            out.append(entry.flow)
    return out[::-1]


def _tcp_exchange(t: Topology, src: str, srv: socket.socket, rounds: int) -> int:
    """One connection from pod ``src`` to db carrying ``rounds`` request/answer pairs, then
    closed; returns its client port."""
    with loader.in_netns(t.pods[src]):
        cli = socket.create_connection((t.ips["db"], PORT), timeout=5)
    with cli:
        port = cli.getsockname()[1]
        srv.settimeout(5)
        conn, _ = srv.accept()
        with conn:
            for _ in range(rounds):
                cli.sendall(b"ping")
                assert conn.recv(4) == b"ping"
                conn.sendall(b"pong")
                assert cli.recv(4) == b"pong"
            cli.shutdown(socket.SHUT_WR)
            assert conn.recv(4) == b""
    return int(port)


def _of_port(port: int) -> Callable[[pb.Flow], bool]:
    return lambda f: port in (f.l4.TCP.source_port, f.l4.TCP.destination_port)


def _summary(flows: list[pb.Flow]) -> list[tuple[str, bool, str]]:
    """(observation point, is_reply, flags) of each flow."""
    out = []
    for f in flows:
        flags = f.l4.TCP.flags
        names = "".join(n for n in ("SYN", "ACK", "FIN", "RST") if getattr(flags, n))
        out.append((pb.TraceObservationPoint.Name(f.trace_observation_point), f.is_reply.value,
                    names))  # fmt: skip
    return out


async def test_medium_aggregation_and_none(topology: Topology) -> None:
    """medium: the first packet each way, and each SYN/FIN the first time it goes by; none:
    every packet. Both directions, with is_reply and the pods of both sides."""
    t = topology
    async with _db(t):
        srv = _tcp_listen(t.pods["db"], t.ips["db"])
        with srv:
            assert await asyncio.to_thread(_connects_within, t.pods["web"], t.ips["db"], 10, srv)
            async with _flow_server(t, FlowSettings(aggregation=fe.Aggregation.MEDIUM)) as server:
                port = await asyncio.to_thread(_tcp_exchange, t, "web", srv, 20)
                medium = await eventually(
                    lambda: [f for f in _flows(server, _of_port(port)) if f.l4.TCP.flags.FIN] and
                    _flows(server, _of_port(port)),
                    message="the connection's closing flows",
                )  # fmt: skip
                # toward db: SYN (new), then the first FIN; from db: SYN-ACK (a reply), its FIN
                got = _summary(medium)
                assert got[:2] == [("TO_ENDPOINT", False, "SYN"), ("FROM_ENDPOINT", True, "SYNACK")]
                assert ("TO_ENDPOINT", False, "ACKFIN") in got
                assert len(got) <= 6, got  # the 20 pings and 20 pongs were not reported
                first = medium[0]
                assert (first.source.pod_name, first.source.identity) == ("web", WEB_ID)
                assert (first.destination.pod_name, first.destination.ID) == ("db", DB_EP)
                assert first.verdict == pb.FORWARDED and first.traffic_direction == pb.INGRESS
                assert first.event_type.type == fe.FlowType.TRACE  # db not enforced: no policy
                assert (
                    medium[1].source.pod_name == "db" and medium[1].traffic_direction == pb.INGRESS
                )
                assert server.lost == dict.fromkeys(fe.LostReason, 0)

            async with _flow_server(t, FlowSettings(aggregation=fe.Aggregation.NONE)) as server:
                port = await asyncio.to_thread(_tcp_exchange, t, "web", srv, 20)

                def every_packet() -> list[pb.Flow]:
                    flows = _flows(server, _of_port(port))
                    data = [f for f in flows if not (f.l4.TCP.flags.SYN or f.l4.TCP.flags.FIN)]
                    return flows if len(data) >= 40 else []  # 20 pings, 20 pongs, and ACKs

                none = await eventually(every_packet, message="every packet reported")
                assert len(none) > 3 * len(medium)


async def test_policy_verdicts_drops_and_icmp(topology: Topology) -> None:
    """On an enforced db: web's connection is a POLICY_VERDICT with web's identity from
    the ipcache; other's SYNs are DROPPED, reason POLICY_DENIED; an echo likewise."""
    t = topology
    async with _db(t) as m:
        m.policy.update(
            layouts.encode_policy_key(DB_EP, WEB_ID, PORT, 6), layouts.encode_policy_value(True)
        )
        m.endpoints.update(*layouts.encode_endpoint(DB_EP, layouts.EP_F_INGRESS_ENFORCED))
        async with _flow_server(t, FlowSettings()) as server:
            with _tcp_listen(t.pods["db"], t.ips["db"]) as srv:
                port = await asyncio.to_thread(_tcp_exchange, t, "web", srv, 2)
                refused = await asyncio.to_thread(_try_connect, t.pods["other"], t.ips["db"], 1.5)
                assert refused is None
            assert not await asyncio.to_thread(ping, t.pods["other"], t.ips["db"], 1.0)

            def dropped() -> list[pb.Flow]:
                other = t.ips["other"]  # (not the node's IPv6 chatter toward db)
                return _flows(server, lambda f: f.verdict == pb.DROPPED and f.IP.source == other)

            drops = await eventually(
                lambda: (d := dropped()) and {f.l4.WhichOneof("protocol") for f in d} >=
                {"TCP", "ICMPv4"} and d,
                message="other's SYN and echo dropped",
            )  # fmt: skip
            for f in drops:
                assert f.drop_reason_desc == pb.POLICY_DENIED
                assert (f.source.pod_name, f.source.identity) == ("other", OTHER_ID)
                assert f.destination.pod_name == "db" and f.event_type.type == fe.FlowType.DROP
            echo = next(f for f in drops if f.l4.WhichOneof("protocol") == "ICMPv4")
            assert echo.l4.ICMPv4.type == 8
            verdict = _flows(server, _of_port(port))[0]
            assert verdict.event_type.type == fe.FlowType.POLICY_VERDICT
            assert verdict.verdict == pb.FORWARDED and verdict.source.identity == WEB_ID
            assert metric(m.metrics, layouts.MetricReason.DROP_POLICY_DENY) >= len(drops)


async def test_rate_limit_losses_are_counted_and_told(topology: Topology) -> None:
    """Events over the program's rate limit are counted in cp_flow_lost, and the flow
    server tells every reader with a lost-event record."""
    t = topology
    async with _db(t):
        srv = _tcp_listen(t.pods["db"], t.ips["db"])
        with srv:
            settings = FlowSettings(
                aggregation=fe.Aggregation.NONE, rate_per_sec=1, burst=5, lost_poll_interval=0.1
            )
            async with _flow_server(t, settings) as server:
                await asyncio.to_thread(_tcp_exchange, t, "web", srv, 20)
                lost = await eventually(
                    lambda: [
                        e.lost_events for _, e in server.ring.newest_first()
                        if e.HasField("lost_events")
                    ],
                    message="a lost-event record",
                )  # fmt: skip
                assert all(x.source == pb.PERF_EVENT_RING_BUFFER for x in lost)
                told = sum(x.num_events_lost for x in lost)
                assert told == server.lost[fe.LostReason.RATE_LIMIT] > 0
                flows = len(_flows(server, lambda f: True))
                assert flows <= 10  # the burst (per CPU), and a token a second
                assert server.metrics.lost.labels("kernel_rate_limit")._value.get() == told
                status = server.status()
                assert status.lost_rate_limit == told


def _udp_blast(t: Topology, count: int) -> None:
    with loader.in_netns(t.pods["db"]):
        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with loader.in_netns(t.pods["web"]):
        src = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sink, src:
        sink.bind((t.ips["db"], PORT))
        for _ in range(count):
            src.sendto(b"x", (t.ips["db"], PORT))


async def test_full_ring_buffer_losses_are_counted(topology: Topology) -> None:
    """Nobody reads: the ring buffer fills, and every event past it is counted lost, so
    what a reader then drains plus what was lost accounts for every packet the program
    saw (never silent). The reader wakes through the map's fd (epoll), not a thread."""
    t = topology
    async with _db(t) as m:
        maps = fe.pinned_flow_maps(t.pin_dir)
        reader = fe.RingBufferReader(maps.events)
        try:
            maps.configure(fe.Aggregation.NONE, 0, 1, 5)
            base = maps.lost_counts()[fe.LostReason.RINGBUF_FULL]
            seen_before = metric(m.metrics, layouts.MetricReason.ALLOW_NOT_ENFORCED)
            per_record = ctypes.sizeof(fe.FlowEvent) + 8
            count = fe.FLOW_EVENTS_BYTES // per_record + 20_000
            await asyncio.to_thread(_udp_blast, t, count)
            seen = metric(m.metrics, layouts.MetricReason.ALLOW_NOT_ENFORCED) - seen_before
            lost = maps.lost_counts()[fe.LostReason.RINGBUF_FULL] - base
            assert lost > 0
            loop = asyncio.get_running_loop()
            readable = asyncio.Event()
            loop.add_reader(reader.fileno(), readable.set)
            try:
                await asyncio.wait_for(readable.wait(), 5)  # epoll says records wait
            finally:
                loop.remove_reader(reader.fileno())
            drained = 0

            def take(view: memoryview) -> None:
                nonlocal drained
                drained += 1

            while reader.drain(take):
                pass
            assert reader.pending_bytes() == 0
            # at most a full ring, plus what the pods' noise adds while it is drained
            assert drained <= fe.FLOW_EVENTS_BYTES // per_record + 50, drained
            # every to_endpoint packet made one event try; pod-side noise (IPv6 MLD...)
            # may add a few from_endpoint ones, and a packet in flight while the counters
            # are read may be counted on one side only
            assert -5 <= drained + lost - seen <= 50, (drained, lost, seen)
            maps.configure(fe.Aggregation.OFF, 0, 1, 5)
        finally:
            reader.close()
            maps.close()


async def test_aggregation_off_emits_nothing(topology: Topology) -> None:
    t = topology
    async with _db(t):
        srv = _tcp_listen(t.pods["db"], t.ips["db"])
        with srv:
            maps = fe.pinned_flow_maps(t.pin_dir)
            reader = fe.RingBufferReader(maps.events)
            try:
                assert maps.configuration().aggregation == fe.Aggregation.OFF  # as created
                await asyncio.to_thread(_tcp_exchange, t, "web", srv, 5)
                await holds_for(lambda: reader.pending_bytes() == 0, 0.5, "no flow events when off")
            finally:
                reader.close()
                maps.close()
