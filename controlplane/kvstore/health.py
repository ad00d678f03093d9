"""Health of every shard and every member: what `cpctl kvstore health` reports.

Each member is asked on a connection of its own (so a dead member cannot hide behind a
live one), and each shard gets one linearizable read to prove it has a quorum.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from controlplane import codec
from controlplane.config import ClientSettings, EtcdClusterConfig
from controlplane.kvstore.backend import EtcdBackend
from controlplane.kvstore.errors import KvstoreError, PermissionDenied
from controlplane.kvstore.heartbeat import Heartbeat
from controlplane.kvstore.keys import KeyLayout
from controlplane.kvstore.shards import ShardMap


@dataclass(frozen=True, slots=True)
class EndpointHealth:
    endpoint: str
    reachable: bool
    error: str | None = None
    version: str | None = None
    member_id: str | None = None
    is_leader: bool = False
    leader: str | None = None
    raft_term: int | None = None
    raft_index: int | None = None
    revision: int | None = None
    db_size: int | None = None
    db_size_in_use: int | None = None
    latency_ms: float | None = None
    alarms: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ShardHealth:
    name: str
    healthy: bool
    status: str
    """"healthy", "degraded: ...", or the reason it is unhealthy."""
    quorum: bool
    quorum_error: str | None
    revision: int | None
    leader: str | None
    heartbeat_age: float | None
    heartbeat_threshold: float | None
    heartbeat_writer: str | None
    lease_count: int | None
    endpoints: tuple[EndpointHealth, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


async def endpoint_health(
    cluster: EtcdClusterConfig, endpoint: str, settings: ClientSettings
) -> EndpointHealth:
    single = replace(cluster, endpoints=(endpoint,))
    backend = EtcdBackend(single, settings, own_connection=True, fail_fast=True)
    try:
        await backend.connect()
        started = time.perf_counter()
        status = await backend.status()
        latency = (time.perf_counter() - started) * 1000
    except PermissionDenied as exc:
        # It answered, but this user may not read its status (some etcd 3.5 releases
        # reserve Maintenance.Status for root).
        return EndpointHealth(endpoint, True, error=f"status not permitted: {exc}")
    except KvstoreError as exc:
        return EndpointHealth(endpoint, False, error=str(exc))
    finally:
        await backend.close()
    return EndpointHealth(
        endpoint,
        True,
        version=status.version,
        member_id=f"{status.member_id:x}",
        is_leader=status.leader == status.member_id,
        leader=f"{status.leader:x}" if status.leader else None,
        raft_term=status.raft_term,
        raft_index=status.raft_index,
        revision=status.revision,
        db_size=status.db_size,
        db_size_in_use=status.db_size_in_use,
        latency_ms=round(latency, 2),
        alarms=status.errors,
    )


async def shard_health(
    backend: EtcdBackend, layout: KeyLayout, *, now: float | None = None
) -> ShardHealth:
    # A quick probe: health must answer within seconds even when etcd does not.
    probe = replace(backend.settings, request_timeout=min(backend.settings.request_timeout, 3.0))
    endpoints = await asyncio.gather(
        *(endpoint_health(backend.cluster, e, probe) for e in backend.cluster.endpoints)
    )
    quorum_error: str | None = None
    revision: int | None = None
    heartbeat: Heartbeat | None = None
    heartbeat_error: str | None = None
    leases: int | None = None
    quorum_backend = EtcdBackend(
        backend.cluster, probe, own_connection=True, probe_key=layout.heartbeat
    )
    try:
        await quorum_backend.connect()
        revision = await quorum_backend.current_revision()
        kv = await quorum_backend.get(layout.heartbeat)
        if kv is not None:
            try:
                heartbeat = Heartbeat.decode(kv.value)
            except codec.DecodeError as exc:
                heartbeat_error = f"malformed heartbeat: {exc}"
        with contextlib.suppress(PermissionDenied):  # listing leases may need root
            leases = await quorum_backend.count_leases()
    except KvstoreError as exc:
        quorum_error = str(exc)
    finally:
        await quorum_backend.close()

    reachable = [e for e in endpoints if e.reachable]
    leaders = {e.leader for e in reachable if e.leader}
    leader = next(iter(leaders)) if len(leaders) == 1 else None
    age = threshold = None
    if heartbeat is not None:
        age = max(0.0, (now or time.time()) - heartbeat.ts)
        threshold = 2 * heartbeat.interval

    problems: list[str] = []
    if quorum_error is not None:
        problems.append("no quorum" if reachable else "unreachable")
    if heartbeat_error:
        problems.append(heartbeat_error)
    if age is not None and threshold is not None and age > threshold:
        problems.append(f"heartbeat stale ({age:.0f}s > {threshold:.0f}s)")
    if problems:
        status = "; ".join(problems)
    elif len(reachable) < len(endpoints):
        down = len(endpoints) - len(reachable)
        status = f"degraded: {down}/{len(endpoints)} members unreachable"
    else:
        alarms = sorted({a for e in reachable for a in e.alarms})
        status = f"degraded: alarms {', '.join(alarms)}" if alarms else "healthy"
    return ShardHealth(
        name=backend.name,
        healthy=not problems,
        status=status,
        quorum=quorum_error is None,
        quorum_error=quorum_error,
        revision=revision,
        leader=leader,
        heartbeat_age=round(age, 1) if age is not None else None,
        heartbeat_threshold=threshold,
        heartbeat_writer=heartbeat.writer if heartbeat else None,
        lease_count=leases,
        endpoints=tuple(endpoints),
    )


async def cluster_health(shards: ShardMap) -> list[ShardHealth]:
    layout = KeyLayout(shards.prefix)
    return list(await asyncio.gather(*(shard_health(b, layout) for b in shards.all())))
