"""(b) of the datapath benchmark: watch event -> map update latency, from issuing a put to
the reconciler's ``written_at`` for the entry."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from controlplane.bench.common import BenchError, Progress, latency_summary_ms
from controlplane.bench.datapath.agent_path import _feed
from controlplane.bench.datapath.maps import _check, _Datapath
from controlplane.bench.datapath.workload import DatapathBenchParams, bench_endpoint
from controlplane.datapath.ipcache import ip_identity_key, ip_identity_value
from controlplane.datapath.reconciler import IpcacheReconciler
from controlplane.kvstore.backend import EtcdBackend
from controlplane.kvstore.endpoints import KvEndpointStore


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
