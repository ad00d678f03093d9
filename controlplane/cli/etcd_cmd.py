"""`cpctl etcd up`: run an embedded etcd in the foreground for local work."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from controlplane.cli.common import (
    EXIT_OK,
    CommandError,
    add_json_flag,
    positive_float,
    positive_int,
)
from controlplane.kvstore.embedded import EmbeddedEtcd, EtcdNotFound, EtcdStartError


def register(subparsers: Any) -> None:
    etcd = subparsers.add_parser("etcd", help="run a local etcd")
    commands = etcd.add_subparsers(dest="etcd_command", required=True, metavar="COMMAND")
    up = commands.add_parser("up", help="start an etcd cluster on loopback until Ctrl-C")
    up.add_argument("--members", type=positive_int, default=1, help="members (default 1)")
    up.add_argument("--data-dir", type=Path, help="keep data here (default: a temp dir)")
    up.add_argument(
        "--duration",
        type=positive_float,
        metavar="SECONDS",
        help="stop after this long (default: run until Ctrl-C)",
    )
    add_json_flag(up)
    up.set_defaults(run=run_up)


async def start_embedded(members: int, data_dir: Path | None = None) -> EmbeddedEtcd:
    etcd = EmbeddedEtcd(members, data_dir=data_dir)
    try:
        await etcd.start()
    except (EtcdNotFound, EtcdStartError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CommandError(first_line) from exc
    return etcd


async def run_up(args: argparse.Namespace) -> int:
    etcd = await start_embedded(args.members, args.data_dir)
    try:
        endpoints = ",".join(etcd.client_urls)
        if args.json:
            print(
                json.dumps(
                    {"endpoints": etcd.client_urls, "members": [m.name for m in etcd.members]}
                ),
                flush=True,
            )
        else:
            print(f"etcd is up with {args.members} member(s).", flush=True)
            print(f"  export CP_KVSTORE_ENDPOINTS={endpoints}", flush=True)
            print(f"  cpctl kvstore health --kvstore-endpoints {endpoints}", flush=True)
            print("Ctrl-C stops it.", flush=True)
        if args.duration:
            await asyncio.sleep(args.duration)
        else:
            await asyncio.Event().wait()
    finally:
        await etcd.stop()
    return EXIT_OK
