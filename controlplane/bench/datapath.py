"""`cpctl bench datapath`: endpoints from etcd into the ipcache map, next to a bare list.

(a) Cold sync: N endpoint records (the agents' ``endpoint`` envelopes, written beforehand
under a bench-only prefix) are read in interleaved rounds, in rotating order (A B C, then
B C A, then C A B): A is a bare
paginated aetcd Range list of the prefix at one revision, decoding the envelope only; B is
our pipeline: the same pages through :class:`EtcdBackend` (the next page requested while
one is processed), each record checked and decoded as the agent's store does it
(:meth:`KvEndpointStore.build_ip_identity`: every rule of an Endpoint), turned into
ipcache entries and written by an :class:`IpcacheReconciler` (begin_resync, set per page,
flushed by its ``run`` loop as in the agent, end_resync) into a fresh, unpinned kernel LPM
trie made like the agent's ``cp_ipcache`` (or a userspace map without root/eBPF, which the
record says), same page size as A; C is the agent's own path on a cold start:
``watch_ip_identities()`` (ListWatcher list -> store events, one per key) applied by the
agent's :class:`EndpointMirror`, flushed by the reconciler's ``run`` loop, until SYNCED.
The clock stops before the map is counted (counting reads the whole map back).

(b) Watch event -> map update latency: KvEndpointStore's ListWatcher-based watch feeds the
reconciler (its ``run`` loop) into the map; K single endpoint updates are put at a steady
pace, each changing the identity, and the time from issuing the put to the reconciler's
``written_at`` for the entry (host-wide monotonic clock) is the latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import platform
import statistics
import time
import tracemalloc
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from ipaddress import IPv4Address
from typing import Any, TypeVar

import aetcd
from aetcd import rpc
from prometheus_client import CollectorRegistry

from controlplane import codec
from controlplane.agent.endpoint_mirror import ENDPOINT_PRIORITY, EndpointMirror, endpoint_entry
from controlplane.bench.common import (
    BenchError,
    Progress,
    Record,
    bare_endpoint,
    delete_in_chunks,
    latency_summary_ms,
    package_version,
    utc_stamp,
)
from controlplane.config import KvstoreConfig
from controlplane.datapath.bpf_syscall import BPF_MAP_TYPE_LPM_TRIE
from controlplane.datapath.capabilities import detect_datapath
from controlplane.datapath.ipcache import (
    IPCACHE_MAP_NAME,
    IPCACHE_MAX_ENTRIES,
    KEY_SIZE,
    VALUE_SIZE,
    Ipcache,
    ip_identity_key,
    ip_identity_value,
    userspace_ipcache,
)
from controlplane.datapath.kernel import KernelMap
from controlplane.datapath.reconciler import IpcacheReconciler
from controlplane.kvstore.backend import LIST_PAGE_SIZE, EtcdBackend
from controlplane.kvstore.endpoints import ENDPOINT_KIND, KvEndpointStore
from controlplane.kvstore.errors import KvstoreError
from controlplane.kvstore.keys import KeyLayout
from controlplane.kvstore.shards import ShardMap
from controlplane.kvstore.types import Put, prefix_range_end
from controlplane.metrics import StoreMetrics
from controlplane.model import Endpoint, NodeName, NumericIdentity
from controlplane.runtime import GC_THRESHOLDS, tune_gc

R = TypeVar("R")

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


def _rate_stats(rates: list[float]) -> dict[str, Any]:
    return {"median": round(statistics.median(rates)), "rounds": [round(r) for r in rates]}


class _Datapath:
    """Fresh ipcache maps of one kind: kernel LPM tries (unpinned) or userspace."""

    def __init__(self, want_kernel: bool | None) -> None:
        support = detect_datapath()
        self.kernel = support.kernel and want_kernel is not False
        self.reason = "--userspace" if want_kernel is False else support.reason

    def new(self) -> Ipcache:
        if not self.kernel:
            return userspace_ipcache()
        kmap = KernelMap.create(
            IPCACHE_MAP_NAME, BPF_MAP_TYPE_LPM_TRIE, KEY_SIZE, VALUE_SIZE, IPCACHE_MAX_ENTRIES
        )
        return Ipcache(kmap)

    @staticmethod
    def close(ipcache: Ipcache) -> None:
        if isinstance(ipcache.map, KernelMap):
            ipcache.map.close()


async def run_datapath_bench(
    config: KvstoreConfig, params: DatapathBenchParams, progress: Progress
) -> dict[str, Any]:
    run = f"{utc_stamp()}-{uuid.uuid4().hex[:6]}"
    bench_prefix = f"{config.prefix}bench-datapath/{run}/"
    layout = KeyLayout(bench_prefix)
    datapath = _Datapath(params.kernel)
    progress(f"datapath: {'kernel' if datapath.kernel else 'userspace'} maps ({datapath.reason})")
    cluster = config.clusters[0]
    async with ShardMap(config, own_connection=True) as shards:
        store = KvEndpointStore(
            shards, layout, StoreMetrics.create(CollectorRegistry()), None, node=None
        )
        backend = shards.shards("endpoints")[0]
        try:
            status = await backend.status()
            record: dict[str, Any] = {
                "benchmark": "datapath",
                "started_at": run,
                "etcd_version": status.version,
                "etcd_members": len(await backend.members()),
                "endpoint": cluster.endpoints[0],
                "datapath": "kernel" if datapath.kernel else "userspace",
                "datapath_reason": datapath.reason,
                "kernel": platform.release(),
                "python": platform.python_version(),
                "aetcd": package_version("aetcd"),
                "gc_thresholds": list(GC_THRESHOLDS),
                "grpcio": package_version("grpcio"),
                "params": asdict(params),
                "prefix": bench_prefix,
            }
            await _load(backend, store, params, progress)
            record["cold_sync"] = await _cold_sync(backend, store, datapath, params, progress)
            record["watch_latency"] = await _latency(backend, store, datapath, params, progress)
        finally:
            progress(f"deleting {bench_prefix} in chunks...")
            with contextlib.suppress(KvstoreError):
                record_deleted = await delete_in_chunks(backend, bench_prefix.encode())
                progress(f"deleted {record_deleted} keys")
    record["notes"] = [
        "cold sync: A = bare aetcd Range pages at one revision, envelope decode only; "
        "B = EtcdBackend pages at one revision (next page prefetched) + record decode with "
        "every Endpoint check (KvEndpointStore.build_ip_identity) + "
        "ipcache entries + IpcacheReconciler begin_resync/set per page/end_resync into a "
        "fresh map, flushed meanwhile by reconciler.run as in the agent (flushes of 256+ "
        "entries written behind on a worker thread; list_s includes the loop's share of "
        "them); the clock stops before the map is counted; same page size; C = the agent's "
        "watch path (KvEndpointStore.watch_ip_identities: ListWatcher batches -> store event "
        "batches -> the agent's EndpointMirror, its cache and reconciler.set_entries, "
        "flushed by reconciler.run) until SYNCED, at the agent's list page size; rounds "
        "interleaved in rotating order (A B C, B C A, C A B, ...); one process; the agent's "
        "GC thresholds",
        "watch latency: put issued (monotonic, just before the put) -> reconciler "
        "written_at for the entry (monotonic, when the write returned), beside each put's own "
        "round trip; the same watch path "
        "as C (EndpointMirror -> reconciler.set_entries), reconciler.run flushing; each "
        "update changes the identity",
    ]
    if not datapath.kernel:
        record["notes"].append(f"USERSPACE map, not the kernel: {datapath.reason}")
    return record


def prepare_datapath_run(
    params: DatapathBenchParams, progress: Progress
) -> Callable[[KvstoreConfig], Awaitable[Record]]:
    """What `cpctl bench datapath` measures with: this process takes the agent's GC settings
    now (its cold sync is what B and C stand in for), and the returned run reports store and
    etcd errors as :class:`BenchError`."""
    tune_gc()

    async def run(config: KvstoreConfig) -> Record:
        try:
            return await run_datapath_bench(config, params, progress)
        except (KvstoreError, aetcd.ClientError) as exc:
            raise BenchError(f"bench datapath: {type(exc).__name__}: {exc}") from exc

    return run


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


async def _bare_list(client: aetcd.Client, prefix: bytes, page_size: int) -> int:
    """A: paginated Range at one revision, envelope decode only; returns entries."""
    start, end, revision, count = prefix, prefix_range_end(prefix), 0, 0
    while True:
        request = rpc.RangeRequest(key=start, range_end=end, limit=page_size, revision=revision)
        response = await client.kvstub.Range(request, timeout=30.0, metadata=client.metadata)
        revision = revision or response.header.revision
        for kv in response.kvs:
            codec.decode(ENDPOINT_KIND, kv.value)
            count += 1
        if not response.more or not response.kvs:
            return count
        start = response.kvs[-1].key + b"\0"


async def _ours_sync(
    backend: EtcdBackend, store: KvEndpointStore, ipcache: Ipcache, page_size: int
) -> dict[str, float]:
    """B: list + decode + ipcache entries, written by the reconciler's ``run`` loop (as in
    the agent: large flushes written behind, on a worker thread); returns the phases."""
    reconciler = IpcacheReconciler(ipcache)
    phases = dict.fromkeys(("list_s", "decode_s", "set_s", "end_resync_s"), 0.0)
    reconciler.begin_resync()
    prefix = store.prefix
    decode, build, cut = store.codec.decode_named, store.build_ip_identity, len(prefix)
    async with asyncio.TaskGroup() as group:
        flusher = group.create_task(reconciler.run())
        pages = aiter(backend.iter_prefix(prefix, page_size=page_size))
        mark = time.perf_counter()
        while (page := await anext(pages, None)) is not None:
            t_listed = time.perf_counter()
            # the key's name, as the agent's store events carry it
            named = [(kv.key[cut:].decode(), kv) for kv in page[0]]
            endpoints = [
                (name, decode(kv.key, prefix, name, kv.value, build)) for name, kv in named
            ]
            t_decoded = time.perf_counter()
            reconciler.set_entries(
                [endpoint_entry(n, pair, BENCH_NODE) for n, pair in endpoints if pair is not None],
                ENDPOINT_PRIORITY,
            )
            t_set = time.perf_counter()
            phases["list_s"] += t_listed - mark
            phases["decode_s"] += t_decoded - t_listed
            phases["set_s"] += t_set - t_decoded
            mark = t_set
        reconciler.end_resync()  # what is left, on the loop
        flusher.cancel()
    phases["end_resync_s"] = time.perf_counter() - mark
    if reconciler.stats.errors:
        raise BenchError(f"the reconciler failed {reconciler.stats.errors} map writes")
    return phases


async def _feed(
    store: KvEndpointStore, reconciler: IpcacheReconciler, synced: asyncio.Event
) -> None:
    """The agent's endpoint watch loop (its :class:`EndpointMirror`, into a cache of its
    own): store events -> cache and reconciler; the first SYNCED ends the resync."""
    reconciler.begin_resync()
    mirror = EndpointMirror({}, set(), reconciler, BENCH_NODE)
    async for batch in store.watch_ip_identities():
        if mirror.apply(batch) and reconciler.resyncing:
            reconciler.end_resync()
            synced.set()


async def _watch_sync(
    store: KvEndpointStore, ipcache: Ipcache, at_synced: Callable[[], None] | None = None
) -> None:
    """C: the agent's path (ListWatcher -> store events -> reconciler.run) until SYNCED;
    ``at_synced`` runs then, while the watch still holds its state."""
    reconciler = IpcacheReconciler(ipcache)
    synced = asyncio.Event()
    async with asyncio.TaskGroup() as group:
        tasks = [
            group.create_task(_feed(store, reconciler, synced)),
            group.create_task(reconciler.run()),
        ]
        await synced.wait()
        if at_synced is not None:
            at_synced()
        for task in tasks:
            task.cancel()
    if reconciler.stats.errors:
        raise BenchError(f"the reconciler failed {reconciler.stats.errors} map writes")


async def _cold_sync(
    backend: EtcdBackend,
    store: KvEndpointStore,
    datapath: _Datapath,
    params: DatapathBenchParams,
    progress: Progress,
) -> dict[str, Any]:
    host, port = bare_endpoint(backend.cluster)
    client = aetcd.Client(host, port, timeout=30.0)
    await client.connect()
    bare: list[float] = []
    ours: list[float] = []
    watched: list[float] = []
    phases: list[dict[str, float]] = []

    async def side_a(r: int) -> None:
        started = time.perf_counter()
        got = await _bare_list(client, store.prefix, params.page_size)
        seconds = time.perf_counter() - started
        _check(got, params.count, "bare list")
        bare.append(got / seconds)
        progress(f"round {r}/{params.rounds} A bare list: {bare[-1]:,.0f} entries/s")

    async def side_b(r: int) -> None:
        rate, phase = await _sync_rate(
            datapath,
            lambda ipcache: _ours_sync(backend, store, ipcache, params.page_size),
            params.count,
            "ipcache",
        )
        ours.append(rate)
        phases.append({k: round(v, 3) for k, v in phase.items()})
        progress(
            f"round {r}/{params.rounds} B ours -> {_kind(datapath)} map: "
            f"{ours[-1]:,.0f} entries/s ({phases[-1]})"
        )

    async def side_c(r: int) -> None:
        rate, _ = await _sync_rate(
            datapath, lambda ipcache: _watch_sync(store, ipcache), params.count, "watched ipcache"
        )
        watched.append(rate)
        progress(
            f"round {r}/{params.rounds} C the agent's watch path -> {_kind(datapath)} map: "
            f"{watched[-1]:,.0f} entries/s"
        )

    sides = [side_a, side_b, side_c]
    try:
        for r in range(1, params.rounds + 1):
            # Each side goes first, second and third in turn: whatever one run leaves
            # behind (etcd's garbage collection after a list) falls on every side alike.
            shift = (r - 1) % len(sides)
            for side in sides[shift:] + sides[:shift]:
                await side(r)
        memory = await _watch_memory(store, datapath, params.count)
        progress(
            f"the agent's watch state at SYNCED: {memory / params.count:,.0f} bytes per endpoint"
        )
    finally:
        with contextlib.suppress(Exception):
            await client.close()
    ratio = statistics.median(ours) / statistics.median(bare)
    return {
        "entries": params.count,
        "page_size": params.page_size,
        "bare_entries_per_s": _rate_stats(bare),
        "ours_entries_per_s": _rate_stats(ours),
        "ratio": round(ratio, 3),
        "round_ratios": [round(o / b, 3) for o, b in zip(ours, bare, strict=True)],
        "goal_ratio": 0.5,
        "ours_phases_s": phases,
        "watch_path_entries_per_s": _rate_stats(watched),
        "watch_path_page_size": LIST_PAGE_SIZE,
        "watch_path_ratio": round(statistics.median(watched) / statistics.median(bare), 3),
        "watch_path_round_ratios": [round(w / b, 3) for w, b in zip(watched, bare, strict=True)],
        "watch_state_bytes_per_endpoint": round(memory / params.count),
    }


async def _watch_memory(store: KvEndpointStore, datapath: _Datapath, count: int) -> int:
    """Bytes the agent's path holds at SYNCED (ListWatcher revisions, RecordCodec's last
    values, the mirror's cache, the reconciler's claims and shadow; not the kernel map),
    traced by tracemalloc in a pass of its own (tracing slows it: it is not timed)."""
    held = 0

    def measure() -> None:
        nonlocal held
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - baseline

    gc.collect()
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        await _sync_rate(
            datapath, lambda ipcache: _watch_sync(store, ipcache, measure), count, "traced ipcache"
        )
    finally:
        tracemalloc.stop()
    return held


async def _sync_rate(
    datapath: _Datapath, sync: Callable[[Ipcache], Awaitable[R]], count: int, what: str
) -> tuple[float, R]:
    """Run ``sync`` into a fresh map: (entries per second, what it returned). The clock
    stops before the map is counted (counting reads the whole map back)."""
    ipcache = datapath.new()
    try:
        started = time.perf_counter()
        result = await sync(ipcache)
        seconds = time.perf_counter() - started
        got = len(ipcache)
    finally:
        datapath.close(ipcache)
    _check(got, count, what)
    return got / seconds, result


def _kind(datapath: _Datapath) -> str:
    return "kernel" if datapath.kernel else "userspace"


def _check(got: int, want: int, what: str) -> None:
    if got != want:
        raise BenchError(f"{what}: {got} entries, expected {want}")


async def _latency(
    backend: EtcdBackend,
    store: KvEndpointStore,
    datapath: _Datapath,
    params: DatapathBenchParams,
    progress: Progress,
) -> dict[str, Any]:
    ipcache = datapath.new()
    reconciler = IpcacheReconciler(ipcache)
    synced = asyncio.Event()

    step = max(1, params.count // params.updates)
    indices = [j * step for j in range(params.updates)]
    issued: dict[bytes, float] = {}
    wanted: dict[bytes, bytes] = {}
    samples: list[float] = []
    put_rtts: list[float] = []
    """Each put's round trip: etcd's share of the latency (its WAL fsync on this disk)."""
    watch_sync_s = 0.0
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(_feed(store, reconciler, synced)),
                group.create_task(reconciler.run()),
            ]
            try:
                started = time.perf_counter()
                await asyncio.wait_for(synced.wait(), params.wait_timeout + params.count / 1000)
                watch_sync_s = time.perf_counter() - started
                _check(len(ipcache), params.count, "watched ipcache")
                progress(
                    f"watch synced {params.count} entries in {watch_sync_s:.2f}s; putting "
                    f"{params.updates} updates at {params.rate:g}/s..."
                )
                interval = 1.0 / params.rate
                begin = time.monotonic()
                for j, i in enumerate(indices):
                    await asyncio.sleep(max(0.0, begin + j * interval - time.monotonic()))
                    endpoint = bench_endpoint(i, identity=200_000 + j)
                    key = ip_identity_key(endpoint.ip_identity)
                    wanted[key] = ip_identity_value(endpoint.ip_identity)
                    value = store.codec.encode(endpoint.to_dict())
                    issued[key] = time.monotonic()
                    await backend.put(store.key(endpoint.ip), value)
                    put_rtts.append(time.monotonic() - issued[key])
                deadline = time.monotonic() + params.wait_timeout
                while True:
                    done = [
                        k
                        for k, t in issued.items()
                        if reconciler.written_at.get(k, 0.0) >= t
                        and ipcache.map.lookup(k) == wanted[k]
                    ]
                    if len(done) == len(issued):
                        break
                    if time.monotonic() > deadline:
                        raise BenchError(
                            f"watch latency: {len(done)}/{len(issued)} updates in the map "
                            f"after {params.wait_timeout:.0f}s"
                        )
                    await asyncio.sleep(0.05)
                samples = [reconciler.written_at[k] - t for k, t in issued.items()]
            finally:
                for task in tasks:
                    task.cancel()
    except* asyncio.CancelledError:
        pass
    finally:
        datapath.close(ipcache)
    if len(samples) != params.updates:
        raise BenchError("watch latency: the measurement did not complete")
    stats = latency_summary_ms(samples, 3)
    progress(f"watch -> map latency: p50 {stats['p50_ms']} ms, p99 {stats['p99_ms']} ms")
    return {
        "updates": params.updates,
        "rate_per_s": params.rate,
        "map_entries": params.count,
        "watch_cold_sync_s": round(watch_sync_s, 3),
        "watch_cold_sync_entries_per_s": round(params.count / watch_sync_s),
        "reconciler_flushes": reconciler.stats.flushes,
        **stats,
        "put_rtt": latency_summary_ms(put_rtts, 3),
    }
