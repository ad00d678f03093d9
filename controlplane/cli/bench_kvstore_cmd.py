"""`cpctl bench kvstore`: our etcd layer next to bare aetcd; parses the arguments, runs
:mod:`controlplane.bench.kvstore` and prints its result table."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

from controlplane.bench.common import BenchError, record_path, write_record
from controlplane.bench.kvstore import (
    OPERATIONS,
    BenchParams,
    BenchResult,
    run_kvstore_bench,
    run_kvstore_bench_embedded,
)
from controlplane.cli.bench_common import (
    add_target_flags,
    concurrency_list,
    progress,
    target_config,
)
from controlplane.cli.common import (
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    add_json_flag,
    positive_float,
    positive_int,
    print_json,
    print_table,
)
from controlplane.config import ClientSettings, normalize_prefix


def register(commands: Any) -> None:
    """Add ``kvstore`` to the ``bench`` subcommands."""
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
