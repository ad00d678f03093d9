"""Identity allocation throughput, kvstore and CRD mode side by side, each next to its raw
operations, in one run.

kvstore mode, for each allocator count: new identities/s and references to existing
identities/s through ``KvIdentityStore``, and raw transactions of the same shape through
the same client at the same concurrency, in interleaved rounds (ours, raw, raw, ours, ...)
on one cluster, as shared/BENCHMARKING.md requires. Every allocator is a node of its own
(its own name and lease) sharing one connection, exactly like the raw side's workers.

CRD mode, the same counts on a local Kubernetes API server (a `cpctl kube up` process on
the same etcd): new identities/s and acquisitions of existing label sets/s through
``CrdIdentityStore`` (one store per node, all on one ``KubeClient``), next to raw creates
of Identity objects of the same shape and raw label-selector lists through the same
client. The modes' measurements interleave too.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controlplane.bench.common import (
    STORE_MODES,
    BenchError,
    Progress,
    delete_in_chunks,
    package_version,
)
from controlplane.bench.kubeserver import KubeServerInfo, kube_server, prepare
from controlplane.config import KvstoreConfig
from controlplane.crd.client import KubeClient
from controlplane.crd.errors import CrdError
from controlplane.crd.identities import CrdIdentityStore, identity_object
from controlplane.crd.names import identity_name, labels_selector
from controlplane.crd.resources import IDENTITIES
from controlplane.kvstore.backend import EtcdBackend
from controlplane.kvstore.identities import KvIdentityStore
from controlplane.kvstore.keys import KeyLayout
from controlplane.kvstore.owner import Owners
from controlplane.kvstore.shards import ShardMap
from controlplane.kvstore.types import Put, absent, value_is
from controlplane.metrics import StoreMetrics
from controlplane.model import Identity, Labels, NodeName, NumericIdentity
from controlplane.model.identity import cluster_identity_range

MODES = STORE_MODES


@dataclass(frozen=True, slots=True)
class IdentityBenchParams:
    allocators: tuple[int, ...] = (1, 16, 64)
    count: int = 1000
    """Identities (and references) per measurement."""
    labels: int = 4
    """Labels per label set."""
    rounds: int = 3
    stores: tuple[str, ...] = ("kvstore",)
    """Modes measured side by side: kvstore, crd."""

    def __post_init__(self) -> None:
        if not self.stores or any(s not in MODES for s in self.stores):
            raise ValueError(f"stores: want some of {', '.join(MODES)}")
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
    failures: list[str] = field(default_factory=list)
    """Measurements that failed (CRD mode: the API server gave up), one line each."""

    def summary(
        self, raw_new: str = "raw_new_txn_per_s", raw_ref: str = "raw_ref_txn_per_s"
    ) -> dict[str, Any]:
        """Medians of the rounds that completed (None: none did); ``raw_new``/``raw_ref``
        name the raw side's rates (txns, creates, lists)."""
        new_ours, new_raw = _median(self.new_ours), _median(self.new_raw)
        ref_ours, ref_raw = _median(self.ref_ours), _median(self.ref_raw)
        return {
            "allocators": self.allocators,
            "new_per_s": _rounded(new_ours, 1),
            raw_new: _rounded(new_raw, 1),
            "new_ratio": _ratio(new_ours, new_raw),
            "ref_per_s": _rounded(ref_ours, 1),
            raw_ref: _rounded(ref_raw, 1),
            "ref_ratio": _ratio(ref_ours, ref_raw),
            "failures": self.failures,
            "rounds": {
                "new_ours": self.new_ours,
                "new_raw": self.new_raw,
                "ref_ours": self.ref_ours,
                "ref_raw": self.ref_raw,
            },
        }


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 3)


async def _timed(workers: int, count: int, work: Callable[[int, int], Awaitable[None]]) -> float:
    """Run ``count`` operations split over ``workers``; returns operations per second."""
    share = [count // workers + (1 if w < count % workers else 0) for w in range(workers)]
    offsets = [sum(share[:w]) for w in range(workers)]

    async def worker(w: int) -> None:
        for i in range(offsets[w], offsets[w] + share[w]):
            await work(w, i)

    start = time.perf_counter()
    try:
        async with asyncio.TaskGroup() as group:
            for w in range(workers):
                group.create_task(worker(w))
    except ExceptionGroup as failed:  # the first worker's error, as one line can say it
        raise failed.exceptions[0] from failed
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
    kv_rows = [Row(n) for n in params.allocators]
    crd_rows = [Row(n) for n in params.allocators]
    load_start = os.getloadavg()
    async with AsyncExitStack() as stack:
        shards = await stack.enter_async_context(ShardMap(config, own_connection=True))
        backend = shards.shards("identities")[0]
        if len(shards.shards("identities")) > 1:
            raise BenchError("the identity benchmark measures one shard; map identities to one")
        status = await backend.status()
        metrics = StoreMetrics.create()
        client: KubeClient | None = None
        if "crd" in params.stores:
            workdir = Path(tempfile.mkdtemp(prefix="cp-bench-ids-"))
            server: KubeServerInfo = await stack.enter_async_context(
                kube_server(config.clusters[0].endpoints, workdir, progress)
            )
            await prepare(server, [], progress)
            client = await stack.enter_async_context(server.client(request_timeout=30.0))
        if "kvstore" in params.stores:
            stack.push_async_callback(delete_in_chunks, backend, layout.prefix.encode())
            stack.callback(progress, "cleaning up...")
        for round_no in range(params.rounds):
            for kv_row, crd_row in zip(kv_rows, crd_rows, strict=True):
                sides = [(m, kv_row if m == "kvstore" else crd_row) for m in params.stores]
                if round_no % 2:  # alternate which mode meets the etcd first
                    sides.reverse()
                for mode, row in sides:
                    if mode == "kvstore":
                        await _round(backend, shards, layout, metrics, params, row, run, round_no)
                        _say(progress, "kvstore", ("txn", "txn"), params, row, round_no)
                    else:
                        assert client is not None
                        if await _crd_round(client, metrics, params, row, run, round_no):
                            _say(progress, "crd", ("create", "list"), params, row, round_no)
                        else:
                            progress(f"crd allocators={row.allocators}: {row.failures[-1]}")
    record: dict[str, Any] = {
        "benchmark": "identities",
        "etcd_version": status.version,
        "endpoints": list(backend.cluster.endpoints),
        "python_packages": {
            p: package_version(p) for p in ("aetcd", "grpcio", "protobuf", "aiohttp")
        },
        "params": {
            "allocators": list(params.allocators),
            "count": params.count,
            "labels": params.labels,
            "rounds": params.rounds,
            "stores": list(params.stores),
        },
        "cpus": os.cpu_count(),
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "notes": [],
    }
    notes: list[str] = record["notes"]
    if "kvstore" in params.stores:
        record["results"] = [row.summary() for row in kv_rows]
        notes += [
            "kvstore: each allocator is its own node (name, lease) on one shared connection; "
            "the raw side's workers share the same connection",
            "kvstore: raw new = txn(2 absent compares; 3 puts, one leased); raw ref = txn(1 "
            "value compare; 2 puts, one leased): the shapes of our allocation and reference",
            "kvstore: references are taken by nodes whose identity view is synced (listed "
            "first), as a running agent's is",
        ]
    if "crd" in params.stores:
        record["crd_results"] = [
            row.summary("raw_create_per_s", "raw_list_per_s") for row in crd_rows
        ]
        notes += [
            "crd: each allocator is its own node's CrdIdentityStore, all on one KubeClient "
            "(one HTTPS connection pool, up to 64 connections) to a local API server process "
            "on the same etcd; the raw side uses the same client",
            "crd: new = acquire of a new label set (a label-selector list, a create, a list "
            "again to settle races); raw new = a create of an Identity object of the same "
            "shape; ref = acquire of an existing label set (one label-selector list); raw "
            "ref = that list alone",
            "crd: a label-selector list reads every Identity (the API server filters them), "
            "so its cost grows with the identities present: new meets 0 -> count of them "
            "(plus one per allocator), ref and raw list meet count; raw creates are deleted "
            "before the next measurement",
        ]
    if "results" in record and "crd_results" in record:
        record["crd_vs_kvstore"] = [
            {
                "allocators": kv["allocators"],
                "new_ratio": _ratio(crd["new_per_s"], kv["new_per_s"]),
                "ref_ratio": _ratio(crd["ref_per_s"], kv["ref_per_s"]),
            }
            for kv, crd in zip(record["results"], record["crd_results"], strict=True)
        ]
    return record


def _say(
    progress: Progress,
    store: str,
    raw: tuple[str, str],
    params: IdentityBenchParams,
    row: Row,
    round_no: int,
) -> None:
    progress(
        f"round {round_no + 1}/{params.rounds} {store} allocators={row.allocators}: "
        f"new {row.new_ours[-1]:.0f}/s vs raw {raw[0]} {row.new_raw[-1]:.0f}/s, "
        f"ref {row.ref_ours[-1]:.0f}/s vs raw {raw[1]} {row.ref_raw[-1]:.0f}/s"
    )


async def _crd_round(
    client: KubeClient,
    metrics: StoreMetrics,
    params: IdentityBenchParams,
    row: Row,
    run: str,
    round_no: int,
) -> bool:
    """One CRD-mode measurement of each kind; every Identity it made is deleted after.
    False when one failed (in ``row.failures``; the round's later ones are skipped)."""
    n, count = row.allocators, params.count
    tag = f"r{round_no}a{n}c"
    made: set[int] = set()

    async def ours(side: str) -> float:
        stores = [
            CrdIdentityStore(client, metrics, node=NodeName(f"{tag}-{side}-{w}")) for w in range(n)
        ]
        for w, store in enumerate(stores):
            # The first acquire lists every identity (the store's view of used IDs): keep it
            # out of the timing, as a running agent has done it long before.
            made.add((await store.acquire(_labels(run, f"{tag}-{side}-warm", w, 1))).id)

        async def one(w: int, i: int) -> None:
            made.add((await stores[w].acquire(_labels(run, tag, i, params.labels))).id)

        return await _timed(n, count, one)

    async def ours_new() -> None:
        row.new_ours.append(await ours("new"))

    async def ours_ref() -> None:
        row.ref_ours.append(await ours("ref"))

    ids = cluster_identity_range()

    async def raw_new() -> None:
        free = (i for i in range(ids.last, ids.first, -1) if i not in made)
        chosen = [next(free) for _ in range(count)]
        made.update(chosen)

        async def one(w: int, i: int) -> None:
            labels = _labels(run, f"{tag}-raw", i, params.labels)
            await client.create(
                IDENTITIES, identity_object(Identity(NumericIdentity(chosen[i]), labels))
            )

        row.new_raw.append(await _timed(n, count, one))
        # Gone before the next measurement: a label-selector list reads every Identity, so
        # each measurement must meet the same number of them, whichever order they run in.
        await _delete_identities(client, chosen)
        made.difference_update(chosen)

    async def raw_ref() -> None:
        async def one(w: int, i: int) -> None:
            found = await client.list(
                IDENTITIES, label_selector=labels_selector(_labels(run, tag, i, params.labels))
            )
            if len(found.items) != 1:
                raise BenchError(f"raw list: {len(found.items)} identities for one label set")

        row.ref_raw.append(await _timed(n, count, one))

    order = [ours_new, raw_new, raw_ref, ours_ref]
    if round_no % 2:
        order = [raw_new, ours_new, ours_ref, raw_ref]
    try:
        for measure in order:
            try:
                await measure()
            except CrdError as exc:  # a result too: the rest of this round is skipped
                row.failures.append(f"round {round_no + 1} {measure.__name__}: {exc}")
                return False
    finally:
        await _delete_identities(client, sorted(made))
    return True


async def _delete_identities(client: KubeClient, ids: Sequence[int], workers: int = 32) -> None:
    pending = iter(ids)

    async def worker() -> None:
        for ident in pending:
            for attempt in range(5):  # an API server still busy with a failed measurement
                try:
                    await client.delete(IDENTITIES, identity_name(ident))
                    break
                except CrdError:
                    if attempt == 4:
                        raise
                    await asyncio.sleep(1 + attempt)

    async with asyncio.TaskGroup() as group:
        for _ in range(workers):
            group.create_task(worker())


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
