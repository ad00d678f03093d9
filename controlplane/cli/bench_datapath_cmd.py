"""`cpctl bench datapath`: endpoints from etcd into the ipcache map next to a bare list;
parses the arguments, runs :mod:`controlplane.bench.datapath` and prints its result
table."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from controlplane.bench.datapath import DatapathBenchParams, prepare_datapath_run
from controlplane.cli.bench_common import add_target_flags, progress, run_measure
from controlplane.cli.common import (
    CommandError,
    add_json_flag,
    positive_float,
    positive_int,
    print_table,
)


def register(commands: Any) -> None:
    """Add ``datapath`` to the ``bench`` subcommands."""
    cmd = commands.add_parser(
        "datapath",
        help="cold sync of endpoints into the kernel ipcache map next to a bare etcd list; "
        "watch -> map latency",
        description=(
            "(a) Cold sync of N endpoint records from etcd into a fresh kernel ipcache map "
            "(list + decode + reconciler), entries/s next to a bare paginated aetcd list in "
            "interleaved rounds, same page size; (b) watch event -> map update latency. "
            "Progress goes to stderr; a JSON record is written under bench/results/."
        ),
    )
    add_target_flags(cmd)
    cmd.add_argument(
        "--count", type=positive_int, default=100_000, help="endpoints (default 100000)"
    )
    cmd.add_argument(
        "--rounds", type=positive_int, default=2, help="interleaved A B C rounds (default 2)"
    )
    cmd.add_argument(
        "--page-size",
        type=positive_int,
        default=10_000,
        help="keys per list page, both sides (default 10000)",
    )
    cmd.add_argument(
        "--updates",
        type=positive_int,
        default=500,
        help="single endpoint updates for the latency measurement (default 500)",
    )
    cmd.add_argument(
        "--rate", type=positive_float, default=100.0, help="updates per second (default 100)"
    )
    cmd.add_argument(
        "--userspace", action="store_true", help="use a userspace map even when eBPF is usable"
    )
    cmd.add_argument(
        "--output",
        type=Path,
        metavar="FILE",
        help="JSON record path (default bench/results/datapath-<UTC>.json)",
    )
    add_json_flag(cmd)
    cmd.set_defaults(run=run_datapath)


async def run_datapath(args: argparse.Namespace) -> int:
    try:
        params = DatapathBenchParams(
            count=args.count,
            rounds=args.rounds,
            page_size=args.page_size,
            updates=min(args.updates, args.count),
            rate=args.rate,
            kernel=False if args.userspace else None,
        )
    except ValueError as exc:
        raise CommandError(str(exc), 2) from exc

    run = prepare_datapath_run(params, progress)  # the agent's GC settings from here on
    return await run_measure(args, "datapath", run, lambda record, _config: print_datapath(record))


def print_datapath(record: dict[str, Any]) -> None:
    sync, lat = record["cold_sync"], record["watch_latency"]
    rtt = lat["put_rtt"]
    print(
        f"datapath on etcd {record['etcd_version']} ({record['etcd_members']} member(s)), "
        f"{record['datapath']} ipcache map ({record['datapath_reason']}), kernel "
        f"{record['kernel']}; {sync['entries']} endpoints, {sync['page_size']}-key pages, "
        f"{len(sync['round_ratios'])} interleaved rounds (medians)"
    )
    print_table(
        ["MEASURE", "VALUE", "ROUNDS"],
        [
            [
                "bare list + envelope decode, entries/s",
                f"{sync['bare_entries_per_s']['median']:,}",
                ", ".join(f"{r:,}" for r in sync["bare_entries_per_s"]["rounds"]),
            ],
            [
                f"ours: list + decode + reconcile into {record['datapath']} map, entries/s",
                f"{sync['ours_entries_per_s']['median']:,}",
                ", ".join(f"{r:,}" for r in sync["ours_entries_per_s"]["rounds"]),
            ],
            [
                "ratio ours/bare (goal >= 0.5)",
                f"{sync['ratio']:.3f}",
                ", ".join(f"{r:.3f}" for r in sync["round_ratios"]),
            ],
            [
                f"the agent's watch path ({sync['watch_path_page_size']}-key pages), entries/s",
                f"{sync['watch_path_entries_per_s']['median']:,}",
                ", ".join(f"{r:,}" for r in sync["watch_path_entries_per_s"]["rounds"]),
            ],
            [
                "ratio watch path/bare",
                f"{sync['watch_path_ratio']:.3f}",
                ", ".join(f"{r:.3f}" for r in sync["watch_path_round_ratios"]),
            ],
            [
                "the agent's watch state at SYNCED, bytes per endpoint",
                f"{sync['watch_state_bytes_per_endpoint']:,}",
                "-",
            ],
            ["watch -> map latency p50", f"{lat['p50_ms']:.2f} ms", "-"],
            ["watch -> map latency p99", f"{lat['p99_ms']:.2f} ms", "-"],
            ["watch -> map latency max", f"{lat['max_ms']:.2f} ms", "-"],
            [
                "  (the put's own round trip p50 / p99 / max)",
                f"{rtt['p50_ms']:.2f} / {rtt['p99_ms']:.2f} / {rtt['max_ms']:.2f} ms",
                "-",
            ],
        ],
    )
    for note in record["notes"]:
        print(f"note: {note}")
