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

Modules
-------
* ``workload``: :class:`DatapathBenchParams`, the simulated endpoints, loading them.
* ``maps``: fresh ipcache maps (kernel or userspace), a timed sync into one.
* ``agent_path``: the agent's endpoint watch path into a reconciler (C, and (b)'s feed).
* ``cold_sync``: (a), sides A, B and C in interleaved rounds; the watch state's memory.
* ``watch_latency``: (b).
* ``runner``: :func:`run_datapath_bench`, its record, and :func:`prepare_datapath_run`.

This package re-exports what its callers use; import from ``controlplane.bench.datapath``.
"""

from __future__ import annotations

from controlplane.bench.datapath.runner import prepare_datapath_run, run_datapath_bench
from controlplane.bench.datapath.workload import DatapathBenchParams

__all__ = ["DatapathBenchParams", "prepare_datapath_run", "run_datapath_bench"]
