"""`cpctl bench propagation`: endpoint propagation to every agent's datapath next to bare
etcd watch fan-out; parses the arguments, runs :mod:`controlplane.bench.propagation` and
prints its latency table."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from controlplane.bench.propagation import run_propagation_bench
from controlplane.cli.bench_common import add_target_flags, progress, run_measure
from controlplane.cli.common import CommandError, add_json_flag, positive_int, print_table
from controlplane.config import KvstoreConfig


def register(commands: Any) -> None:
    """Add ``propagation`` to the ``bench`` subcommands."""
    prop = commands.add_parser(
        "propagation",
        help="endpoint propagation to every agent's datapath next to bare etcd watch fan-out",
    )
    add_target_flags(prop)
    prop.add_argument(
        "--agents",
        type=positive_int,
        default=20,
        help="agent processes (default 20; the goal is stated for 100)",
    )
    prop.add_argument(
        "--endpoints",
        type=positive_int,
        default=50,
        help="endpoints (and bare keys) per round (default 50)",
    )
    prop.add_argument(
        "--rounds", type=positive_int, default=2, help="interleaved rounds (default 2)"
    )
    prop.add_argument("--workdir", type=Path, help="agent logs and sockets (default: temp dir)")
    prop.add_argument(
        "--output",
        type=Path,
        metavar="FILE",
        help="JSON record path (default bench/results/propagation-<UTC>.json)",
    )
    add_json_flag(prop)
    prop.set_defaults(run=run_propagation)


async def run_propagation(args: argparse.Namespace) -> int:
    if args.agents < 2:
        raise CommandError("--agents must be at least 2 (one creates, the others receive)", 2)

    def show(record: dict[str, Any], config: KvstoreConfig) -> None:
        print(
            f"propagation on etcd {record['etcd_version']}: {args.agents} agents, "
            f"{args.endpoints} endpoints x {args.rounds} rounds"
        )
        rows = [
            ("bare watch fan-out (all watchers)", record["bare_all_watchers"]),
            ("agents' datapaths (all agents)", record["agents_all_datapaths"]),
            ("bare, each watcher", record["bare_each_watcher"]),
            ("agents, each datapath", record["agents_each_datapath"]),
        ]
        print_table(
            ["MEASURE", "P50 MS", "P99 MS", "MAX MS"],
            [[name, s["p50_ms"], s["p99_ms"], s["max_ms"]] for name, s in rows],
        )
        print(f"ratio agents/bare: p50 {record['ratio_p50']}, p99 {record['ratio_p99']}")
        for note in record["notes"]:
            print(f"note: {note}")

    return await run_measure(
        args,
        "propagation",
        lambda config: run_propagation_bench(
            config,
            agents=args.agents,
            endpoints=args.endpoints,
            rounds=args.rounds,
            workdir=args.workdir,
            progress=progress,
        ),
        show,
    )
