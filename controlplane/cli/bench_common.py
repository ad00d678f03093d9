"""What every `cpctl bench` command shares: where it measures, progress, the JSON record."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from controlplane.cli.common import EXIT_USAGE, CommandError, add_kvstore_flags, positive_int
from controlplane.cli.etcd_cmd import start_embedded
from controlplane.config import ClientSettings, EtcdClusterConfig, KvstoreConfig
from controlplane.flags import kvstore_config
from controlplane.kvstore.embedded import EmbeddedEtcd

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
