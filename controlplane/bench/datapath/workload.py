"""What the datapath benchmark works on: :class:`DatapathBenchParams`, the simulated
endpoints spread over simulated nodes, and loading their records into etcd."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from ipaddress import IPv4Address

from controlplane.bench.common import Progress
from controlplane.datapath.ipcache import IPCACHE_MAX_ENTRIES
from controlplane.kvstore.backend import EtcdBackend
from controlplane.kvstore.endpoints import KvEndpointStore
from controlplane.kvstore.types import Put
from controlplane.model import Endpoint, NodeName, NumericIdentity

PUTS_PER_TXN = 100
"""Puts per loading transaction (etcd allows 128 operations per txn)."""
LOAD_CONCURRENCY = 16
NODES = 50
"""Simulated nodes the endpoints are spread over."""
BENCH_NODE = NodeName("bench-agent")
"""The node the benchmark's reconciler stands in for: none of the endpoints is its own."""
FIRST_IP = int(IPv4Address("10.0.0.1"))


@dataclass(frozen=True, slots=True)
class DatapathBenchParams:
    count: int = 100_000
    rounds: int = 2
    page_size: int = 10_000
    updates: int = 500
    """Single endpoint updates for the latency measurement."""
    rate: float = 100.0
    """Updates per second (a steady pace)."""
    kernel: bool | None = None
    """None: the kernel map when usable, else userspace; False: userspace."""
    wait_timeout: float = 60.0

    def __post_init__(self) -> None:
        if self.count < 1 or self.rounds < 1 or self.page_size < 1 or self.updates < 1:
            raise ValueError("count, rounds, page size and updates must be positive")
        if self.updates > self.count:
            raise ValueError(f"--updates ({self.updates}) cannot exceed --count ({self.count})")
        if self.count > IPCACHE_MAX_ENTRIES:
            raise ValueError(f"--count above the ipcache's {IPCACHE_MAX_ENTRIES} entries")


def bench_endpoint(i: int, identity: int | None = None) -> Endpoint:
    node = i % NODES
    return Endpoint(
        ip=IPv4Address(FIRST_IP + i),
        identity=NumericIdentity(identity if identity is not None else 1000 + i % 5000),
        node=NodeName(f"bench-node-{node}"),
        host_ip=IPv4Address(int(IPv4Address("192.168.0.1")) + node),
        name=f"pod-{i}",
        namespace="bench",
    )


async def _load(
    backend: EtcdBackend, store: KvEndpointStore, params: DatapathBenchParams, progress: Progress
) -> None:
    started = time.perf_counter()
    progress(f"loading {params.count} endpoint records ({PUTS_PER_TXN} puts per txn)...")
    done = 0
    next_note = 0
    limit = asyncio.Semaphore(LOAD_CONCURRENCY)

    async def one(start: int) -> None:
        nonlocal done, next_note
        ops = []
        for i in range(start, min(start + PUTS_PER_TXN, params.count)):
            endpoint = bench_endpoint(i)
            ops.append(Put(store.key(endpoint.ip), store.codec.encode(endpoint.to_dict())))
        async with limit:
            await backend.txn([], ops)
        done += len(ops)
        if done >= next_note:
            progress(f"  loaded {done}/{params.count}")
            next_note += max(10_000, params.count // 10)

    await asyncio.gather(*(one(s) for s in range(0, params.count, PUTS_PER_TXN)))
    progress(f"loaded {params.count} in {time.perf_counter() - started:.1f}s")
