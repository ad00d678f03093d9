"""`cpctl bench propagation`: endpoint propagation to every agent's datapath, in CRD mode
and kvstore mode side by side, next to bare etcd watch fan-out; parses the arguments, runs
:mod:`controlplane.bench.propagation` and prints its latency table."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from controlplane.bench.propagation import run_propagation_bench
from controlplane.cli.bench_common import (
    add_store_choice,
    add_target_flags,
    progress,
    run_measure,
)
from controlplane.cli.common import (
    CommandError,
    add_json_flag,
    positive_float,
    positive_int,
    print_table,
)
from controlplane.config import KvstoreConfig


def register(commands: Any) -> None:
    """Add ``propagation`` to the ``bench`` subcommands."""
    prop = commands.add_parser(
        "propagation",
        help="endpoint propagation to every agent's datapath, CRD and kvstore mode side by "
        "side, next to bare etcd watch fan-out",
        description=(
            "Per store mode, N agent processes: one creates endpoints, and we time each from "
            "the creating agent issuing the write request until every other agent's ipcache "
            "holds it. kvstore-mode agents use the etcd directly; CRD-mode agents a local "
            "Kubernetes API server on the same etcd. Rounds interleave the modes and bare "
            "watch fan-out (N-1 watcher processes)."
        ),
    )
    add_target_flags(prop)
    add_store_choice(prop)
    prop.add_argument(
        "--no-bare",
        dest="bare",
        action="store_false",
        help="skip the bare etcd watch fan-out rounds",
    )
    prop.add_argument(
        "--agents",
        type=positive_int,
        default=20,
        help="agent processes per mode (default 20; the goals are stated for 100)",
    )
    prop.add_argument(
        "--endpoints",
        type=positive_int,
        default=50,
        help="endpoints (and bare keys) per round (default 50)",
    )
    prop.add_argument(
        "--interval",
        type=positive_float,
        metavar="SECONDS",
        help="start a create (and a bare put) every SECONDS, the same rate on every side "
        "(default: 10 ms after the previous create returned)",
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


def show_record(record: dict[str, Any]) -> None:
    print(
        f"propagation on etcd {record['etcd_version']}: {record['agents']} agents per mode, "
        f"{record['endpoints_per_round']} endpoints x {record['rounds']} rounds; "
        f"load average {record['load_average_start'][0]} -> {record['load_average_end'][0]} "
        f"on {record['cpus']} CPUs"
    )
    rows: list[tuple[str, dict[str, float]]] = []
    if "bare_all_watchers" in record:
        rows.append(("bare watch fan-out (all watchers)", record["bare_all_watchers"]))
    for store, mode in record["modes"].items():
        rows.append((f"{store} agents' datapaths (all agents)", mode["all_datapaths"]))
    if "bare_each_watcher" in record:
        rows.append(("bare, each watcher", record["bare_each_watcher"]))
    for store, mode in record["modes"].items():
        rows.append((f"{store} agents, each datapath", mode["each_datapath"]))
    for store, mode in record["modes"].items():
        rows.append((f"{store}: the creating agent's API call", mode["agent_create_request"]))
    print_table(
        ["MEASURE", "P50 MS", "P99 MS", "MAX MS"],
        [[name, s["p50_ms"], s["p99_ms"], s["max_ms"]] for name, s in rows],
    )
    print(
        "endpoint writes/s (median of rounds): "
        + ", ".join(f"{store} {mode['writes_per_s']}" for store, mode in record["modes"].items())
    )
    for store, mode in record["modes"].items():
        if mode["create_503_retries"]:
            print(f"{store}: {mode['create_503_retries']} creates answered 503 and were retried")
    for store, mode in record["modes"].items():
        if "ratio_to_bare" in mode:
            ratio = mode["ratio_to_bare"]
            print(f"ratio {store} agents/bare: p50 {ratio['p50']}, p99 {ratio['p99']}")
    if "ratio_crd_kvstore" in record:
        ratio = record["ratio_crd_kvstore"]
        print(f"ratio crd/kvstore: p50 {ratio['p50']}, p99 {ratio['p99']}, max {ratio['max']}")
    for note in record["notes"]:
        print(f"note: {note}")


async def run_propagation(args: argparse.Namespace) -> int:
    if args.agents < 2:
        raise CommandError("--agents must be at least 2 (one creates, the others receive)", 2)

    def show(record: dict[str, Any], config: KvstoreConfig) -> None:
        show_record(record)

    return await run_measure(
        args,
        "propagation",
        lambda config: run_propagation_bench(
            config,
            agents=args.agents,
            endpoints=args.endpoints,
            rounds=args.rounds,
            stores=args.stores,
            bare=args.bare,
            interval=args.interval,
            workdir=args.workdir,
            progress=progress,
        ),
        show,
    )
