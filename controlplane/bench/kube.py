"""The local Kubernetes API server next to bare etcd, in one run (`cpctl bench kube`).

Three shapes, each measured through the API server (a `cpctl kube up` subprocess on the
target etcd, reached over HTTPS with its token) and through bare etcd (our EtcdBackend on
the same etcd), from the same client process:

- creates/s: N objects created by C concurrent workers (POST; bare: puts of the same JSON);
- list: one list of every object (GET, JSON decoded; bare: a prefix read, values decoded);
- watch fan-out: W watchers of the collection and U updates; latency from just before the
  write to each watcher's receipt (API server: PATCH then HTTP watch streams; bare: put,
  then W etcd watch streams), p50 and p99.

The API server's objects and the bare keys live under different prefixes of one etcd, and
both are deleted afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aetcd import rpc

from controlplane.bench.common import BenchError, Progress, Record, utc_stamp
from controlplane.config import KvstoreConfig
from controlplane.kvstore.backend import EtcdBackend
from controlplane.kvstore.types import prefix_range_end


@dataclass(frozen=True)
class KubeBenchParams:
    creates: int = 2000
    """Objects created per side."""
    concurrency: int = 32
    """Create workers."""
    list_size: int = 10_000
    """Objects listed (at least ``creates``: the created objects are part of the list)."""
    rounds: int = 3
    """Interleaved create rounds; list rounds (their median)."""
    watchers: int = 100
    updates: int = 50
    """Updates the watchers receive."""


GROUP, PLURAL, KIND = "bench.controlplane.io", "items", "Item"
COLLECTION = f"/apis/{GROUP}/v1/namespaces/default/{PLURAL}"
BARE_PREFIX = "/bench-bare/items/"
_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"{PLURAL}.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {"plural": PLURAL, "kind": KIND},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                        },
                    }
                },
            }
        ],
    },
}


def _item(i: int) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/v1",
        "kind": KIND,
        "metadata": {"name": f"item-{i:06d}", "labels": {"bench": "kube"}},
        "spec": {
            "index": i,
            "node": f"node-{i % 100}",
            "ip": f"10.{i // 65536}.{i // 256 % 256}.{i % 256}",
        },
    }


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def _start_server(endpoints: list[str], data_dir: Path) -> tuple[Any, dict[str, Any]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "controlplane.cli.main",
        "kube",
        "up",
        "--json",
        "--data-dir",
        str(data_dir),
        "--etcd-endpoints",
        ",".join(endpoints),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    if not line:
        raise BenchError("cpctl kube up did not start")
    return proc, json.loads(line)


def _session(info: dict[str, Any], connections: int) -> aiohttp.ClientSession:
    kubeconfig = yaml.safe_load(Path(info["kubeconfig"]).read_text())
    token = kubeconfig["users"][0]["user"]["token"]
    context = ssl.create_default_context(cafile=info["ca_file"])
    return aiohttp.ClientSession(
        base_url=info["url"],
        connector=aiohttp.TCPConnector(ssl=context, limit=connections),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )


async def _parallel(count: int, workers: int, one: Callable[[int], Awaitable[None]]) -> float:
    """Seconds to run ``one(i)`` for every i in ``range(count)`` with ``workers`` at once."""
    next_index = iter(range(count))

    async def worker() -> None:
        for i in next_index:
            await one(i)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return time.perf_counter() - start


async def _creates(
    http: aiohttp.ClientSession, backend: EtcdBackend, params: KubeBenchParams
) -> Record:
    """Creates through the API server and bare puts, in interleaved rounds."""

    base = 0  # the first object index of the current round

    async def api_create(i: int) -> None:
        async with http.post(COLLECTION, json=_item(base + i)) as response:
            if response.status != 201:
                raise BenchError(f"create failed: {response.status} {await response.text()}")

    async def bare_put(i: int) -> None:
        key = f"{BARE_PREFIX}item-{base + i:06d}".encode()
        await backend.put(key, json.dumps(_item(base + i)).encode())

    n, c, rounds = params.creates, params.concurrency, min(params.rounds, params.creates)
    api_s = bare_s = 0.0
    for r in range(rounds):
        size = n // rounds + (1 if r < n % rounds else 0)
        api_s += await _parallel(size, c, api_create)
        bare_s += await _parallel(size, c, bare_put)
        base += size
    api, bare = n / api_s, n / bare_s
    return {
        "count": n,
        "concurrency": c,
        "rounds": rounds,
        "api_per_s": api,
        "bare_per_s": bare,
        "ratio": api / bare,
    }


async def _fill(backend: EtcdBackend, prefix: str, start: int, end: int) -> None:
    """Store objects directly (what the API server would store), to reach the list size."""

    async def put(i: int) -> None:
        obj = _item(i)
        obj["metadata"].update(
            {
                "namespace": "default",
                "uid": f"bench-{i}",
                "creationTimestamp": "2026-01-01T00:00:00Z",
                "generation": 1,
            }
        )
        await backend.put(f"{prefix}{obj['metadata']['name']}".encode(), json.dumps(obj).encode())

    if end > start:
        await _parallel(end - start, 64, lambda i: put(start + i))


async def _lists(
    http: aiohttp.ClientSession, backend: EtcdBackend, params: KubeBenchParams
) -> Record:
    size = params.list_size
    await _fill(backend, f"/registry/{GROUP}/{PLURAL}/default/", params.creates, size)
    await _fill(backend, BARE_PREFIX, params.creates, size)
    api_times, bare_times = [], []
    for _ in range(params.rounds):
        start = time.perf_counter()
        async with http.get(COLLECTION) as response:
            body = await response.json()
        api_times.append(time.perf_counter() - start)
        if len(body["items"]) != size:
            raise BenchError(f"listed {len(body['items'])} objects, expected {size}")
        start = time.perf_counter()
        listed = await backend.list_prefix(BARE_PREFIX.encode())
        [json.loads(kv.value) for kv in listed.kvs]
        bare_times.append(time.perf_counter() - start)
    api, bare = statistics.median(api_times), statistics.median(bare_times)
    return {"objects": size, "api_s": api, "bare_s": bare, "ratio": api / bare}


async def _api_watchers(
    http: aiohttp.ClientSession,
    count: int,
    rv: str,
    seen: list[dict[int, float]],
    ready: asyncio.Event,
) -> list[asyncio.Task[None]]:
    connected = 0

    async def watch(slot: dict[int, float]) -> None:
        nonlocal connected
        params = {"watch": "true", "resourceVersion": rv, "timeoutSeconds": "600"}
        async with http.get(COLLECTION, params=params) as response:
            connected += 1
            if connected == count:
                ready.set()
            async for line in response.content:
                event = json.loads(line)
                slot[int(event["object"]["spec"]["seq"])] = time.perf_counter()

    return [asyncio.create_task(watch(slot)) for slot in seen]


async def _bare_watchers(
    backend: EtcdBackend, seen: list[dict[int, float]], ready: asyncio.Event
) -> list[asyncio.Task[None]]:
    created = 0

    async def watch(slot: dict[int, float]) -> None:
        nonlocal created
        call = backend.watch_stream()
        try:
            key = f"{BARE_PREFIX}watched".encode()
            await call.write(
                rpc.WatchRequest(
                    create_request=rpc.WatchCreateRequest(key=key, range_end=prefix_range_end(key))
                )
            )
            while True:
                response = await call.read()
                if response.created:
                    created += 1
                    if created == len(seen):
                        ready.set()
                for event in response.events:
                    slot[int(json.loads(event.kv.value)["spec"]["seq"])] = time.perf_counter()
        finally:
            call.cancel()

    return [asyncio.create_task(watch(slot)) for slot in seen]


async def _fanout(
    http: aiohttp.ClientSession, backend: EtcdBackend, params: KubeBenchParams
) -> Record:
    watchers, updates = params.watchers, params.updates
    obj = _item(999_999)
    obj["metadata"]["name"] = "watched"
    obj["spec"]["seq"] = -1
    async with http.post(COLLECTION, json=obj) as response:
        rv = (await response.json())["metadata"]["resourceVersion"]
    results: Record = {"watchers": watchers, "updates": updates}
    for side in ("api", "bare"):
        seen: list[dict[int, float]] = [{} for _ in range(watchers)]
        ready = asyncio.Event()
        if side == "api":
            tasks = await _api_watchers(http, watchers, rv, seen, ready)
        else:
            tasks = await _bare_watchers(backend, seen, ready)
        latencies: list[float] = []
        try:
            await asyncio.wait_for(ready.wait(), 60)
            await asyncio.sleep(0.2)
            for seq in range(updates):
                sent = time.perf_counter()
                if side == "api":
                    patch = {"spec": {"seq": seq}}
                    async with http.patch(
                        f"{COLLECTION}/watched",
                        json=patch,
                        headers={"Content-Type": "application/merge-patch+json"},
                    ) as response:
                        await response.read()
                else:
                    obj["spec"]["seq"] = seq
                    await backend.put(f"{BARE_PREFIX}watched".encode(), json.dumps(obj).encode())
                deadline = time.monotonic() + 10
                while any(seq not in slot for slot in seen):
                    if time.monotonic() > deadline:
                        raise BenchError(f"{side} watchers missed update {seq}")
                    await asyncio.sleep(0.001)
                latencies.extend(slot[seq] - sent for slot in seen)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        results[side] = {
            "p50_ms": 1000 * _percentile(latencies, 0.5),
            "p99_ms": 1000 * _percentile(latencies, 0.99),
        }
    results["p99_ratio"] = results["api"]["p99_ms"] / results["bare"]["p99_ms"]
    return results


async def run_kube_bench(
    config: KvstoreConfig, params: KubeBenchParams, progress: Progress
) -> Record:
    """Start `cpctl kube up` on ``config``'s first cluster and measure the three shapes."""
    if params.list_size < params.creates:
        params = replace(params, list_size=params.creates)
    cluster = config.clusters[0]
    started = utc_stamp()
    record: Record = {"bench": "kube", "started": started, "etcd": list(cluster.endpoints)}
    with tempfile.TemporaryDirectory(prefix="cp-bench-kube-") as data_dir:
        proc, info = await _start_server(list(cluster.endpoints), Path(data_dir))
        backend = EtcdBackend(cluster, config.client)
        http = _session(info, max(params.concurrency, params.watchers) + 8)
        try:
            await backend.connect()
            async with http.post(
                "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", json=_CRD
            ) as response:
                if response.status not in (201, 409):
                    raise BenchError(f"CRD create failed: {await response.text()}")
            progress(f"creates: {params.creates} objects, {params.concurrency} at once, each side")
            record["creates"] = await _creates(http, backend, params)
            progress(f"list: {params.list_size} objects, {params.rounds} rounds")
            record["list"] = await _lists(http, backend, params)
            progress(f"watch fan-out: {params.watchers} watchers, {params.updates} updates")
            record["fanout"] = await _fanout(http, backend, params)
        finally:
            await http.close()
            with contextlib.suppress(Exception):
                await backend.delete(f"/registry/{GROUP}/".encode(), prefix=True)
                await backend.delete(BARE_PREFIX.encode(), prefix=True)
                await backend.delete(
                    f"/registry/apiextensions.k8s.io/customresourcedefinitions/{PLURAL}.{GROUP}".encode()
                )
            await backend.close()
            proc.terminate()
            await proc.wait()
    return record
