"""The agent's endpoint watch path as the datapath benchmark runs it: store events through
the agent's :class:`EndpointMirror` into a reconciler, until SYNCED (C of the cold sync,
and the feed of the latency measurement)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from controlplane.agent.endpoint_mirror import EndpointMirror
from controlplane.bench.common import BenchError
from controlplane.bench.datapath.workload import BENCH_NODE
from controlplane.datapath.ipcache import Ipcache
from controlplane.datapath.reconciler import IpcacheReconciler
from controlplane.kvstore.endpoints import KvEndpointStore


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
