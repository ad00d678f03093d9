"""What every benchmark shares: errors, statistics, cleanup, where it measures (a configured
cluster or an embedded etcd started for the run) and its JSON record."""

from __future__ import annotations

import importlib.metadata
import json
import statistics
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from controlplane.config import ClientSettings, EtcdClusterConfig, KvstoreConfig
from controlplane.kvstore.backend import EtcdBackend
from controlplane.kvstore.embedded import EmbeddedEtcd, EtcdNotFound, EtcdStartError
from controlplane.kvstore.types import Delete
from controlplane.stats import percentile

Progress = Callable[[str], None]
Record = dict[str, Any]

STORE_MODES = ("kvstore", "crd")
"""The store modes a benchmark can measure side by side."""

RESULTS_DIR = Path("bench/results")
CLEANUP_PAGE = 1000
"""Keys listed per page when cleaning up."""
TXN_DELETES = 100
"""Single-key deletes per cleanup transaction (etcd allows 128 operations per txn)."""


class BenchError(Exception):
    """The benchmark could not run or an operation failed; one line for the operator."""


def latency_summary_ms(samples: Sequence[float], digits: int) -> dict[str, float]:
    """p50, p99, max and mean of latencies in seconds, as milliseconds rounded to
    ``digits``."""
    ms = [s * 1000 for s in samples]
    return {
        "p50_ms": round(percentile(ms, 50), digits),
        "p99_ms": round(percentile(ms, 99), digits),
        "max_ms": round(max(ms), digits),
        "mean_ms": round(statistics.fmean(ms), digits),
    }


def utc_stamp(moment: datetime | None = None) -> str:
    """A UTC timestamp for file names: 20250101T120000Z."""
    return (moment or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


async def delete_in_chunks(backend: EtcdBackend, prefix: bytes, page: int = CLEANUP_PAGE) -> int:
    """Delete every key under ``prefix`` in small transactions; returns how many.

    One range delete of many keys would leave etcd 3.4 slower until it restarts (see
    BENCHMARKING.md), so each transaction deletes at most ``TXN_DELETES`` single keys.
    """
    deleted = 0
    while True:
        kvs, _, _ = await backend.list_page(prefix, limit=page)
        if not kvs:
            return deleted
        for start in range(0, len(kvs), TXN_DELETES):
            chunk = kvs[start : start + TXN_DELETES]
            result = await backend.txn([], [Delete(kv.key) for kv in chunk])
            deleted += sum(r.deleted for r in result.results)


def bare_endpoint(cluster: EtcdClusterConfig) -> tuple[str, int]:
    """Host and port of ``cluster``'s first endpoint, for a bare (plaintext) aetcd client."""
    url = cluster.endpoints[0]
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise BenchError(f"bare aetcd speaks plaintext only; {url} is {parts.scheme}://")
    if parts.hostname is None or parts.port is None:
        raise BenchError(f"endpoint {url}: want host:port")
    return parts.hostname, parts.port


# -- where a benchmark measures, and its record -------------------------------------------


@asynccontextmanager
async def embedded_etcd(members: int, progress: Progress) -> AsyncIterator[EmbeddedEtcd]:
    """An etcd of ``members`` on loopback, started for the run and stopped after it."""
    progress(f"starting an embedded etcd with {members} member(s)...")
    etcd = EmbeddedEtcd(members)
    try:
        await etcd.start()
    except (EtcdNotFound, EtcdStartError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BenchError(first_line) from exc
    try:
        yield etcd
    finally:
        await etcd.stop()


async def measure(
    run: Callable[[KvstoreConfig], Awaitable[Record]],
    config: KvstoreConfig | None,
    *,
    members: int,
    timeout: float,
    progress: Progress,
) -> tuple[Record, KvstoreConfig]:
    """Run one benchmark on ``config``'s cluster or, without one, on an embedded etcd of
    ``members`` (stopped afterwards); returns its record and the config it ran on."""
    if config is not None:
        record = await run(config)
        record["embedded_members"] = None
        return record, config
    async with embedded_etcd(members, progress) as etcd:
        settings = ClientSettings(request_timeout=max(10.0, timeout))
        cluster = EtcdClusterConfig("embedded", tuple(etcd.client_urls))
        config = KvstoreConfig((cluster,), client=settings)
        record = await run(config)
    record["embedded_members"] = members
    return record, config


def record_path(name: str) -> Path:
    """Where a run's JSON record goes unless told: bench/results/<name>-<UTC time>.json."""
    return RESULTS_DIR / f"{name}-{utc_stamp()}.json"


def write_record(path: Path, record: Record) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
    except OSError as exc:
        raise BenchError(f"cannot write {path}: {exc.strerror}") from exc
