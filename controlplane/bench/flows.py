"""`cpctl bench flows`: what flow events cost the datapath, and how many reach a reader.

Topology, made for the run in network namespaces (nothing on the host's own network)::

    client (10.231.1.2) --veth-- node (router) --veth[tc: cp_to_endpoint/cp_from_endpoint]--
        server (10.231.2.2)

The tc programs run on the server's host-side veth with maps pinned in a per-run
directory; the server endpoint is not enforced (every packet passes).

(a) **TCP throughput** from client to server through the programs with flow events off,
``medium`` and ``none``, in interleaved rounds (one bulk connection each: a sender and a
receiver process, 64 KiB writes); medium's and none's ratios to off. The flow server
reads the events meanwhile, in this process, as the agent does.

(b) **Flow events to a reader**: ``none`` aggregation, UDP packets at fixed rates from
the client (each one event); the flow server (this process, pinned to one CPU) takes
them from the ring buffer, and a ``GetFlows --follow`` client (another process) reads
them over the Observer API's unix socket. Per rate: packets the program saw, events the
server took in, lost in the kernel (ring buffer full, rate limit), delivered to the
client, and lost by the client falling behind the server's ring (each loss is counted
and told, never silent).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from prometheus_client import CollectorRegistry

from controlplane.bench.common import BenchError, Progress
from controlplane.datapath import loader
from controlplane.datapath.counters import pinned_verdict_counts
from controlplane.datapath.flowevents import Aggregation, FlowMaps, LostReason, pinned_flow_maps
from controlplane.flows.convert import StaticResolver
from controlplane.flows.observer import ObserverServer
from controlplane.flows.server import FlowServer, FlowSettings

__all__ = ["FlowBenchParams", "run_flows_bench"]

PORT: Final = 5201
ENDPOINT_ID: Final = 1

_SENDER: Final = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
buf = b"x" * 65536
deadline = time.monotonic() + float(sys.argv[3])
while time.monotonic() < deadline:
    s.sendall(buf)
s.close()
"""
_RECEIVER: Final = """
import socket, sys, time
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2]))); srv.listen(1)
print("ready", flush=True)
conn, _ = srv.accept()
buf = bytearray(1 << 20); total = 0; first = None
while True:
    n = conn.recv_into(buf)
    if not n:
        break
    if first is None:
        first = time.monotonic()
    total += n
print(total, time.monotonic() - (first or time.monotonic()), flush=True)
"""
_UDP: Final = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
dst = (sys.argv[1], int(sys.argv[2])); rate = float(sys.argv[3]); seconds = float(sys.argv[4])
sent = 0; start = time.monotonic(); end = start + seconds
errors = 0
while True:
    now = time.monotonic()
    if now >= end:
        break
    due = int((now - start) * rate)
    while sent < due:
        try:
            s.sendto(b"x", dst); sent += 1
        except OSError:  # (ENOBUFS: the sender's queue is full; try again shortly)
            errors += 1
            break
    time.sleep(0.0005)
print(sent, errors, flush=True)
"""
_READER: Final = """
import asyncio, sys, time
from controlplane.flows.client import ObserverClient
from controlplane.flows.proto import observer_pb2 as obs
async def main():
    flows = lost = 0
    async with ObserverClient(sys.argv[1]) as client:
        call = client.get_flows(obs.GetFlowsRequest(follow=True))
        print("ready", flush=True)
        async def read():
            nonlocal flows, lost
            async for r in call:
                if r.HasField("lost_events"):
                    lost += r.lost_events.num_events_lost
                else:
                    flows += 1
        task = asyncio.create_task(read())
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    print(flows, lost, flush=True)
asyncio.run(main())
"""


@dataclass(frozen=True, slots=True)
class FlowBenchParams:
    seconds: float = 3.0
    """Length of one throughput run and of one event-rate run."""
    rounds: int = 3
    """Interleaved throughput rounds (off, medium, none each)."""
    rates: tuple[int, ...] = (10_000, 25_000, 50_000)
    """UDP packets per second for the event-rate runs."""
    buffer_size: int = 65_535
    """The flow server's ring for (b)."""

    def __post_init__(self) -> None:
        if self.seconds <= 0 or self.rounds < 1 or not self.rates:
            raise ValueError("--seconds > 0, --rounds >= 1 and at least one rate")


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BenchError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


@dataclass
class _Topology:
    node: str
    client: str
    server: str
    host_if: str
    pin_dir: Path
    server_ip: str = "10.231.2.2"


@contextlib.contextmanager
def _topology() -> Iterator[_Topology]:
    tok = secrets.token_hex(3)
    t = _Topology(
        f"cpbf-{tok}-node", f"cpbf-{tok}-cli", f"cpbf-{tok}-srv", f"cpbf{tok}s",
        Path(f"/sys/fs/bpf/cp-bench-flows-{tok}"),
    )  # fmt: skip
    try:
        for ns in (t.node, t.client, t.server):
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        with loader.in_netns(t.node):
            Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
        for i, (pod, host_if) in enumerate(((t.client, f"cpbf{tok}c"), (t.server, t.host_if)), 1):
            _ip("-n", t.node, "link", "add", host_if, "type", "veth", "peer", "name", "eth0",
                "netns", pod)  # fmt: skip
            _ip("-n", t.node, "addr", "add", f"10.231.{i}.1/24", "dev", host_if)
            _ip("-n", t.node, "link", "set", host_if, "up")
            _ip("-n", pod, "addr", "add", f"10.231.{i}.2/24", "dev", "eth0")
            _ip("-n", pod, "link", "set", "eth0", "up")
            _ip("-n", pod, "route", "add", "default", "via", f"10.231.{i}.1")
        loader.load_and_attach(ENDPOINT_ID, t.host_if, netns=t.node, pin_dir=t.pin_dir)
        yield t
    finally:
        for ns in (t.node, t.client, t.server):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        if t.pin_dir.exists():
            for pin in t.pin_dir.iterdir():
                pin.unlink()
            t.pin_dir.rmdir()


def _in_netns(ns: str, code: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", ns, sys.executable, "-c", code, *args]


async def _throughput(t: _Topology, seconds: float) -> float:
    """One bulk TCP connection for ``seconds``: received bits per second."""
    receiver = await asyncio.create_subprocess_exec(
        *_in_netns(t.server, _RECEIVER, t.server_ip, str(PORT)), stdout=asyncio.subprocess.PIPE
    )
    assert receiver.stdout is not None
    if (await receiver.stdout.readline()).strip() != b"ready":
        raise BenchError("throughput receiver did not start")
    sender = await asyncio.create_subprocess_exec(
        *_in_netns(t.client, _SENDER, t.server_ip, str(PORT), str(seconds))
    )
    await sender.wait()
    out = (await receiver.stdout.readline()).split()
    await receiver.wait()
    if sender.returncode != 0 or len(out) != 2:
        raise BenchError("throughput run failed")
    received, elapsed = int(out[0]), float(out[1])
    return received * 8 / elapsed if elapsed > 0 else 0.0


@contextlib.asynccontextmanager
async def _serving(
    maps: FlowMaps, settings: FlowSettings, socket: Path | None = None
) -> AsyncIterator[FlowServer]:
    server = FlowServer("bench", settings, StaticResolver({}, {}), CollectorRegistry(), maps)
    api = ObserverServer(server)
    if socket is not None:
        await api.start(socket)
    task = asyncio.create_task(server.run(), name="bench-flow-server")
    try:
        deadline = time.monotonic() + 5
        while maps.configuration().aggregation != settings.aggregation:
            if time.monotonic() > deadline:
                raise BenchError("the flow server did not configure the programs")
            await asyncio.sleep(0.01)
        yield server
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await api.close()


def _packets(pin_dir: Path) -> int:
    counts = pinned_verdict_counts(pin_dir) or []
    return sum(c.packets for c in counts if c.reason == "allow_not_enforced")


async def _event_rate(
    t: _Topology, maps: FlowMaps, params: FlowBenchParams, rate: int, progress: Progress
) -> dict[str, Any]:
    sock = Path(f"/run/{t.pin_dir.name}.sock")
    settings = FlowSettings(
        capacity=params.buffer_size, aggregation=Aggregation.NONE, lost_poll_interval=0.25
    )
    async with _serving(maps, settings, sock) as server:
        reader = await asyncio.create_subprocess_exec(
            *_elsewhere(), sys.executable, "-c", _READER, str(sock),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert reader.stdout is not None and reader.stdin is not None
        if (await reader.stdout.readline()).strip() != b"ready":
            raise BenchError("GetFlows reader did not start")
        deadline = time.monotonic() + 5
        while server.readers < 1:
            if time.monotonic() > deadline:
                raise BenchError("GetFlows reader did not connect")
            await asyncio.sleep(0.01)
        lost0, seen0, packets0 = maps.lost_counts(), server.seen, _packets(t.pin_dir)
        gen = await asyncio.create_subprocess_exec(
            *_elsewhere(),
            *_in_netns(t.client, _UDP, t.server_ip, str(PORT), str(rate), str(params.seconds)),
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await gen.communicate()
        sent = int(out.split()[0]) if out.split() else 0
        packets = _packets(t.pin_dir) - packets0
        # let the server and the reader catch up (bounded)
        deadline = time.monotonic() + 10
        while server.seen - seen0 + _lost(maps, lost0) < packets:
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # the reader's last batch in flight
        reader.stdin.write(b"stop\n")
        await reader.stdin.drain()
        line = (await reader.stdout.readline()).split()
        await reader.wait()
        lost = maps.lost_counts()
        result = {
            "rate_pps": rate,
            "sent": sent,
            "program_packets": packets,
            "server_events": server.seen - seen0,
            "kernel_lost_ring_buffer": lost[LostReason.RINGBUF_FULL]
            - lost0[LostReason.RINGBUF_FULL],
            "kernel_lost_rate_limit": lost[LostReason.RATE_LIMIT] - lost0[LostReason.RATE_LIMIT],
            "reader_flows": int(line[0]) if line else 0,
            "reader_lost": int(line[1]) if len(line) > 1 else 0,
            "events_per_s": round((server.seen - seen0) / params.seconds),
            "reader_flows_per_s": round((int(line[0]) if line else 0) / params.seconds),
        }
        progress(f"flows: {rate:,} pps: {result}")
        return result


def _elsewhere() -> list[str]:
    """A command prefix that runs a child on the CPUs other than the flow server's (taskset,
    util-linux), when there are any and taskset is installed."""
    others = sorted(_ALL_CPUS - {_SERVER_CPU})
    if not others or shutil.which("taskset") is None:
        return []
    return ["taskset", "-c", ",".join(map(str, others))]


_ALL_CPUS: set[int] = set(os.sched_getaffinity(0))
_SERVER_CPU: Final = min(_ALL_CPUS)


def _lost(maps: FlowMaps, base: dict[LostReason, int]) -> int:
    now = maps.lost_counts()
    return sum(now[r] - base[r] for r in LostReason)


async def run_flows_bench(params: FlowBenchParams, progress: Progress) -> dict[str, Any]:
    reason = loader.datapath_unavailable_reason()
    if reason is not None:
        raise BenchError(f"cpctl bench flows needs the kernel datapath: {reason}")
    topology = _topology()  # (pyroute2 runs a loop of its own: set up in a thread)
    t = await asyncio.to_thread(topology.__enter__)
    try:
        maps = pinned_flow_maps(t.pin_dir)
        try:
            return await _run(t, maps, params, progress)
        finally:
            maps.close()
    finally:
        await asyncio.to_thread(topology.__exit__, None, None, None)


async def _run(
    t: _Topology, maps: FlowMaps, params: FlowBenchParams, progress: Progress
) -> dict[str, Any]:
    modes = (Aggregation.OFF, Aggregation.MEDIUM, Aggregation.NONE)
    rounds: dict[str, list[float]] = {m.name.lower(): [] for m in modes}
    await _throughput(t, 0.5)  # warm up
    for n in range(params.rounds):
        for mode in modes:
            async with _serving(maps, FlowSettings(aggregation=mode)):
                bps = await _throughput(t, params.seconds)
            rounds[mode.name.lower()].append(bps)
            progress(f"throughput round {n + 1}: {mode.name.lower()}: {bps / 1e9:.2f} Gbit/s")
    maps.configure(Aggregation.OFF, 0, 1, 5)
    medians = {m: statistics.median(v) for m, v in rounds.items()}
    ratios = {
        m: [round(r / o, 3) for r, o in zip(rounds[m], rounds["off"], strict=True)]
        for m in ("medium", "none")
    }
    cpu = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {_SERVER_CPU})  # the flow server on one core
    try:
        rates = [await _event_rate(t, maps, params, rate, progress) for rate in params.rates]
    finally:
        os.sched_setaffinity(0, cpu)
        maps.configure(Aggregation.OFF, 0, 1, 5)
    return {
        "bench": "flows",
        "kernel": os.uname().release,
        "cpus": len(cpu),
        "params": {"seconds": params.seconds, "rounds": params.rounds, "rates": params.rates},
        "throughput_bps": {
            m: {"median": round(v), "rounds": [round(x) for x in rounds[m]]}
            for m, v in medians.items()
        },
        "throughput_ratio": {
            m: {"median": round(medians[m] / medians["off"], 3), "rounds": ratios[m]}
            for m in ("medium", "none")
        },
        "event_rates": rates,
    }
