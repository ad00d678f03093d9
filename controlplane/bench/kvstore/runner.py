"""Running the kvstore benchmark: connecting both sides to one etcd member, warming them up,
the interleaved rounds and slices, and cleaning up the run's keys."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import aetcd

from controlplane.bench.common import (
    BenchError,
    Progress,
    bare_endpoint,
    delete_in_chunks,
    embedded_etcd,
    package_version,
    utc_stamp,
)
from controlplane.bench.kvstore.params import SIDES, THROUGHPUT_OPS, BenchParams, Side
from controlplane.bench.kvstore.report import (
    BenchResult,
    LatencyRow,
    Measurement,
    ThroughputRow,
    _header,
    _round_line,
)
from controlplane.bench.kvstore.workload import _Bare, _Ours, drive
from controlplane.config import ClientSettings, EtcdClusterConfig
from controlplane.kvstore.backend import EtcdBackend
from controlplane.kvstore.embedded import find_etcd_binary
from controlplane.kvstore.errors import KvstoreError
from controlplane.stats import percentile

SHARED_CONNECTION_NOTE = (
    "each side uses one client object: all of its concurrent workers share one gRPC "
    "connection (ours: EtcdBackend with its own subchannel pool; bare: aetcd.Client)"
)


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
