"""`cpctl bench lb`: connections per second to a pod directly and through a service VIP,
side by side, and the time from a backend change in the store to the agent's map; parses
the arguments, runs :mod:`controlplane.bench.lb` and prints its table."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from controlplane.bench.lb import run_lb_bench
from controlplane.cli.bench_common import add_target_flags, progress, run_measure
from controlplane.cli.common import add_json_flag, positive_int, print_table
from controlplane.config import KvstoreConfig
from controlplane.flags import non_negative_int


def register(commands: Any) -> None:
    """Add ``lb`` to the ``bench`` subcommands."""
    lb = commands.add_parser(
        "lb",
        help="service load balancing: connections/s direct vs VIP; store-to-map latency",
    )
    add_target_flags(lb)
    lb.add_argument(
        "--connections",
        type=positive_int,
        default=3000,
        help="TCP connections per side and round (default 3000)",
    )
    lb.add_argument("--rounds", type=positive_int, default=5, help="interleaved rounds (default 5)")
    lb.add_argument(
        "--changes",
        type=positive_int,
        default=200,
        help="backend-set changes timed from the store to the map (default 200)",
    )
    lb.add_argument(
        "--services",
        type=non_negative_int,
        default=0,
        help="other services (4 backends each) in the maps while changes are timed (default 0)",
    )
    lb.add_argument(
        "--output",
        type=Path,
        metavar="FILE",
        help="JSON record path (default bench/results/lb-<UTC>.json)",
    )
    add_json_flag(lb)
    lb.set_defaults(run=run_lb)


async def run_lb(args: argparse.Namespace) -> int:
    def show(record: dict[str, Any], config: KvstoreConfig) -> None:
        conns = record["connections"]
        if "skipped" in conns:
            print(f"connections per second: skipped ({conns['skipped']})")
        else:
            print(
                f"TCP connections per second, {conns['connections_per_round']} per side x "
                f"{conns['rounds']} interleaved rounds (median):"
            )
            print_table(
                ["TARGET", "CONN/S", "ROUNDS"],
                [
                    ["pod IP (direct)", conns["direct_per_s"], conns["direct_rounds"]],
                    ["service VIP", conns["vip_per_s"], conns["vip_rounds"]],
                ],
            )
            print(f"ratio VIP/direct: {conns['ratio']}")
        lat = record["store_to_map"]
        print(
            f"store to map ({lat['changes']} backend changes, {lat['other_services']} other "
            f"services, {lat['maps']} maps):"
        )
        print_table(
            ["MEASURE", "P50 MS", "P99 MS", "MAX MS"],
            [["put -> set flipped in the map", lat["p50_ms"], lat["p99_ms"], lat["max_ms"]]],
        )

    return await run_measure(
        args,
        "lb",
        lambda config: run_lb_bench(
            config,
            connections=args.connections,
            rounds=args.rounds,
            changes=args.changes,
            background=args.services,
            progress=progress,
        ),
        show,
    )
