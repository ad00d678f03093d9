"""Throughput and watch latency of our etcd layer next to bare aetcd, measured in one run.

Both sides talk to the same etcd member of the same cluster, one after the other, in
interleaved rounds: round 1 starts every measurement with ours, round 2 with bare, and so
on; within a measurement the sides take turns in short slices (A B B A ...). etcd 3.4
changes speed with its history (see BENCHMARKING.md), and other processes on the machine
come and go, so only a ratio measured this way means anything. Rates are medians of the
per-round rates; the client's CPU time per operation is recorded too (steadier than rates
on a busy machine).

- ours: :class:`EtcdBackend` (with :class:`ListWatcher` for watches).
- bare: ``aetcd.Client(host, port)`` and its own methods.

Each side uses one client object, so all of a side's concurrent workers share one gRPC
connection. Every round writes fresh keys under its own prefix; keys are deleted in small
chunks (never one big range delete) at the end of the run, or after each round on request.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

import aetcd

from controlplane.bench.common import (
    BenchError,
    Progress,
    bare_endpoint,
    delete_in_chunks,
    embedded_etcd,
    package_version,
    percentile,
    utc_stamp,
)
from controlplane.config import ClientSettings, EtcdClusterConfig
from controlplane.kvstore.backend import EtcdBackend
from controlplane.kvstore.embedded import find_etcd_binary
from controlplane.kvstore.errors import KvstoreError
from controlplane.kvstore.types import EventType
from controlplane.kvstore.watch import ListWatcher

Side = Literal["ours", "bare"]
SIDES: tuple[Side, Side] = ("ours", "bare")
THROUGHPUT_OPS: tuple[str, ...] = ("put", "get", "txn")
OPERATIONS: tuple[str, ...] = (*THROUGHPUT_OPS, "watch")
SHARED_CONNECTION_NOTE = (
    "each side uses one client object: all of its concurrent workers share one gRPC "
    "connection (ours: EtcdBackend with its own subchannel pool; bare: aetcd.Client)"
)


@dataclass(frozen=True, slots=True)
class BenchParams:
    concurrency: tuple[int, ...] = (1, 32)
    rounds: int = 6
    duration: float | None = 1.0
    """Seconds per measurement (one operation, one concurrency, one side, one round)."""
    ops: int | None = None
    """Operations per measurement instead of a duration."""
    slices: int = 4
    """Each measurement is split into this many turns per side, alternating the sides."""
    watch_events: int = 200
    """Watch-latency samples per side per round."""
    value_size: int = 100
    get_keys: int = 1000
    """Keys seeded per round for the get measurement (both sides read the same keys)."""
    operations: tuple[str, ...] = OPERATIONS
    prefix: str = "cp/"
    """The run's keys live under ``<prefix>bench/<run id>/``."""
    delete_each_round: bool = False
    """Delete a round's keys (in small chunks) once it is done, not only at the end."""
    cleanup: bool = True
    timeout: float = 10.0
    """Longest wait for one watch event before the run fails."""

    def __post_init__(self) -> None:
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError("concurrency levels must be positive")
        if min(self.rounds, self.watch_events, self.get_keys, self.slices) < 1:
            raise ValueError("rounds, slices, watch_events and get_keys must be positive")
        if (self.duration is None) == (self.ops is None):
            raise ValueError("give exactly one of duration and ops")
        if self.duration is not None and self.duration <= 0:
            raise ValueError("duration must be positive")
        if self.ops is not None and self.ops < 1:
            raise ValueError("ops must be positive")
        unknown = set(self.operations) - set(OPERATIONS)
        if unknown or not self.operations:
            raise ValueError(f"operations must be some of {', '.join(OPERATIONS)}")


@dataclass(frozen=True, slots=True)
class Measurement:
    """One side's run of one operation at one concurrency in one round."""

    ops: int
    seconds: float
    cpu_seconds: float = 0.0
    """CPU time this process (the client, including gRPC's threads) spent meanwhile."""

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_per_op(self) -> float:
        return self.cpu_seconds / self.ops if self.ops else 0.0

    def __add__(self, other: Measurement) -> Measurement:
        return Measurement(
            self.ops + other.ops,
            self.seconds + other.seconds,
            self.cpu_seconds + other.cpu_seconds,
        )


@dataclass(slots=True)
class ThroughputRow:
    operation: str
    concurrency: int
    ours: list[Measurement] = field(default_factory=list)
    bare: list[Measurement] = field(default_factory=list)

    def rates(self, side: Side) -> list[float]:
        return [m.rate for m in (self.ours if side == "ours" else self.bare)]

    def median(self, side: Side) -> float:
        rates = self.rates(side)
        return statistics.median(rates) if rates else 0.0

    def cpu_per_op(self, side: Side) -> float:
        """Median client CPU seconds per operation over the rounds."""
        values = [m.cpu_per_op for m in (self.ours if side == "ours" else self.bare)]
        return statistics.median(values) if values else 0.0

    @property
    def ratio(self) -> float:
        bare = self.median("bare")
        return self.median("ours") / bare if bare > 0 else 0.0

    @property
    def round_ratios(self) -> list[float]:
        return [o / b for o, b in zip(self.rates("ours"), self.rates("bare"), strict=False) if b]

    def to_json(self) -> dict[str, Any]:
        ratios = self.round_ratios
        return {
            "operation": self.operation,
            "concurrency": self.concurrency,
            "ours_ops_per_s": round(self.median("ours"), 1),
            "bare_ops_per_s": round(self.median("bare"), 1),
            "ratio": round(self.ratio, 4),
            "round_ratio_min": round(min(ratios), 4) if ratios else None,
            "round_ratio_max": round(max(ratios), 4) if ratios else None,
            "ours_client_cpu_us_per_op": round(self.cpu_per_op("ours") * 1e6, 1),
            "bare_client_cpu_us_per_op": round(self.cpu_per_op("bare") * 1e6, 1),
            "rounds": {
                side: [
                    {
                        "ops": m.ops,
                        "seconds": round(m.seconds, 4),
                        "ops_per_s": round(m.rate, 1),
                        "client_cpu_us_per_op": round(m.cpu_per_op * 1e6, 1),
                    }
                    for m in (self.ours if side == "ours" else self.bare)
                ]
                for side in SIDES
            },
        }


@dataclass(slots=True)
class LatencyRow:
    """Watch latency: from just before a put is sent to the watcher yielding its event."""

    operation: str = "watch"
    concurrency: int = 1
    ours: list[float] = field(default_factory=list)
    bare: list[float] = field(default_factory=list)
    ours_rounds: list[float] = field(default_factory=list)
    """p50 of each round, ours."""
    bare_rounds: list[float] = field(default_factory=list)
    ours_rounds_p99: list[float] = field(default_factory=list)
    bare_rounds_p99: list[float] = field(default_factory=list)

    def samples(self, side: Side) -> list[float]:
        return self.ours if side == "ours" else self.bare

    def p(self, side: Side, q: float) -> float:
        return percentile(self.samples(side), q)

    def ratio(self, q: float) -> float:
        bare = self.p("bare", q)
        return self.p("ours", q) / bare if bare > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        def stats(side: Side) -> dict[str, Any]:
            samples = self.samples(side)
            return {
                "count": len(samples),
                "p50_ms": round(self.p(side, 50) * 1000, 3),
                "p99_ms": round(self.p(side, 99) * 1000, 3),
                "mean_ms": round(statistics.fmean(samples) * 1000, 3) if samples else None,
                "max_ms": round(max(samples) * 1000, 3) if samples else None,
                "round_p50_ms": [
                    round(v * 1000, 3)
                    for v in (self.ours_rounds if side == "ours" else self.bare_rounds)
                ],
                "round_p99_ms": [
                    round(v * 1000, 3)
                    for v in (self.ours_rounds_p99 if side == "ours" else self.bare_rounds_p99)
                ],
            }

        return {
            "operation": self.operation,
            "concurrency": self.concurrency,
            "ours": stats("ours"),
            "bare": stats("bare"),
            "ratio_p50": round(self.ratio(50), 4),
            "ratio_p99": round(self.ratio(99), 4),
        }


@dataclass(slots=True)
class BenchResult:
    params: BenchParams
    environment: dict[str, Any]
    run_prefix: str
    started_at: str
    finished_at: str = ""
    seconds: float = 0.0
    throughput: list[ThroughputRow] = field(default_factory=list)
    latency: list[LatencyRow] = field(default_factory=list)
    keys_deleted: int = 0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        params = asdict(self.params)
        params["concurrency"] = list(self.params.concurrency)
        params["operations"] = list(self.params.operations)
        return {
            "benchmark": "kvstore",
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "seconds": round(self.seconds, 2),
            "environment": self.environment,
            "parameters": params,
            "run_prefix": self.run_prefix,
            "sides": {
                "ours": "controlplane EtcdBackend (ListWatcher for watches)",
                "bare": "aetcd.Client(host, port) methods (watch_prefix for watches)",
            },
            "throughput": [row.to_json() for row in self.throughput],
            "latency": [row.to_json() for row in self.latency],
            "keys_deleted": self.keys_deleted,
            "notes": self.notes,
        }


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


async def run_kvstore_bench(
    cluster: EtcdClusterConfig,
    params: BenchParams,
    settings: ClientSettings | None = None,
    *,
    progress: Progress | None = None,
    environment: dict[str, Any] | None = None,
) -> BenchResult:
    """Benchmark ours against bare aetcd on ``cluster`` (both on its first endpoint)."""
    say = progress or (lambda _line: None)
    host, port = bare_endpoint(cluster)
    endpoint = cluster.endpoints[0]
    # Both sides talk to the same single member.
    one_member = replace(cluster, endpoints=(endpoint,))
    settings = settings or ClientSettings()
    backend = EtcdBackend(one_member, settings, own_connection=True)
    # The same per-request deadline as ours, so both sides pay for a deadline timer.
    client = aetcd.Client(
        host,
        port,
        username=cluster.username,
        password=cluster.password,
        timeout=settings.request_timeout,
    )
    run_id = f"{utc_stamp()}-{uuid.uuid4().hex[:6]}"
    run_prefix = f"{params.prefix}bench/{run_id}/"
    prefix = run_prefix.encode()
    started = time.perf_counter()
    result = BenchResult(params, {}, run_prefix, datetime.now(UTC).isoformat(timespec="seconds"))
    result.notes += [
        SHARED_CONNECTION_NOTE,
        f"interleaved rounds on one member ({endpoint}); odd rounds run ours first, even "
        "rounds bare first; rates are medians of per-round rates",
        "watch latency: one writer and one watcher on a fresh prefix, both on the side's "
        "client; from just before the put is sent to the watcher yielding the event",
        f"both sides use a {settings.request_timeout:g}s deadline per request",
    ]
    try:
        try:
            await backend.connect()
            await client.connect()
            result.environment = await _environment(backend, endpoint, environment or {})
            await _run(backend, client, prefix, params, result, say)
        except BaseException:
            if params.cleanup:
                # Best effort: the cluster may be the reason this run failed.
                with contextlib.suppress(Exception):
                    result.keys_deleted += await delete_in_chunks(backend, prefix)
            raise
        if params.cleanup:
            result.keys_deleted += await delete_in_chunks(backend, prefix)
    except KvstoreError as exc:
        raise BenchError(f"ours (EtcdBackend): {exc}") from exc
    except aetcd.ClientError as exc:
        raise BenchError(f"bare aetcd: {type(exc).__name__}: {exc}") from exc
    finally:
        with contextlib.suppress(Exception):
            await client.close()
        await backend.close()
    result.seconds = time.perf_counter() - started
    result.finished_at = datetime.now(UTC).isoformat(timespec="seconds")
    return result


async def run_kvstore_bench_embedded(
    members: int,
    params: BenchParams,
    settings: ClientSettings,
    *,
    progress: Progress,
) -> BenchResult:
    """:func:`run_kvstore_bench` on an etcd of ``members`` started for the run (stopped
    after it); the environment names the etcd binary."""
    async with embedded_etcd(members, progress) as etcd:
        cluster = EtcdClusterConfig("embedded", tuple(etcd.client_urls))
        environment = {"embedded": True, "etcd_binary": str(find_etcd_binary())}
        return await run_kvstore_bench(
            cluster, params, settings, progress=progress, environment=environment
        )


async def _run(
    backend: EtcdBackend,
    client: Any,
    prefix: bytes,
    params: BenchParams,
    result: BenchResult,
    say: Progress,
) -> None:
    value = os.urandom(params.value_size // 2 + 1).hex()[: params.value_size].encode()
    sides: dict[str, _Ours | _Bare] = {"ours": _Ours(backend, value), "bare": _Bare(client, value)}
    say(_header(result, params))
    await _warm_up(sides, prefix + b"warmup/", max(params.concurrency))
    if "watch" in params.operations:
        result.latency.append(LatencyRow())
    for op in THROUGHPUT_OPS:
        if op in params.operations:
            for c in params.concurrency:
                result.throughput.append(ThroughputRow(op, c))
    for r in range(1, params.rounds + 1):
        round_started = time.perf_counter()
        order: tuple[Side, Side] = ("ours", "bare") if r % 2 else ("bare", "ours")
        round_prefix = prefix + b"r%d/" % r
        await _run_round(sides, order, round_prefix, params, result)
        if params.delete_each_round:
            result.keys_deleted += await delete_in_chunks(backend, round_prefix)
        say(_round_line(r, params.rounds, order, result, time.perf_counter() - round_started))


async def _environment(
    backend: EtcdBackend, endpoint: str, extra: dict[str, Any]
) -> dict[str, Any]:
    status = await backend.status()
    members = await backend.members()
    return {
        "etcd_version": status.version,
        "etcd_members": len(members),
        "endpoint": endpoint,
        "endpoint_is_leader": status.leader == status.member_id,
        "etcd_db_size_at_start": status.db_size,
        "etcd_revision_at_start": status.revision,
        "python": platform.python_version(),
        "aetcd": package_version("aetcd"),
        "grpcio": package_version("grpcio"),
        "protobuf": package_version("protobuf"),
        "controlplane": package_version("controlplane"),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "event_loop": type(asyncio.get_running_loop()).__module__,
        **extra,
    }


async def _warm_up(sides: dict[str, _Ours | _Bare], prefix: bytes, concurrency: int) -> None:
    """Open both connections and warm both code paths before anything is measured."""
    for name, side in sides.items():
        side_prefix = prefix + name.encode() + b"/"
        for op in (side.put, side.get, side.txn):
            await drive(op, side_prefix + op.__name__.encode() + b"/", concurrency, ops=200)
        await side.watch_latencies(side_prefix + b"watch/", 5, 10.0)


async def _run_round(
    sides: dict[str, _Ours | _Bare],
    order: tuple[Side, Side],
    prefix: bytes,
    params: BenchParams,
    result: BenchResult,
) -> None:
    get_keys: list[bytes] = []
    if "get" in params.operations:
        get_keys = [b"%sget/%06d" % (prefix, i) for i in range(params.get_keys)]
        await _seed(sides["ours"], get_keys)
    for row in result.throughput:
        totals = {name: Measurement(0, 0.0) for name in SIDES}
        # Within a measurement the sides take turns in slices (A B B A ...), so that a
        # disturbance of a few seconds (another process, an fsync stall) hits both alike.
        for part in range(params.slices):
            for name in order if part % 2 == 0 else order[::-1]:
                key_prefix = b"%s%s/%s/c%d/s%d/" % (
                    prefix,
                    name.encode(),
                    row.operation.encode(),
                    row.concurrency,
                    part,
                )
                measurement, failures = await drive(
                    getattr(sides[name], row.operation),
                    key_prefix,
                    row.concurrency,
                    ops=_share(params.ops, params.slices, part),
                    duration=params.duration / params.slices if params.duration else None,
                    keys=get_keys if row.operation == "get" else None,
                )
                if failures:
                    raise BenchError(
                        f"{name}: {failures} of {measurement.ops} {row.operation} ops failed "
                        "(a get found nothing or a create-only txn found its key)"
                    )
                totals[name] = totals[name] + measurement
        row.ours.append(totals["ours"])
        row.bare.append(totals["bare"])
    for lat in result.latency:
        for name in order:
            samples = await sides[name].watch_latencies(
                b"%s%s/watch/" % (prefix, name.encode()), params.watch_events, params.timeout
            )
            (lat.ours if name == "ours" else lat.bare).extend(samples)
            if name == "ours":
                lat.ours_rounds.append(percentile(samples, 50))
                lat.ours_rounds_p99.append(percentile(samples, 99))
            else:
                lat.bare_rounds.append(percentile(samples, 50))
                lat.bare_rounds_p99.append(percentile(samples, 99))


def _share(total: int | None, parts: int, part: int) -> int | None:
    """Part ``part`` of ``total`` split into ``parts`` near-equal parts."""
    if total is None:
        return None
    return total // parts + (1 if part < total % parts else 0)


async def _seed(side: _Ours | _Bare, keys: Sequence[bytes]) -> None:
    queue = iter(keys)

    async def worker() -> None:
        for key in queue:
            await side.put(key)

    async with asyncio.TaskGroup() as group:
        for _ in range(min(32, len(keys))):
            group.create_task(worker())


def _header(result: BenchResult, params: BenchParams) -> str:
    env = result.environment
    per = f"{params.duration:g}s" if params.duration is not None else f"{params.ops} ops"
    ops = ",".join(o for o in THROUGHPUT_OPS if o in params.operations)
    watch = f" + watch x{params.watch_events}" if "watch" in params.operations else ""
    levels = ",".join(str(c) for c in params.concurrency)
    return (
        f"bench kvstore: etcd {env['etcd_version']}, {env['etcd_members']} member(s), "
        f"via {env['endpoint']}; {params.rounds} rounds of {{{ops}}} @ concurrency {levels}, "
        f"{per} each, per side{watch}; ours=EtcdBackend, bare=aetcd.Client, one connection "
        "per side"
    )


def _round_line(
    r: int, rounds: int, order: tuple[Side, Side], result: BenchResult, seconds: float
) -> str:
    parts = []
    for row in result.throughput:
        ours, bare = row.ours[-1].rate, row.bare[-1].rate
        parts.append(f"{row.operation}@{row.concurrency} {ours / bare if bare else 0:.2f}")
    for lat in result.latency:
        ours_p50, bare_p50 = lat.ours_rounds[-1], lat.bare_rounds[-1]
        parts.append(f"watch-p50 {ours_p50 / bare_p50 if bare_p50 else 0:.2f}")
    return f"round {r}/{rounds} ({order[0]} first, {seconds:.1f}s) ours/bare: " + "  ".join(parts)
