"""`cpctl bench`: benchmarks that compare our layers with bare etcd in one run."""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from controlplane.cli.bench_common import (
    RESULTS_DIR,
    add_target_flags,
    measure,
    progress,
    write_record,
)
from controlplane.cli.bench_datapath import register_datapath
from controlplane.cli.bench_kube import register_kube
from controlplane.cli.bench_propagation import run_propagation_bench
from controlplane.cli.common import (
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    add_json_flag,
    kvstore_config,
    positive_float,
    positive_int,
    print_json,
    print_table,
)
from controlplane.cli.etcd_cmd import start_embedded
from controlplane.config import ClientSettings, EtcdClusterConfig, KvstoreConfig, normalize_prefix
from controlplane.kvstore.bench import (
    OPERATIONS,
    BenchError,
    BenchParams,
    BenchResult,
    run_kvstore_bench,
    utc_stamp,
)
from controlplane.kvstore.bench_identities import IdentityBenchParams, run_identity_bench
from controlplane.kvstore.embedded import EmbeddedEtcd, find_etcd_binary


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
    register_kube(commands)


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
    output = args.output or RESULTS_DIR / f"kvstore-{utc_stamp()}.json"
    etcd: EmbeddedEtcd | None = None
    extra: dict[str, Any] = {"embedded": args.embedded}
    if args.embedded:
        if args.kvstore_endpoints or args.kvstore_config:
            raise CommandError(
                "--embedded excludes --kvstore-endpoints/--kvstore-config", EXIT_USAGE
            )
        progress(f"starting an embedded etcd with {args.members} member(s)...")
        etcd = await start_embedded(args.members)
        cluster = EtcdClusterConfig("embedded", tuple(etcd.client_urls))
        settings = ClientSettings(request_timeout=args.timeout, dial_timeout=args.timeout)
        prefix = normalize_prefix(args.kvstore_prefix) if args.kvstore_prefix else params.prefix
        params = replace(params, prefix=prefix)
    else:
        config = kvstore_config(args)
        cluster, settings = config.clusters[0], config.client
        params = replace(params, prefix=config.prefix)
    try:
        if etcd is not None:
            extra["etcd_binary"] = str(find_etcd_binary())
        result = await run_kvstore_bench(
            cluster, params, settings, progress=progress, environment=extra
        )
    except BenchError as exc:
        raise CommandError(str(exc)) from exc
    finally:
        if etcd is not None:
            await etcd.stop()
    record = result.to_json()
    write_record(output, record)
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

    return await measure(
        args, "identities", lambda config: run_identity_bench(config, params, progress), show
    )


async def run_propagation(args: argparse.Namespace) -> int:
    if args.agents < 2:
        raise CommandError("--agents must be at least 2 (one creates, the others receive)", 2)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cp-bench-prop-"))

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

    return await measure(
        args,
        "propagation",
        lambda config: run_propagation_bench(
            config,
            agents=args.agents,
            endpoints=args.endpoints,
            rounds=args.rounds,
            workdir=workdir,
            progress=progress,
        ),
        show,
    )
