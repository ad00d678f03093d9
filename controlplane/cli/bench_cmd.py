"""`cpctl bench`: benchmarks that compare our layers with bare etcd in one run.

This module adds the ``bench`` command and its subcommands. Each subcommand's module
(``bench_kvstore_cmd``, ``bench_identities_cmd``, ``bench_propagation_cmd``,
``bench_datapath_cmd``, ``bench_kube_cmd``, ``bench_lb_cmd``) parses its arguments, runs a
benchmark of :mod:`controlplane.bench` and prints its result; what they share is in
``bench_common``; progress goes to stderr.
"""

from __future__ import annotations

from typing import Any

from controlplane.cli import (
    bench_datapath_cmd,
    bench_flows_cmd,
    bench_identities_cmd,
    bench_kube_cmd,
    bench_kvstore_cmd,
    bench_lb_cmd,
    bench_propagation_cmd,
)


def register(subparsers: Any) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks (see docs/benchmarks.md)")
    commands = bench.add_subparsers(dest="bench_command", required=True, metavar="COMMAND")
    bench_kvstore_cmd.register(commands)
    bench_identities_cmd.register(commands)
    bench_propagation_cmd.register(commands)
    bench_datapath_cmd.register(commands)
    bench_flows_cmd.register(commands)
    bench_kube_cmd.register(commands)
    bench_lb_cmd.register(commands)
