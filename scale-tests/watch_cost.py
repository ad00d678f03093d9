"""What an agent's endpoint watch path costs per endpoint event: one watch feeding both the
ipcache and the repair of the node's own records, next to the two watches agents ran
before (the ipcache's, and the KeyOwner's own watch of the same prefix).

    .venv/bin/python scale-tests/watch_cost.py [--agents 40] [--endpoints 2000] [--rounds 2]

Many agents' endpoint stores in this one process (as in a scale worker), each with its own
etcd connection, owner and one endpoint of its own; another process creates and deletes
``--endpoints`` records; the figure is this process's CPU time from the first write until
every agent's watch delivered every change, per agent per event. Rounds alternate the two
ways, fresh stores each time, on one embedded etcd member.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from ipaddress import ip_address

from controlplane.config import EtcdClusterConfig, KvstoreConfig
from controlplane.kvstore.embedded import EmbeddedEtcd
from controlplane.kvstore.endpoints import KvEndpointStore
from controlplane.kvstore.keys import KeyLayout
from controlplane.kvstore.owner import KeyOwner, Owners
from controlplane.kvstore.shards import ShardMap
from controlplane.metrics import StoreMetrics
from controlplane.model import Endpoint, IPIdentity, NodeName, NumericIdentity
from controlplane.store_types import EventKind, StoreEvent

LAYOUT = KeyLayout()

WRITER = """
import asyncio, sys
from ipaddress import ip_address
from controlplane import codec
from controlplane.config import EtcdClusterConfig, KvstoreConfig
from controlplane.kvstore.keys import KeyLayout
from controlplane.kvstore.shards import ShardMap
from controlplane.model import Endpoint, NodeName, NumericIdentity

async def main(urls, count, delete):
    layout = KeyLayout()
    config = KvstoreConfig((EtcdClusterConfig("default", tuple(urls.split(","))),))
    async with ShardMap(config) as shards:
        backend = shards.backends["default"]
        gate = asyncio.Semaphore(32)
        async def one(i):
            ip = ip_address("10.128.0.0") + i
            key = layout.ip("default", str(ip))
            async with gate:
                if delete:
                    await backend.delete(key)
                    return
                ep = Endpoint(ip=ip, identity=NumericIdentity(1000 + i % 50),
                              node=NodeName("writer"), host_ip=ip_address("192.168.0.9"),
                              name=f"w{i}", namespace="bench")
                await backend.put(key, codec.encode("endpoint", ep.to_dict()))
        await asyncio.gather(*(one(i) for i in range(count)))

asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "delete"))
"""


async def _write(urls: str, count: int, what: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WRITER, urls, str(count), what
    )
    if await proc.wait() != 0:
        raise SystemExit(f"the writer failed ({what})")


async def _until(check: Callable[[], bool]) -> None:
    """Poll plain state (counters the consumers bump) until ``check`` holds."""
    for _ in itertools.count():
        if check():
            return
        await asyncio.sleep(0.01)


async def _round(etcd: EmbeddedEtcd, agents: int, endpoints: int, fed: bool) -> dict[str, object]:
    config = KvstoreConfig((EtcdClusterConfig("default", tuple(etcd.client_urls)),))
    counts = [0] * agents
    synced = [False] * agents
    owners: list[KeyOwner] = []
    async with AsyncExitStack() as stack:
        stores: list[KvEndpointStore] = []
        for i in range(agents):
            shards = await stack.enter_async_context(ShardMap(config, own_connection=True))
            group = Owners(StoreMetrics.create(), ttl=60)
            store = KvEndpointStore(
                shards, LAYOUT, StoreMetrics.create(), group, node=NodeName(f"n{i}")
            )
            await store.upsert(
                Endpoint(
                    ip=ip_address("10.0.0.1") + i,
                    identity=NumericIdentity(1000),
                    node=NodeName(f"n{i}"),
                    host_ip=ip_address("192.168.0.1"),
                    name=f"own{i}",
                    namespace="bench",
                )
            )
            owners.append(group.for_backend(shards.backends["default"]))
            stores.append(store)
            run = asyncio.create_task(group.run())
            stack.callback(run.cancel)

        def stream(store: KvEndpointStore) -> AsyncIterator[list[StoreEvent[IPIdentity]]]:
            if fed:
                return store.watch_ip_identities()
            # what the ipcache watched before: the same records, feeding nothing
            return store.codec.watch_batches(
                store.shards, "endpoints", store.prefix, store.build_ip_identity
            )

        async def consume(i: int) -> None:
            async for batch in stream(stores[i]):
                for event in batch:
                    if event.kind is EventKind.SYNCED:
                        synced[i] = True
                    elif event.name.startswith("10.128."):
                        counts[i] += 1

        tasks = [asyncio.create_task(consume(i)) for i in range(agents)]
        try:
            want_self = [] if fed else [LAYOUT.ip_prefix("default")]
            await _until(lambda: all(synced) and all(o.self_watched() == want_self for o in owners))
            observed = sum(o.events_observed for o in owners)
            urls = ",".join(etcd.client_urls)
            cpu0, wall0 = time.process_time(), time.monotonic()
            await _write(urls, endpoints, "put")
            await _write(urls, endpoints, "delete")
            await _until(lambda: min(counts) >= 2 * endpoints)
            cpu = time.process_time() - cpu0
            wall = time.monotonic() - wall0
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    events = agents * 2 * endpoints
    return {
        "watches_per_agent": 1 if fed else 2,
        "cpu_s": round(cpu, 2),
        "wall_s": round(wall, 2),
        "cpu_us_per_agent_event": round(cpu / events * 1e6, 1),
        "repair_events_per_agent_event": round(
            (sum(o.events_observed for o in owners) - observed) / events, 2
        ),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=40)
    parser.add_argument("--endpoints", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    async with EmbeddedEtcd(1) as etcd:
        for r in range(args.rounds):
            for fed in (r % 2 == 0, r % 2 == 1):
                result = await _round(etcd, args.agents, args.endpoints, fed)
                print(json.dumps({"round": r + 1, **result}), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
