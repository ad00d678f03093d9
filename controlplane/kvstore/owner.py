"""The keys one owner (a node) keeps on one etcd cluster.

Every owned key is attached to one of the owner's leases, re-created when its lease is
lost, and repaired when someone else deletes or overwrites it. The owner's desired state
lives here in memory; etcd is made to match it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from controlplane.keyedlocks import KeyedLocks
from controlplane.kvstore.backend import EtcdBackend
from controlplane.kvstore.errors import KvstoreError, LeaseLost
from controlplane.kvstore.session import LeaseManager
from controlplane.kvstore.types import EventType
from controlplane.kvstore.watch import ListWatcher
from controlplane.metrics import StoreMetrics

log = logging.getLogger(__name__)

WriteFn = Callable[[bytes, bytes, int], Awaitable[None]]
"""Writes (key, value) attached to a lease; the default is a plain put."""


@dataclass(frozen=True, slots=True)
class _Owned:
    value: bytes
    resource: str
    write: WriteFn | None


class KeyOwner:
    """One owner's keys on one cluster; run :meth:`run` in the owner's TaskGroup."""

    def __init__(
        self,
        backend: EtcdBackend,
        metrics: StoreMetrics,
        *,
        ttl: int = 900,
        max_keys_per_lease: int = 1000,
        keepalive_interval: float | None = None,
    ) -> None:
        self.backend = backend
        self.metrics = metrics
        self.leases = LeaseManager(
            backend,
            ttl=ttl,
            max_keys_per_lease=max_keys_per_lease,
            keepalive_interval=keepalive_interval,
        )
        self.leases.on_lost(self._lease_lost)
        self._owned: dict[bytes, _Owned] = {}
        self._lock: KeyedLocks[bytes] = KeyedLocks()
        self._repair_prefixes: list[bytes] = []
        # Keys to re-create, drained by run(): a lease can be lost while one of its keys is
        # being written (its lock held), so re-creation never happens inline.
        self._pending: asyncio.Queue[tuple[bytes, str]] = asyncio.Queue()
        self._queued: set[bytes] = set()
        self.repaired_total = 0

    def repair_under(self, prefix: bytes) -> None:
        """Watch ``prefix`` (once :meth:`run` starts) and repair owned keys changed there."""
        self._repair_prefixes.append(prefix)

    def owns(self, key: bytes) -> bool:
        return key in self._owned

    def owned(self, prefix: bytes = b"") -> dict[bytes, bytes]:
        return {k: o.value for k, o in self._owned.items() if k.startswith(prefix)}

    async def put(
        self, key: bytes, value: bytes, *, resource: str, write: WriteFn | None = None
    ) -> None:
        """Own ``key`` with ``value`` and write it, attached to one of our leases."""
        entry = _Owned(value, resource, write)
        async with self._lock(key):
            self._owned[key] = entry
            await self._write(key, entry)

    def track(
        self, key: bytes, value: bytes, *, resource: str, write: WriteFn | None = None
    ) -> None:
        """Own ``key``, which the caller has just written with a lease from ``self.leases``."""
        self._owned[key] = _Owned(value, resource, write)

    async def delete(self, key: bytes) -> None:
        """Stop owning ``key`` and delete it."""
        async with self._lock(key):
            self._owned.pop(key, None)
            self.leases.forget(key)
            await self.backend.delete(key)

    def disown(self, key: bytes) -> None:
        """Stop owning ``key`` without deleting it (its lease keeps it until it expires)."""
        self._owned.pop(key, None)
        self.leases.forget(key)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self.leases.run(), name=f"leases:{self.backend.name}")
            group.create_task(self._drain(), name=f"recreate:{self.backend.name}")
            for prefix in self._repair_prefixes:
                group.create_task(self._repair(prefix), name=f"repair:{prefix!r}")

    async def _write(self, key: bytes, entry: _Owned) -> None:
        for attempt in range(2):
            lease = await self.leases.lease_for(key)
            try:
                if entry.write is not None:
                    await entry.write(key, entry.value, lease)
                else:
                    await self.backend.put(key, entry.value, lease=lease)
                return
            except LeaseLost:
                if attempt == 1:
                    raise
                await self.leases.invalidate(lease)

    async def _restore(self, key: bytes, reason: str) -> None:
        async with self._lock(key):
            entry = self._owned.get(key)
            if entry is None:
                return
            try:
                await self._write(key, entry)
            except KvstoreError as exc:
                # The next lease loss or watch event retries; never give up the key.
                log.warning("re-creating %r failed (%s): %s", key, reason, exc)
                return
            self.repaired_total += 1
            self.metrics.repairs.labels(entry.resource, reason).inc()

    async def _lease_lost(self, lease_id: int, keys: frozenset[bytes]) -> None:
        for key in sorted(keys - self._queued):
            self._queued.add(key)
            self._pending.put_nowait((key, "lease-lost"))

    async def _drain(self) -> None:
        while True:
            key, reason = await self._pending.get()
            self._queued.discard(key)
            await self._restore(key, reason)

    async def _repair(self, prefix: bytes) -> None:
        present: set[bytes] = set()
        async for event in ListWatcher(self.backend, prefix).events():
            if event.type is EventType.LIST_DONE:
                # Owned keys deleted before this (re-)list show up only as absent.
                for key in sorted(self.owned(prefix).keys() - present):
                    await self._restore(key, "deleted")
                continue
            if event.type is EventType.DELETE:
                present.discard(event.key)
            else:
                present.add(event.key)
            entry = self._owned.get(event.key)
            if entry is None:
                continue
            if event.type is EventType.DELETE:
                await self._restore(event.key, "deleted")
            elif event.value != entry.value or event.lease not in self.leases.leases:
                await self._restore(event.key, "changed")


class Owners:
    """One :class:`KeyOwner` per cluster for one node (one lease pool per shard)."""

    def __init__(
        self,
        metrics: StoreMetrics,
        *,
        ttl: int = 900,
        max_keys_per_lease: int = 1000,
        keepalive_interval: float | None = None,
    ) -> None:
        self.metrics = metrics
        self._ttl = ttl
        self._max_keys = max_keys_per_lease
        self._keepalive_interval = keepalive_interval
        self._owners: dict[str, KeyOwner] = {}
        self._running = False

    def for_backend(self, backend: EtcdBackend) -> KeyOwner:
        """The owner on ``backend`` (created on first use; only before :meth:`run`)."""
        owner = self._owners.get(backend.name)
        if owner is None:
            if self._running:
                raise RuntimeError("owners must be created before run() starts")
            owner = KeyOwner(
                backend,
                self.metrics,
                ttl=self._ttl,
                max_keys_per_lease=self._max_keys,
                keepalive_interval=self._keepalive_interval,
            )
            self._owners[backend.name] = owner
        return owner

    def all(self) -> list[KeyOwner]:
        return list(self._owners.values())

    async def run(self) -> None:
        self._running = True
        async with asyncio.TaskGroup() as group:
            for name, owner in self._owners.items():
                group.create_task(owner.run(), name=f"owner:{name}")
