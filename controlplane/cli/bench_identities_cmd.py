"""`cpctl bench identities`: identity allocations and references in kvstore and CRD mode
side by side, each next to its raw operations (etcd transactions; API server creates and
lists); parses the arguments, runs :mod:`controlplane.bench.identities` and prints its
result tables."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from controlplane.bench.identities import IdentityBenchParams, run_identity_bench
from controlplane.cli.bench_common import (
    add_store_choice,
    add_target_flags,
    concurrency_list,
    progress,
    run_measure,
)
from controlplane.cli.common import (
    EXIT_USAGE,
    CommandError,
    add_json_flag,
    positive_int,
    print_table,
)
from controlplane.config import KvstoreConfig


def register(commands: Any) -> None:
    """Add ``identities`` to the ``bench`` subcommands."""
    ids = commands.add_parser(
        "identities",
        help="identity allocations/s and references/s, kvstore and CRD mode, next to raw "
        "operations/s",
        description=(
            "New identities per second and references to existing identities per second "
            "through the identity store, side by side with raw operations of the same shape "
            "through the same client at the same concurrency, in interleaved rounds: in "
            "kvstore mode etcd transactions; in CRD mode (a local Kubernetes API server on "
            "the same etcd) creates of Identity objects and label-selector lists."
        ),
    )
    add_target_flags(ids)
    add_store_choice(ids)
    ids.add_argument(
        "--allocators",
        type=concurrency_list,
        default=(1, 16, 64),
        metavar="N,N",
        help="allocator counts, a comma list (default 1,16,64)",
    )
    ids.add_argument(
        "--count", type=positive_int, default=1000, help="identities per measurement (default 1000)"
    )
    ids.add_argument(
        "--labels", type=positive_int, default=4, help="labels per label set (default 4)"
    )
    ids.add_argument(
        "--rounds", type=positive_int, default=3, help="interleaved rounds (default 3)"
    )
    ids.add_argument(
        "--output",
        type=Path,
        metavar="FILE",
        help="write the JSON record here (default bench/results/identities-<UTC>.json)",
    )
    add_json_flag(ids)
    ids.set_defaults(run=run_identities)


async def run_identities(args: argparse.Namespace) -> int:
    try:
        params = IdentityBenchParams(
            args.allocators, args.count, args.labels, args.rounds, args.stores
        )
    except ValueError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from exc

    def show(record: dict[str, Any], config: KvstoreConfig) -> None:
        print(
            f"identities on etcd {record['etcd_version']} "
            f"({args.members if args.embedded else len(config.clusters[0].endpoints)} member(s)), "
            f"{params.count} per measurement, median of {params.rounds} rounds"
        )
        print(
            f"load average {record['load_average_start'][0]} -> "
            f"{record['load_average_end'][0]} on {record['cpus']} CPUs"
        )
        if "results" in record:
            print("kvstore mode (raw: etcd transactions of the same shape)")
            print_table(
                ["ALLOCATORS", "NEW/S", "RAW TXN/S", "RATIO", "REFS/S", "RAW TXN/S", "RATIO"],
                [
                    [
                        r["allocators"],
                        r["new_per_s"],
                        r["raw_new_txn_per_s"],
                        r["new_ratio"],
                        r["ref_per_s"],
                        r["raw_ref_txn_per_s"],
                        r["ref_ratio"],
                    ]
                    for r in record["results"]
                ],
            )
        if "crd_results" in record:
            print("CRD mode (raw: Identity creates; label-selector lists)")
            print_table(
                ["ALLOCATORS", "NEW/S", "RAW CREATE/S", "RATIO", "REFS/S", "RAW LIST/S", "RATIO"],
                [
                    [
                        r["allocators"],
                        r["new_per_s"],
                        r["raw_create_per_s"],
                        r["new_ratio"],
                        r["ref_per_s"],
                        r["raw_list_per_s"],
                        r["ref_ratio"],
                    ]
                    for r in record["crd_results"]
                ],
            )
            for r in record["crd_results"]:
                for failure in r["failures"]:
                    print(f"crd allocators={r['allocators']} failed: {failure}")
        if "crd_vs_kvstore" in record:
            print("CRD mode / kvstore mode")
            print_table(
                ["ALLOCATORS", "NEW", "REFS"],
                [
                    [r["allocators"], r["new_ratio"], r["ref_ratio"]]
                    for r in record["crd_vs_kvstore"]
                ],
            )
        for note in record["notes"]:
            print(f"note: {note}")

    return await run_measure(
        args, "identities", lambda config: run_identity_bench(config, params, progress), show
    )
