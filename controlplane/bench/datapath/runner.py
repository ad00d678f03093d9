"""Running the datapath benchmark: its record (environment, the cold sync, the watch
latency, notes) on a bench-only prefix that is deleted afterwards, and the run
`cpctl bench datapath` takes with the agent's GC settings."""

from __future__ import annotations

import contextlib
import platform
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

import aetcd
from prometheus_client import CollectorRegistry

from controlplane.bench.common import (
    BenchError,
    Progress,
    Record,
    delete_in_chunks,
    package_version,
    utc_stamp,
)
from controlplane.bench.datapath.cold_sync import _cold_sync
from controlplane.bench.datapath.maps import _Datapath
from controlplane.bench.datapath.watch_latency import _latency
from controlplane.bench.datapath.workload import DatapathBenchParams, _load
from controlplane.config import KvstoreConfig
from controlplane.kvstore.endpoints import KvEndpointStore
from controlplane.kvstore.errors import KvstoreError
from controlplane.kvstore.keys import KeyLayout
from controlplane.kvstore.shards import ShardMap
from controlplane.metrics import StoreMetrics
from controlplane.runtime import GC_THRESHOLDS, tune_gc


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
