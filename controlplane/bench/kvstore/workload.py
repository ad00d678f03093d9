"""The kvstore benchmark's workload: the two sides' operations (put, get, create-only txn,
watch latency) and :func:`drive`, which runs one operation from concurrent workers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from controlplane.bench.common import BenchError
from controlplane.bench.kvstore.report import Measurement
from controlplane.kvstore.backend import EtcdBackend
from controlplane.kvstore.types import EventType
from controlplane.kvstore.watch import ListWatcher

# -- the two sides --------------------------------------------------------------------------

KeyOp = Callable[[bytes], Awaitable[bool]]
"""One operation on one key; False when it did not do what it should (a miss, a conflict)."""


class _Ours:
    def __init__(self, backend: EtcdBackend, value: bytes) -> None:
        self.backend = backend
        self.value = value

    async def put(self, key: bytes) -> bool:
        await self.backend.put(key, self.value)
        return True

    async def get(self, key: bytes) -> bool:
        return await self.backend.get(key) is not None

    async def txn(self, key: bytes) -> bool:
        return await self.backend.create(key, self.value)

    async def watch_latencies(self, prefix: bytes, count: int, timeout: float) -> list[float]:
        ready = asyncio.Event()
        pending: dict[bytes, asyncio.Future[float]] = {}

        async def consume() -> None:
            async for event in ListWatcher(self.backend, prefix).events():
                now = time.perf_counter()
                if event.type is EventType.LIST_DONE:
                    ready.set()
                    continue
                waiter = pending.pop(event.key, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(now)

        task = asyncio.create_task(consume(), name="bench-watch-ours")
        try:
            await _wait_or_fail(asyncio.ensure_future(ready.wait()), task, timeout, "ours")
            return await _timed_puts(
                self.backend.put, prefix, self.value, count, pending, task, timeout, "ours"
            )
        finally:
            await _cancel(task)


class _Bare:
    def __init__(self, client: Any, value: bytes) -> None:
        self.client = client
        self.value = value

    async def put(self, key: bytes) -> bool:
        await self.client.put(key, self.value)
        return True

    async def get(self, key: bytes) -> bool:
        return await self.client.get(key) is not None

    async def txn(self, key: bytes) -> bool:
        tx = self.client.transactions
        succeeded, _ = await self.client.transaction(
            compare=[tx.create(key) == 0], success=[tx.put(key, self.value)], failure=[]
        )
        return bool(succeeded)

    async def watch_latencies(self, prefix: bytes, count: int, timeout: float) -> list[float]:
        pending: dict[bytes, asyncio.Future[float]] = {}
        watch = await self.client.watch_prefix(prefix)  # returns once etcd created the watch

        async def consume() -> None:
            async for event in watch:
                now = time.perf_counter()
                waiter = pending.pop(event.kv.key, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(now)

        task = asyncio.create_task(consume(), name="bench-watch-bare")
        try:
            return await _timed_puts(
                self.client.put, prefix, self.value, count, pending, task, timeout, "bare"
            )
        finally:
            with contextlib.suppress(Exception):
                await watch.cancel()
            await _cancel(task)


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


async def _wait_or_fail(
    waiter: asyncio.Future[Any], watcher: asyncio.Task[None], timeout: float, side: str
) -> Any:
    """Wait for ``waiter``; fail if the watcher task ends first or time runs out."""
    done, _ = await asyncio.wait({waiter, watcher}, timeout=timeout, return_when="FIRST_COMPLETED")
    if waiter in done:
        return waiter.result()
    waiter.cancel()
    if watcher in done:
        exc = watcher.exception() if not watcher.cancelled() else None
        raise BenchError(f"{side}: the watcher stopped: {exc!r}")
    raise BenchError(f"{side}: no watch event within {timeout:g}s")


async def _timed_puts(
    put: Callable[[bytes, bytes], Awaitable[Any]],
    prefix: bytes,
    value: bytes,
    count: int,
    pending: dict[bytes, asyncio.Future[float]],
    watcher: asyncio.Task[None],
    timeout: float,
    side: str,
) -> list[float]:
    loop = asyncio.get_running_loop()
    samples: list[float] = []
    for i in range(count):
        key = b"%s%06d" % (prefix, i)
        waiter: asyncio.Future[float] = loop.create_future()
        pending[key] = waiter
        start = time.perf_counter()
        await put(key, value)
        arrived: float = await _wait_or_fail(waiter, watcher, timeout, side)
        samples.append(arrived - start)
    return samples


# -- driving ---------------------------------------------------------------------------------


async def drive(
    op: KeyOp,
    key_prefix: bytes,
    concurrency: int,
    *,
    ops: int | None = None,
    duration: float | None = None,
    keys: Sequence[bytes] | None = None,
) -> tuple[Measurement, int]:
    """Run ``op`` from ``concurrency`` workers; returns the measurement and failed ops.

    Worker ``w`` uses keys ``<key_prefix><w>/<i>``, or with ``keys`` cycles through them.
    """
    counts = [0] * concurrency
    failures = 0
    total = ops or 0
    quotas = [
        total // concurrency + (1 if w < total % concurrency else 0) for w in range(concurrency)
    ]
    cpu_start = time.process_time()
    start = time.perf_counter()
    deadline = start + (duration or 0.0)

    async def worker(w: int) -> None:
        nonlocal failures
        base = b"%s%d/" % (key_prefix, w)
        i = 0
        stride = len(keys) if keys else 0
        offset = (w * 7919) % stride if stride else 0
        while (i < quotas[w]) if ops is not None else (time.perf_counter() < deadline):
            key = keys[(offset + i) % stride] if keys else b"%s%d" % (base, i)
            if not await op(key):
                failures += 1
            i += 1
        counts[w] = i

    async with asyncio.TaskGroup() as group:
        for w in range(concurrency):
            group.create_task(worker(w))
    elapsed = time.perf_counter() - start
    return Measurement(sum(counts), elapsed, time.process_time() - cpu_start), failures
