"""`cpctl bench lb`: the service load balancer, measured two ways in one run.

1. **Connections per second, direct vs VIP.** In a network namespace of its own, a server
   process accepts on a "pod" address (on the namespace's loopback) and a client process
   in a cgroup with the socket load balancer attached opens and closes TCP connections,
   one at a time, alternately to the pod address and to a service VIP whose one backend
   is that address, in interleaved rounds. Both clients pass the same cgroup hook (a pod
   always does), so the ratio is the cost of the translation itself. Needs root, a
   cgroup v2 mount and eBPF; skipped (and said so) otherwise.
2. **Store to map.** An agent (kernel maps under a temporary pin directory when root,
   else userspace maps) watches the services; the benchmark changes a service's backend
   set in the store ``changes`` times and takes, for each, the time from the put to the
   moment the agent flipped the new set into its map.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from ipaddress import IPv4Address
from pathlib import Path
from typing import Final

from controlplane.agent.agent import Agent
from controlplane.agent.settings import AgentSettings, DatapathMode
from controlplane.bench.common import BenchError, Progress, Record, latency_summary_ms
from controlplane.config import KvstoreConfig
from controlplane.datapath import loader
from controlplane.datapath.lbmap import (
    BackendAddr,
    FrontendAddr,
    close_lb_maps,
    pinned_lb_maps,
    unpin_lb_maps,
)
from controlplane.datapath.sock_lb import attach_sock_lb, cgroup2_mount, detach_sock_lb
from controlplane.ipam.cidr import ClusterPoolAllocator
from controlplane.kvstore.ipam import KvCIDRStore
from controlplane.kvstore.keys import KeyLayout
from controlplane.kvstore.services import KvServiceStore
from controlplane.kvstore.shards import ShardMap
from controlplane.metrics import StoreMetrics
from controlplane.model import CIDRPool, NodeName, Service, parse_ip

__all__ = ["run_lb_bench"]

POD_IP: Final = "10.200.0.2"
VIP: Final = "10.96.200.1"
PORT: Final = 8080
VIP_PORT: Final = 80
TCP: Final = 6
NODE: Final = NodeName("bench-lb")

_SERVER: Final = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(4096)
print("ready", flush=True)
while True:
    c, _ = s.accept(); c.close()
"""
_CLIENT: Final = """
import os, socket, sys, time
open(os.path.join(sys.argv[1], "cgroup.procs"), "w").write(str(os.getpid()))
for line in sys.stdin:
    ip, port, n = line.split(); port, n = int(port), int(n)
    t0 = time.perf_counter()
    for _ in range(n):
        c = socket.socket(); c.connect((ip, port)); c.recv(1); c.close()
    print(n / (time.perf_counter() - t0), flush=True)
"""


def _run(*argv: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.returncode}")


def connection_unavailable() -> str | None:
    """Why the connection-rate half cannot run here, or None."""
    reason = loader.datapath_unavailable_reason()
    if reason is not None:
        return reason
    if cgroup2_mount() is None:
        return "no cgroup v2 mount (the socket load balancer hangs on one)"
    if not Path("/usr/bin/nsenter").exists() and not Path("/bin/nsenter").exists():
        return "nsenter not found"
    return None


@contextlib.contextmanager
def _lb_sandbox(progress: Progress) -> Iterator[tuple[str, Path]]:
    """A network namespace with the pod address, a cgroup with the socket LB attached and
    a service VIP:80 -> pod:8080; yields (netns, cgroup); removes everything after."""
    tok = secrets.token_hex(3)
    netns = f"cpbench-lb-{tok}"
    root = cgroup2_mount()
    assert root is not None
    cgroup = root / f"cpbench-lb-{tok}"
    pin_dir = Path(f"/sys/fs/bpf/cpbench-lb-{tok}")
    try:
        _run("ip", "netns", "add", netns)
        _run("ip", "-n", netns, "link", "set", "lo", "up")
        _run("ip", "-n", netns, "addr", "add", f"{POD_IP}/32", "dev", "lo")
        cgroup.mkdir()
        maps = pinned_lb_maps(pin_dir)
        try:
            attach_sock_lb(pin_dir, cgroup)
            fe = FrontendAddr(IPv4Address(VIP), VIP_PORT, TCP)
            if not maps.sync({fe: [BackendAddr(IPv4Address(POD_IP), PORT)]}):
                raise BenchError("could not write the load-balancer maps")
        finally:
            close_lb_maps(maps)
        progress(f"socket LB attached to {cgroup}; service {VIP}:{VIP_PORT} -> {POD_IP}:{PORT}")
        yield netns, cgroup
    finally:
        detach_sock_lb(pin_dir)
        unpin_lb_maps(pin_dir)
        with contextlib.suppress(OSError):
            pin_dir.rmdir()
        subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)
        with contextlib.suppress(OSError):
            cgroup.rmdir()


async def _connection_rates(connections: int, rounds: int, progress: Progress) -> Record:
    with _lb_sandbox(progress) as (netns, cgroup):
        enter = ["nsenter", f"--net=/run/netns/{netns}", sys.executable, "-c"]
        server = await asyncio.create_subprocess_exec(
            *enter, _SERVER, POD_IP, str(PORT), stdout=asyncio.subprocess.PIPE
        )
        client = await asyncio.create_subprocess_exec(
            *enter,
            _CLIENT,
            str(cgroup),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert server.stdout is not None and client.stdin is not None
            assert client.stdout is not None
            if await asyncio.wait_for(server.stdout.readline(), 30) != b"ready\n":
                raise BenchError("the benchmark's server did not start")
            rates: dict[str, list[float]] = {"direct": [], "vip": []}
            for r in range(rounds):
                for side, (ip, port) in (("direct", (POD_IP, PORT)), ("vip", (VIP, VIP_PORT))):
                    client.stdin.write(f"{ip} {port} {connections}\n".encode())
                    await client.stdin.drain()
                    line = await asyncio.wait_for(client.stdout.readline(), 300)
                    if not line:
                        raise BenchError(f"the benchmark's client failed ({side}, round {r + 1})")
                    rates[side].append(float(line))
                progress(
                    f"round {r + 1}/{rounds}: direct {rates['direct'][-1]:,.0f}/s, "
                    f"VIP {rates['vip'][-1]:,.0f}/s"
                )
        finally:
            for proc in (client, server):
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
    direct, vip = statistics.median(rates["direct"]), statistics.median(rates["vip"])
    return {
        "connections_per_round": connections,
        "rounds": rounds,
        "direct_per_s": round(direct),
        "vip_per_s": round(vip),
        "ratio": round(vip / direct, 3),
        "direct_rounds": [round(x) for x in rates["direct"]],
        "vip_rounds": [round(x) for x in rates["vip"]],
    }


def _background(i: int) -> Service:
    """The i-th of the services that only sit in the maps (four backends each)."""
    return Service.from_dict({
        "namespace": "bench",
        "name": f"bg-{i}",
        "cluster_ip": f"10.97.{i // 250}.{i % 250 + 1}",
        "frontends": [{"port": VIP_PORT, "protocol": "TCP"}],
        "backends": [{"ip": f"10.202.{i // 250}.{i % 250 + 1}", "port": PORT + n}
                     for n in range(4)],
    })  # fmt: skip


def _service(i: int) -> Service:
    """The benchmark's service with its i-th backend set (two backends, one new each time)."""
    return Service.from_dict({
        "namespace": "bench",
        "name": "lb",
        "cluster_ip": VIP,
        "frontends": [{"port": VIP_PORT, "protocol": "TCP"}],
        "backends": [{"ip": f"10.201.{i // 250 % 250}.{i % 250 + 1}", "port": PORT},
                     {"ip": "10.201.255.1", "port": PORT}],
    })  # fmt: skip


async def _store_to_map(
    config: KvstoreConfig, changes: int, background: int, progress: Progress
) -> Record:
    kernel = os.geteuid() == 0 and loader.datapath_unavailable_reason() is None
    layout = KeyLayout(config.prefix)
    with tempfile.TemporaryDirectory(prefix="cpbench-lb-") as tmp:
        pin_dir = Path(f"/sys/fs/bpf/cpbench-lb-agent-{secrets.token_hex(3)}")
        settings = replace(
            AgentSettings(node=NODE, node_ips=(parse_ip("127.0.0.201"),)),
            api_socket=Path(tmp) / "agent.sock",
            telemetry_port=None,
            datapath=DatapathMode.KERNEL if kernel else DatapathMode.USERSPACE,
            bpf_pin_dir=pin_dir,
            cleanup_on_exit=True,
        )
        async with ShardMap(config, own_connection=True) as shards:
            metrics = StoreMetrics.create()
            allocator = ClusterPoolAllocator(KvCIDRStore(shards, layout, metrics), CIDRPool())
            await allocator.restore()
            await allocator.allocate(NODE)  # what the operator would do
            store = KvServiceStore(shards, layout, metrics)
            agent = Agent(settings, config)
            task = asyncio.create_task(agent.run(), name="bench-lb-agent")
            samples: list[float] = []
            fe = FrontendAddr(IPv4Address(VIP), VIP_PORT, TCP)
            try:
                await asyncio.wait_for(agent.wait_ready(), 60)
                progress(f"agent ready ({'kernel' if kernel else 'userspace'} maps)")
                for start in range(0, background, 100):
                    chunk = range(start, min(start + 100, background))
                    await asyncio.gather(*(store.put(_background(i)) for i in chunk))
                deadline = time.monotonic() + 60
                while len(agent.lb_maps.frontend_ids) < background:
                    if time.monotonic() > deadline:
                        raise BenchError(f"{background} services not in the map within 60 s")
                    await asyncio.sleep(0.01)
                if background:
                    progress(f"{background} other services in the maps")
                for i in range(changes):
                    t0 = time.monotonic()
                    await store.put(_service(i))
                    deadline = t0 + 10
                    while agent.services.written_at.get(fe, 0.0) < t0:
                        if time.monotonic() > deadline:
                            raise BenchError(f"change {i} did not reach the map within 10 s")
                        await asyncio.sleep(0.0005)
                    samples.append(agent.services.written_at[fe] - t0)
            finally:
                with contextlib.suppress(Exception):
                    for start in range(0, background, 100):
                        chunk = range(start, min(start + 100, background))
                        await asyncio.gather(*(store.delete("bench", f"bg-{i}") for i in chunk))
                    await store.delete("bench", "lb")
                agent.stop()
                await asyncio.gather(task, return_exceptions=True)
                _remove_empty_dir(pin_dir)  # the agent's cleanup unpinned its maps
    progress(f"{changes} backend changes measured")
    return {
        "changes": changes,
        "other_services": background,
        "maps": "kernel" if kernel else "userspace",
        **latency_summary_ms(samples, 2),
    }


def _remove_empty_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()


async def run_lb_bench(
    config: KvstoreConfig,
    *,
    connections: int,
    rounds: int,
    changes: int,
    background: int,
    progress: Progress,
) -> Record:
    """Both halves; the connection half is skipped with its reason where it cannot run."""
    record: Record = {"benchmark": "lb"}
    skip = connection_unavailable()
    if skip is None:
        record["connections"] = await _connection_rates(connections, rounds, progress)
    else:
        progress(f"connections per second: skipped ({skip})")
        record["connections"] = {"skipped": skip}
    record["store_to_map"] = await _store_to_map(config, changes, background, progress)
    return record
