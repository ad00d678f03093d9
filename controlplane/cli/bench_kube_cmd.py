"""`cpctl bench kube`: the local Kubernetes API server next to bare etcd; parses the
arguments, runs :mod:`controlplane.bench.kube` and prints its result table."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from controlplane.bench.common import Record
from controlplane.bench.kube import KubeBenchParams, run_kube_bench
from controlplane.cli.bench_common import add_target_flags, progress, run_measure
from controlplane.cli.common import add_json_flag, positive_int, print_table
from controlplane.config import KvstoreConfig


def register(commands: Any) -> None:
    """Add ``kube`` to the ``bench`` subcommands."""
    cmd = commands.add_parser(
        "kube",
        help="the local Kubernetes API server next to bare etcd: creates, list, watch fan-out",
        description=(
            "Three shapes, each measured through the API server (a `cpctl kube up` "
            "subprocess on the target etcd, reached over HTTPS with its token) and through "
            "bare etcd (our EtcdBackend on the same etcd), from the same client process:"
        ),
    )
    add_target_flags(cmd)
    cmd.add_argument("--creates", type=positive_int, default=2000, help="objects to create (2000)")
    cmd.add_argument("--concurrency", type=positive_int, default=32, help="create workers (32)")
    cmd.add_argument(
        "--list-size", type=positive_int, default=10_000, help="objects listed (10000)"
    )
    cmd.add_argument(
        "--rounds",
        type=positive_int,
        default=3,
        help="interleaved create rounds; list rounds, median (3)",
    )
    cmd.add_argument("--watchers", type=positive_int, default=100, help="watchers (100)")
    cmd.add_argument("--updates", type=positive_int, default=50, help="updates watched (50)")
    cmd.add_argument(
        "--output",
        type=Path,
        metavar="FILE",
        help="JSON record path (default bench/results/kube-<UTC>.json)",
    )
    add_json_flag(cmd)
    cmd.set_defaults(run=run_kube)


async def run_kube(args: argparse.Namespace) -> int:
    params = KubeBenchParams(
        creates=args.creates,
        concurrency=args.concurrency,
        list_size=args.list_size,
        rounds=args.rounds,
        watchers=args.watchers,
        updates=args.updates,
    )
    return await run_measure(
        args, "kube", lambda config: run_kube_bench(config, params, progress), show
    )


def show(record: Record, config: KvstoreConfig) -> None:
    creates, listing, fanout = record["creates"], record["list"], record["fanout"]
    rows = [
        [
            "creates/s",
            f"{creates['api_per_s']:.0f}",
            f"{creates['bare_per_s']:.0f}",
            f"{creates['ratio']:.2f}",
        ],
        [
            f"list {listing['objects']} (s)",
            f"{listing['api_s']:.3f}",
            f"{listing['bare_s']:.3f}",
            f"{listing['ratio']:.2f}",
        ],
        [
            f"watch p50, {fanout['watchers']} watchers (ms)",
            f"{fanout['api']['p50_ms']:.1f}",
            f"{fanout['bare']['p50_ms']:.1f}",
            f"{fanout['api']['p50_ms'] / fanout['bare']['p50_ms']:.2f}",
        ],
        [
            f"watch p99, {fanout['watchers']} watchers (ms)",
            f"{fanout['api']['p99_ms']:.1f}",
            f"{fanout['bare']['p99_ms']:.1f}",
            f"{fanout['p99_ratio']:.2f}",
        ],
    ]
    print_table(["measure", "api server", "bare etcd", "api/bare"], rows)
