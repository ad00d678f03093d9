"""Identity allocation throughput next to raw etcd transactions, in one run.

For each allocator count: new identities/s and references to existing identities/s through
``KvIdentityStore``, and raw transactions of the same shape through the same client at the
same concurrency, in interleaved rounds (ours, raw, raw, ours, ...) on one cluster, as
shared/BENCHMARKING.md requires. Every allocator is a node of its own (its own name and
lease) sharing one connection, exactly like the raw side's workers.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from controlplane.bench.common import BenchError, Progress, delete_in_chunks, package_version
from controlplane.config import KvstoreConfig
from controlplane.kvstore.backend import EtcdBackend
from controlplane.kvstore.identities import KvIdentityStore
from controlplane.kvstore.keys import KeyLayout
from controlplane.kvstore.owner import Owners
from controlplane.kvstore.shards import ShardMap
from controlplane.kvstore.types import Put, absent, value_is
from controlplane.metrics import StoreMetrics
from controlplane.model import Labels, NodeName


@dataclass(frozen=True, slots=True)
class IdentityBenchParams:
    allocators: tuple[int, ...] = (1, 16, 64)
    count: int = 1000
    """Identities (and references) per measurement."""
    labels: int = 4
    """Labels per label set."""
    rounds: int = 3

    def __post_init__(self) -> None:
        if not self.allocators or min(self.allocators) < 1:
            raise ValueError("allocator counts must be positive")
        if self.count < max(self.allocators):
            raise ValueError("count must be at least the largest allocator count")
        if self.labels < 1 or self.rounds < 1:
            raise ValueError("labels and rounds must be positive")


@dataclass(slots=True)
class Row:
    allocators: int
    new_ours: list[float] = field(default_factory=list)
    new_raw: list[float] = field(default_factory=list)
    ref_ours: list[float] = field(default_factory=list)
    ref_raw: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        new_ours, new_raw = statistics.median(self.new_ours), statistics.median(self.new_raw)
        ref_ours, ref_raw = statistics.median(self.ref_ours), statistics.median(self.ref_raw)
        return {
            "allocators": self.allocators,
            "new_per_s": round(new_ours, 1),
            "raw_new_txn_per_s": round(new_raw, 1),
            "new_ratio": round(new_ours / new_raw, 3),
            "ref_per_s": round(ref_ours, 1),
            "raw_ref_txn_per_s": round(ref_raw, 1),
            "ref_ratio": round(ref_ours / ref_raw, 3),
            "rounds": {
                "new_ours": self.new_ours,
                "new_raw": self.new_raw,
                "ref_ours": self.ref_ours,
                "ref_raw": self.ref_raw,
            },
        }


async def _timed(workers: int, count: int, work: Callable[[int, int], Awaitable[None]]) -> float:
    """Run ``count`` operations split over ``workers``; returns operations per second."""
    share = [count // workers + (1 if w < count % workers else 0) for w in range(workers)]
    offsets = [sum(share[:w]) for w in range(workers)]

    async def worker(w: int) -> None:
        for i in range(offsets[w], offsets[w] + share[w]):
            await work(w, i)

    start = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for w in range(workers):
            group.create_task(worker(w))
    return count / (time.perf_counter() - start)


def _labels(run: str, tag: str, i: int, per_set: int) -> Labels:
    return Labels.from_strings(
        [f"k8s:bench={run}-{tag}-{i}"] + [f"k8s:l{j}=v{j}" for j in range(1, per_set)]
    )


@asynccontextmanager
async def _nodes(
    shards: ShardMap, layout: KeyLayout, metrics: StoreMetrics, names: Sequence[str]
) -> AsyncIterator[list[KvIdentityStore]]:
    """One identity store per node name; their leases are revoked afterwards."""
    owners = [Owners(metrics) for _ in names]
    stores = [
        KvIdentityStore(shards, layout, metrics, o, node=NodeName(name))
        for o, name in zip(owners, names, strict=True)
    ]
    try:
        yield stores
    finally:
        for o in owners:
            for owner in o.all():
                await owner.leases.revoke_all()


async def run_identity_bench(
    config: KvstoreConfig, params: IdentityBenchParams, progress: Progress
) -> dict[str, Any]:
    run = uuid.uuid4().hex[:8]
    # A prefix of our own: the run's keys never mix with a live cluster's identities.
    layout = KeyLayout(f"{config.prefix}bench-identities/{run}/")
    rows = [Row(n) for n in params.allocators]
    async with ShardMap(config, own_connection=True) as shards:
        backend = shards.shards("identities")[0]
        if len(shards.shards("identities")) > 1:
            raise BenchError("the identity benchmark measures one shard; map identities to one")
        status = await backend.status()
        metrics = StoreMetrics.create()
        try:
            for round_no in range(params.rounds):
                for row in rows:
                    await _round(backend, shards, layout, metrics, params, row, run, round_no)
                    progress(
                        f"round {round_no + 1}/{params.rounds} allocators={row.allocators}: "
                        f"new {row.new_ours[-1]:.0f}/s vs raw {row.new_raw[-1]:.0f}/s, "
                        f"ref {row.ref_ours[-1]:.0f}/s vs raw {row.ref_raw[-1]:.0f}/s"
                    )
        finally:
            progress("cleaning up...")
            await delete_in_chunks(backend, layout.prefix.encode())
    return {
        "benchmark": "identities",
        "etcd_version": status.version,
        "endpoints": list(backend.cluster.endpoints),
        "python_packages": {p: package_version(p) for p in ("aetcd", "grpcio", "protobuf")},
        "params": {
            "allocators": list(params.allocators),
            "count": params.count,
            "labels": params.labels,
            "rounds": params.rounds,
        },
        "notes": [
            "each allocator is its own node (name, lease) on one shared connection; the raw "
            "side's workers share the same connection",
            "raw new = txn(2 absent compares; 3 puts, one leased); raw ref = txn(1 value "
            "compare; 2 puts, one leased): the shapes of our allocation and reference",
            "references are taken by nodes whose identity view is synced (listed first), as "
            "a running agent's is",
        ],
        "results": [row.summary() for row in rows],
    }


async def _round(
    backend: EtcdBackend,
    shards: ShardMap,
    layout: KeyLayout,
    metrics: StoreMetrics,
    params: IdentityBenchParams,
    row: Row,
    run: str,
    round_no: int,
) -> None:
    n, count = row.allocators, params.count
    tag = f"r{round_no}a{n}"
    leases = [(await backend.grant(600)).id for _ in range(n)]

    async def ours(side: str, synced: bool) -> float:
        async with _nodes(
            shards, layout, metrics, [f"{tag}-{side}-{w}" for w in range(n)]
        ) as stores:
            for w, store in enumerate(stores):
                if synced:
                    await store.list()  # a synced view, as a running agent has
                # The first acquire grants the node's lease: keep it out of the timing.
                await store.acquire(_labels(run, f"{tag}-warm", w, params.labels))

            async def one(w: int, i: int) -> None:
                await stores[w].acquire(_labels(run, tag, i, params.labels))

            return await _timed(n, count, one)

    async def ours_new() -> None:
        row.new_ours.append(await ours("new", synced=False))

    async def ours_ref() -> None:
        row.ref_ours.append(await ours("ref", synced=True))

    raw = f"{layout.prefix}raw/{tag}/".encode()

    async def raw_new() -> None:
        async def one(w: int, i: int) -> None:
            a, b = raw + b"index/%d" % i, raw + b"id/%d" % i
            ok = await backend.txn(
                [absent(a), absent(b)],
                [Put(a, b"%d" % i), Put(b, b"labels"), Put(raw + b"value/%d" % i, b"x", leases[w])],
            )
            if not ok.succeeded:
                raise BenchError("raw create transaction failed")

        row.new_raw.append(await _timed(n, count, one))

    async def raw_ref() -> None:
        async def one(w: int, i: int) -> None:
            a = raw + b"index/%d" % i
            ok = await backend.txn(
                [value_is(a, b"%d" % i)],
                [Put(a, b"%d" % i), Put(raw + b"ref/%d/%d" % (w, i), b"x", leases[w])],
            )
            if not ok.succeeded:
                raise BenchError("raw reference transaction failed")

        row.ref_raw.append(await _timed(n, count, one))

    # Alternate who goes first, so neither side always meets a fresher etcd.
    order = [ours_new, raw_new, raw_ref, ours_ref]
    if round_no % 2:
        order = [raw_new, ours_new, ours_ref, raw_ref]
    for measure in order:
        await measure()
    for lease in leases:
        await backend.revoke(lease)
