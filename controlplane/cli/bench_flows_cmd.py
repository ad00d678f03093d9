"""`cpctl bench flows`: TCP throughput through the tc programs with flow events off,
medium and none; flow events per second from the kernel to a GetFlows reader with every
loss counted. Parses the arguments, runs :mod:`controlplane.bench.flows`, prints a table
and writes a JSON record under bench/results/."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from controlplane.bench.common import RESULTS_DIR, BenchError, utc_stamp
from controlplane.bench.flows import FlowBenchParams, run_flows_bench
from controlplane.cli.bench_common import progress
from controlplane.cli.common import (
    CommandError,
    add_json_flag,
    positive_float,
    positive_int,
    print_json,
    print_table,
)


def _rates(text: str) -> tuple[int, ...]:
    try:
        rates = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"want comma-separated packet rates, got {text!r}"
        ) from None
    if not rates or any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError(f"want positive packet rates, got {text!r}")
    return rates


def register(commands: Any) -> None:
    cmd = commands.add_parser(
        "flows",
        help="flow events: TCP throughput with events off/medium/none; events/s to a reader",
        description=(
            "(a) TCP throughput through the tc programs with flow events off, medium and none "
            "(interleaved rounds, in network namespaces); (b) flow events per second from the "
            "kernel through the flow server to a GetFlows reader at fixed UDP packet rates, "
            "with the losses of each stage. Needs root, clang, libbpf and ip."
        ),
    )
    cmd.add_argument("--seconds", type=positive_float, default=3.0, help="per run (default 3)")
    cmd.add_argument("--rounds", type=positive_int, default=3, help="throughput rounds (default 3)")
    cmd.add_argument(
        "--rates", type=_rates, default=(10_000, 25_000, 50_000),
        help="UDP packets per second for (b), comma-separated (default 10000,25000,50000)",
    )  # fmt: skip
    cmd.add_argument(
        "--output", type=Path, metavar="FILE",
        help="JSON record path (default bench/results/flows-<UTC>.json)",
    )  # fmt: skip
    add_json_flag(cmd)
    cmd.set_defaults(run=run_flows)


def _write(out: Path, record: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")


async def run_flows(args: argparse.Namespace) -> int:
    params = FlowBenchParams(seconds=args.seconds, rounds=args.rounds, rates=args.rates)
    try:
        record = await run_flows_bench(params, progress)
    except BenchError as exc:
        raise CommandError(str(exc)) from None
    out: Path = args.output or RESULTS_DIR / f"flows-{utc_stamp()}.json"
    _write(out, record)
    if args.json:
        print_json(record)
        return 0
    tp, ratio = record["throughput_bps"], record["throughput_ratio"]
    print(f"flows bench, kernel {record['kernel']}, {record['cpus']} CPUs; record: {out}")
    print_table(
        ["TCP THROUGHPUT", "MEDIAN", "ROUNDS"],
        [
            [f"events {m}", f"{tp[m]['median'] / 1e9:.2f} Gbit/s",
             ", ".join(f"{x / 1e9:.2f}" for x in tp[m]["rounds"])]
            for m in ("off", "medium", "none")
        ]
        + [
            [f"ratio {m}/off (goal >= 0.95)", f"{ratio[m]['median']:.3f}",
             ", ".join(f"{x:.3f}" for x in ratio[m]["rounds"])]
            for m in ("medium", "none")
        ],
    )  # fmt: skip
    print()
    print_table(
        ["PPS", "SENT", "PROGRAM", "SERVER EVENTS/S", "KERNEL LOST (RB/RATE)", "READER FLOWS/S",
         "READER LOST"],
        [
            [f"{r['rate_pps']:,}", f"{r['sent']:,}", f"{r['program_packets']:,}",
             f"{r['events_per_s']:,}",
             f"{r['kernel_lost_ring_buffer']:,}/{r['kernel_lost_rate_limit']:,}",
             f"{r['reader_flows_per_s']:,}", f"{r['reader_lost']:,}"]
            for r in record["event_rates"]
        ],
    )  # fmt: skip
    return 0
