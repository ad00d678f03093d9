"""Throughput and watch latency of our etcd layer next to bare aetcd, measured in one run.

Both sides talk to the same etcd member of the same cluster, one after the other, in
interleaved rounds: round 1 starts every measurement with ours, round 2 with bare, and so
on; within a measurement the sides take turns in short slices (A B B A ...). etcd 3.4
changes speed with its history (see BENCHMARKING.md), and other processes on the machine
come and go, so only a ratio measured this way means anything. Rates are medians of the
per-round rates; the client's CPU time per operation is recorded too (steadier than rates
on a busy machine).

- ours: :class:`EtcdBackend` (with :class:`ListWatcher` for watches).
- bare: ``aetcd.Client(host, port)`` and its own methods.

Each side uses one client object, so all of a side's concurrent workers share one gRPC
connection. Every round writes fresh keys under its own prefix; keys are deleted in small
chunks (never one big range delete) at the end of the run, or after each round on request.

Modules
-------
* ``params``: the sides, the operations and :class:`BenchParams`.
* ``workload``: the two sides' operations and :func:`drive`, the concurrent workers.
* ``report``: the measurements, the rows, :class:`BenchResult` (the JSON record) and the
  progress lines.
* ``runner``: :func:`run_kvstore_bench` and the interleaved rounds.

This package re-exports what its callers use; import from ``controlplane.bench.kvstore``.
"""

from __future__ import annotations

from controlplane.bench.kvstore.params import OPERATIONS, BenchParams
from controlplane.bench.kvstore.report import BenchResult
from controlplane.bench.kvstore.runner import run_kvstore_bench, run_kvstore_bench_embedded

__all__ = [
    "OPERATIONS",
    "BenchParams",
    "BenchResult",
    "run_kvstore_bench",
    "run_kvstore_bench_embedded",
]
