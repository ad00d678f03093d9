"""What every `cpctl bench` command shares: where it measures, progress, the JSON record."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from controlplane.cli.common import (
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    add_kvstore_flags,
    positive_int,
    print_json,
)
from controlplane.cli.etcd_cmd import start_embedded
from controlplane.config import ClientSettings, EtcdClusterConfig, KvstoreConfig
from controlplane.flags import kvstore_config
from controlplane.kvstore.bench import BenchError, utc_stamp
from controlplane.kvstore.embedded import EmbeddedEtcd

Record = dict[str, Any]

RESULTS_DIR = Path("bench/results")


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


def write_record(path: Path, record: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
    except OSError as exc:
        raise CommandError(f"cannot write {path}: {exc.strerror}") from exc


async def bench_target(args: argparse.Namespace) -> tuple[KvstoreConfig, EmbeddedEtcd | None]:
    """The etcd to measure: the kvstore flags' cluster, or an embedded one (then stop it)."""
    if not args.embedded:
        return kvstore_config(args), None
    if args.kvstore_endpoints or args.kvstore_config:
        raise CommandError("--embedded excludes --kvstore-endpoints/--kvstore-config", EXIT_USAGE)
    progress(f"starting an embedded etcd with {args.members} member(s)...")
    etcd = await start_embedded(args.members)
    settings = ClientSettings(request_timeout=max(10.0, args.timeout))
    cluster = EtcdClusterConfig("embedded", tuple(etcd.client_urls))
    return KvstoreConfig((cluster,), client=settings), etcd


async def measure(
    args: argparse.Namespace,
    name: str,
    run: Callable[[KvstoreConfig], Awaitable[Record]],
    show: Callable[[Record, KvstoreConfig], None],
) -> int:
    """Run one benchmark against the target, write its JSON record, print it."""
    output = args.output or RESULTS_DIR / f"{name}-{utc_stamp()}.json"
    config, etcd = await bench_target(args)
    try:
        record = await run(config)
    except BenchError as exc:
        raise CommandError(str(exc)) from exc
    finally:
        if etcd is not None:
            await etcd.stop()
    record["embedded_members"] = args.members if args.embedded else None
    write_record(output, record)
    if args.json:
        print_json(record)
    else:
        show(record, config)
    progress(f"wrote {output}")
    return EXIT_OK
