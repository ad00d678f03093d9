"""(a) of the datapath benchmark, the cold sync: A (a bare aetcd list), B (our list,
decode and reconciler) and C (the agent's watch path) in interleaved rounds, and the
memory the agent's path holds at SYNCED."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import statistics
import time
import tracemalloc
from typing import Any

import aetcd
from aetcd import rpc

from controlplane import codec
from controlplane.agent.endpoint_mirror import ENDPOINT_PRIORITY, endpoint_entry
from controlplane.bench.common import BenchError, Progress, bare_endpoint
from controlplane.bench.datapath.agent_path import _watch_sync
from controlplane.bench.datapath.maps import _check, _Datapath, _kind, _sync_rate
from controlplane.bench.datapath.workload import BENCH_NODE, DatapathBenchParams
from controlplane.datapath.ipcache import Ipcache
from controlplane.datapath.reconciler import IpcacheReconciler
from controlplane.kvstore.backend import LIST_PAGE_SIZE, EtcdBackend
from controlplane.kvstore.endpoints import ENDPOINT_KIND, KvEndpointStore
from controlplane.kvstore.types import prefix_range_end


def _rate_stats(rates: list[float]) -> dict[str, Any]:
    return {"median": round(statistics.median(rates)), "rounds": [round(r) for r in rates]}


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
