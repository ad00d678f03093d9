"""A bare watcher process for the propagation benchmark's baseline.

Watches a prefix through the plain etcd layer (no stores, no caches, no maps) and prints
one line per put, ``<monotonic receive time> <key>``, until it has seen ``--count`` puts.
``time.monotonic`` is one clock for every process on a Linux host, so the benchmark can
subtract the writer's timestamps from these.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from controlplane.config import ClientSettings, EtcdClusterConfig, parse_endpoints
from controlplane.kvstore.backend import EtcdBackend
from controlplane.kvstore.types import EventType
from controlplane.kvstore.watch import ListWatcher


async def watch(endpoints: str, prefix: str, count: int) -> None:
    cluster = EtcdClusterConfig("bench", parse_endpoints(endpoints))
    async with EtcdBackend(cluster, ClientSettings(), own_connection=True) as backend:
        seen = 0
        async for event in ListWatcher(backend, prefix.encode()).events():
            if event.type is EventType.LIST_DONE:
                print("ready", flush=True)
            elif event.type is EventType.PUT:
                print(f"{time.monotonic():.6f} {event.key.decode()}", flush=True)
                seen += 1
                if seen >= count:
                    return


def main() -> int:
    parser = argparse.ArgumentParser(prog="fanout_watcher")
    parser.add_argument("--endpoints", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--count", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(watch(args.endpoints, args.prefix, args.count))
    return 0


if __name__ == "__main__":
    sys.exit(main())
