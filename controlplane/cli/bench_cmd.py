"""`cpctl bench`: benchmarks that compare our layers with bare etcd in one run.

This module parses the arguments, runs a benchmark of :mod:`controlplane.bench` and prints
its result; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from controlplane.bench.common import BenchError, Record, measure, record_path, write_record
from controlplane.bench.datapath import DatapathBenchParams, prepare_datapath_run
from controlplane.bench.identities import IdentityBenchParams, run_identity_bench
from controlplane.bench.kvstore import (
    OPERATIONS,
    BenchParams,
    BenchResult,
    run_kvstore_bench,
    run_kvstore_bench_embedded,
)
from controlplane.bench.propagation import run_propagation_bench
from controlplane.cli.common import (
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    add_json_flag,
    add_kvstore_flags,
    kvstore_config,
    positive_float,
    positive_int,
    print_json,
    print_table,
)
from controlplane.config import ClientSettings, KvstoreConfig, normalize_prefix


def register(subparsers: Any) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks (see docs/benchmarks.md)")
    commands = bench.add_subparsers(dest="bench_command", required=True, metavar="COMMAND")

    kv = commands.add_parser(
        "kvstore",
        help="our etcd layer next to bare aetcd: puts, gets, txns, watch latency",
        description=(
            "Measure puts/s, gets/s, create-only transactions/s and watch latency through "
            "our layer (EtcdBackend, ListWatcher) and through bare aetcd, in interleaved "
            "rounds on the same etcd member (the first endpoint of the first configured "
            "cluster). Progress goes to stderr; a JSON record is always written under "
            "bench/results/."
        ),
    )
    add_target_flags(kv)
    kv.add_argument(
        "--concurrency",
        type=concurrency_list,
        default=(1, 32),
        metavar="N,N",
        help="concurrent workers per measurement, a comma list (default 1,32)",
    )
    amount = kv.add_mutually_exclusive_group()
    amount.add_argument(
        "--duration",
        type=positive_float,
        metavar="SECONDS",
        help="length of each measurement: one op, one concurrency, one side (default 1)",
    )
    amount.add_argument(
        "--ops", type=positive_int, metavar="N", help="operations per measurement instead"
    )
    kv.add_argument("--rounds", type=positive_int, default=6, help="interleaved rounds (default 6)")
    kv.add_argument(
        "--slices",
        type=positive_int,
        default=4,
        metavar="N",
        help="split each measurement into N turns per side, alternating sides (default 4)",
    )
    kv.add_argument(
        "--watch-events",
        type=positive_int,
        default=200,
        metavar="N",
        help="watch-latency samples per side per round (default 200)",
    )
    kv.add_argument(
        "--value-size", type=positive_int, default=100, metavar="BYTES", help="(default 100)"
    )
    kv.add_argument(
        "--operations",
        type=operation_list,
        default=OPERATIONS,
        metavar="OPS",
        help=f"which to measure, a comma list of {','.join(OPERATIONS)} (default all)",
    )
    kv.add_argument(
        "--delete-each-round",
        action="store_true",
        help="delete each round's keys (in small chunks) after it, not only at the end",
    )
    kv.add_argument(
        "--output",
        type=Path,
        metavar="FILE",
        help="write the JSON record here (default bench/results/kvstore-<UTC time>.json)",
    )
    add_json_flag(kv)
    kv.set_defaults(run=run_kvstore)

    ids = commands.add_parser(
        "identities",
        help="identity allocations/s and references/s next to raw etcd transactions/s",
        description=(
            "New identities per second and references to existing identities per second "
            "through the identity store, side by side with raw etcd transactions of the same "
            "shape through the same client at the same concurrency, in interleaved rounds."
        ),
    )
    add_target_flags(ids)
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
    register_datapath(commands)


def concurrency_list(text: str) -> tuple[int, ...]:
    levels = tuple(positive_int(part.strip()) for part in text.split(",") if part.strip())
    if not levels:
        raise argparse.ArgumentTypeError("want a comma list like 1,32")
    return tuple(dict.fromkeys(levels))


def operation_list(text: str) -> tuple[str, ...]:
    ops = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [op for op in ops if op not in OPERATIONS]
    if unknown or not ops:
        raise argparse.ArgumentTypeError(f"want some of {','.join(OPERATIONS)}")
    return tuple(op for op in OPERATIONS if op in ops)


async def run_kvstore(args: argparse.Namespace) -> int:
    try:
        params = BenchParams(
            concurrency=args.concurrency,
            rounds=args.rounds,
            duration=None if args.ops else (args.duration or 1.0),
            ops=args.ops,
            slices=args.slices,
            watch_events=args.watch_events,
            value_size=args.value_size,
            operations=args.operations,
            timeout=max(10.0, args.timeout),
        )
    except ValueError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from exc
    output = args.output or record_path("kvstore")
    config = target_config(args)
    try:
        if config is None:
            settings = ClientSettings(request_timeout=args.timeout, dial_timeout=args.timeout)
            prefix = normalize_prefix(args.kvstore_prefix) if args.kvstore_prefix else params.prefix
            result = await run_kvstore_bench_embedded(
                args.members, replace(params, prefix=prefix), settings, progress=progress
            )
        else:
            result = await run_kvstore_bench(
                config.clusters[0],
                replace(params, prefix=config.prefix),
                config.client,
                progress=progress,
                environment={"embedded": False},
            )
        record = result.to_json()
        write_record(output, record)
    except BenchError as exc:
        raise CommandError(str(exc)) from exc
    if args.json:
        print_json(record)
    else:
        print_result(result)
    progress(f"wrote {output}")
    return EXIT_OK


def print_result(result: BenchResult) -> None:
    env = result.environment
    print(
        f"etcd {env['etcd_version']}, {env['etcd_members']} member(s), via {env['endpoint']}"
        f"{' (leader)' if env.get('endpoint_is_leader') else ''}; python {env['python']}, "
        f"aetcd {env['aetcd']}, grpcio {env['grpcio']}"
    )
    per = (
        f"{result.params.duration:g}s"
        if result.params.duration is not None
        else f"{result.params.ops} ops"
    )
    print(
        f"{result.params.rounds} interleaved rounds, {per} per measurement; rates are medians "
        "of per-round rates; ratio = ours/bare (throughput: higher is better for ours, "
        "latency: lower is)"
    )
    print("ours = EtcdBackend/ListWatcher, bare = aetcd.Client; " + result.notes[0])
    print()
    rows: list[list[str]] = []
    for row in result.throughput:
        ratios = row.round_ratios
        rows.append(
            [
                f"{row.operation}/s",
                str(row.concurrency),
                f"{row.median('ours'):,.0f}",
                f"{row.median('bare'):,.0f}",
                f"{row.ratio:.3f}",
                f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios else "-",
                f"{row.cpu_per_op('ours') * 1e6:.0f} / {row.cpu_per_op('bare') * 1e6:.0f}",
            ]
        )
    for lat in result.latency:
        for q in (50, 99):
            rows.append(
                [
                    f"{lat.operation} latency p{q}",
                    str(lat.concurrency),
                    f"{lat.p('ours', q) * 1000:.2f} ms",
                    f"{lat.p('bare', q) * 1000:.2f} ms",
                    f"{lat.ratio(q):.3f}",
                    "-",
                    "-",
                ]
            )
    headers = ["operation", "concurrency", "ours", "bare", "ratio", "round ratios"]
    print_table([*headers, "client CPU us/op ours / bare"], rows)


async def run_identities(args: argparse.Namespace) -> int:
    try:
        params = IdentityBenchParams(args.allocators, args.count, args.labels, args.rounds)
    except ValueError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from exc

    def show(record: dict[str, Any], config: KvstoreConfig) -> None:
        print(
            f"identities on etcd {record['etcd_version']} "
            f"({args.members if args.embedded else len(config.clusters[0].endpoints)} member(s)), "
            f"{params.count} per measurement, median of {params.rounds} rounds"
        )
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
        for note in record["notes"]:
            print(f"note: {note}")

    return await run_measure(
        args, "identities", lambda config: run_identity_bench(config, params, progress), show
    )


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


def register_datapath(commands: Any) -> None:
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


# -- shared by the commands -----------------------------------------------------------


def add_target_flags(parser: argparse.ArgumentParser) -> None:
    """The kvstore flags, or --embedded [--members N] for an etcd started for the run."""
    add_kvstore_flags(parser)
    target = parser.add_argument_group("embedded etcd")
    target.add_argument(
        "--embedded",
        action="store_true",
        help="start a local etcd for the run and stop it afterwards",
    )
    target.add_argument(
        "--members", type=positive_int, default=1, help="members of the embedded etcd (default 1)"
    )


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def target_config(args: argparse.Namespace) -> KvstoreConfig | None:
    """The kvstore flags' config, or None for --embedded (an etcd started for the run)."""
    if not args.embedded:
        return kvstore_config(args)
    if args.kvstore_endpoints or args.kvstore_config:
        raise CommandError("--embedded excludes --kvstore-endpoints/--kvstore-config", EXIT_USAGE)
    return None


async def run_measure(
    args: argparse.Namespace,
    name: str,
    run: Callable[[KvstoreConfig], Awaitable[Record]],
    show: Callable[[Record, KvstoreConfig], None],
) -> int:
    """Run one benchmark on the target, write its JSON record, print it."""
    output = args.output or record_path(name)
    config = target_config(args)
    try:
        record, config = await measure(
            run, config, members=args.members, timeout=args.timeout, progress=progress
        )
        write_record(output, record)
    except BenchError as exc:
        raise CommandError(str(exc)) from exc
    if args.json:
        print_json(record)
    else:
        show(record, config)
    progress(f"wrote {output}")
    return EXIT_OK
