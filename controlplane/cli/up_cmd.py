"""`cpctl up`: a local cluster on an embedded etcd, with a live status view."""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import replace
from typing import Any

from controlplane.cli.common import EXIT_OK, positive_float, positive_int
from controlplane.cli.etcd_cmd import start_embedded
from controlplane.cli.kvstore_cmd import _print_health
from controlplane.config import ClientSettings, EtcdClusterConfig, KvstoreConfig
from controlplane.kvstore.health import cluster_health
from controlplane.kvstore.shards import ShardMap


def register(subparsers: Any) -> None:
    up = subparsers.add_parser("up", help="run a local cluster on an embedded etcd")
    up.add_argument(
        "--etcd-members",
        type=int,
        choices=(1, 3),
        default=1,
        help="members of the embedded etcd (default 1)",
    )
    up.add_argument(
        "--duration",
        type=positive_float,
        metavar="SECONDS",
        help="stop after this long (default: run until Ctrl-C)",
    )
    up.add_argument(
        "--refresh",
        type=positive_float,
        default=5.0,
        metavar="SECONDS",
        help="status refresh interval (default 5)",
    )
    up.add_argument("--agents", type=positive_int, default=3, help=argparse.SUPPRESS)
    up.set_defaults(run=run_up)


async def run_up(args: argparse.Namespace) -> int:
    print(f"starting an embedded etcd with {args.etcd_members} member(s)...", flush=True)
    etcd = await start_embedded(args.etcd_members)
    try:
        endpoints = tuple(etcd.client_urls)
        print(f"etcd endpoints: {','.join(endpoints)}", flush=True)
        config = KvstoreConfig(
            clusters=(EtcdClusterConfig("default", endpoints),),
            client=replace(ClientSettings(), request_timeout=3.0),
        )
        deadline = time.monotonic() + args.duration if args.duration else None
        async with ShardMap(config) as shards:
            while True:
                print(f"\n--- kvstore health at {time.strftime('%H:%M:%S')} ---", flush=True)
                _print_health(await cluster_health(shards))
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                await asyncio.sleep(
                    args.refresh if remaining is None else min(args.refresh, remaining)
                )
    finally:
        print("stopping etcd...", flush=True)
        await etcd.stop()
    print("stopped.", flush=True)
    return EXIT_OK
