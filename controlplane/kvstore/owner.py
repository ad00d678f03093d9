"""The keys one owner (a node) keeps on one etcd cluster.

Every owned key is attached to one of the owner's leases, re-created when its lease is
lost, and repaired when someone else deletes or overwrites it. The owner's desired state
lives here in memory; etcd is made to match it.

A write or delete whose outcome is unknown (it timed out, the connection broke, it was
cancelled) may still land after its caller gave up. A failed :meth:`KeyOwner.put` keeps
the key owned (repairs retry the write); a caller that gives the key up calls
:meth:`KeyOwner.delete`. A delete that fails, or that follows a failed write, leaves the
key *abandoned*: no longer owned, deleted (only while it holds the value we wrote) once
etcd answers, retried until it does, and deleted again if the lost write lands later (the
repair watch sees our value come back).

Repairs need a list-then-watch of each repaired prefix. A store that already watches the
prefix (the agent's endpoint cache) hands its batches over with :meth:`KeyOwner.feeding`;
while no one feeds a prefix, the owner watches it itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field

from controlplane.keyedlocks import KeyedLocks
from controlplane.kvstore.backend import EtcdBackend
from controlplane.kvstore.errors import KvstoreError, LeaseLost
from controlplane.kvstore.session import LeaseManager
from controlplane.kvstore.types import Delete, EventType, WatchEvent, value_is
from controlplane.kvstore.watch import ListWatcher
from controlplane.metrics import StoreMetrics

log = logging.getLogger(__name__)

WriteFn = Callable[[bytes, bytes, int], Awaitable[None]]
"""Writes (key, value) attached to a lease; the default is a plain put."""

WITHDRAW_RETRY = 1.0
"""Seconds between attempts to delete an abandoned key while etcd does not answer."""


@dataclass(frozen=True, slots=True)
class _Owned:
    value: bytes
    resource: str
    write: WriteFn | None


@dataclass(slots=True)
class _Repaired:
    """One repaired prefix: which of its keys exist, and who watches it."""

    prefix: bytes
    present: set[bytes] = field(default_factory=set)
    feed: object | None = None
    """The watch of the prefix that hands its batches over (:meth:`KeyOwner.feeding`)."""
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when a feed starts or ends."""
    watching: bool = False
    """The owner's own watch of the prefix runs (no feed)."""


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
        self._abandoned: dict[bytes, bytes] = {}
        """key -> the value a failed write or delete may leave there (ours, to delete)."""
        self._unresolved: set[bytes] = set()
        """Abandoned keys whose delete has not been answered yet."""
        self._uncertain: dict[bytes, bytes] = {}
        """key -> the value of its last write, which failed (it may land later)."""
        self._lock: KeyedLocks[bytes] = KeyedLocks()
        self._repairs: dict[bytes, _Repaired] = {}
        # Keys to re-create or withdraw, drained by run(): a lease can be lost while one of
        # its keys is being written (its lock held), so re-creation never happens inline.
        self._pending: asyncio.Queue[tuple[bytes, str]] = asyncio.Queue()
        self._queued: set[bytes] = set()
        self.repaired_total = 0
        self.withdrawn_total = 0
        """Abandoned keys found holding our value and deleted."""
        self.events_observed = 0
        """Watch events the repair looked at (its own watch's or a feed's)."""

    def repair_under(self, prefix: bytes) -> None:
        """Repair owned keys changed under ``prefix`` once :meth:`run` starts (from a
        :meth:`feeding` watch of it, else from the owner's own watch)."""
        self._repairs.setdefault(prefix, _Repaired(prefix))

    def owns(self, key: bytes) -> bool:
        return key in self._owned

    def owned(self, prefix: bytes = b"") -> dict[bytes, bytes]:
        return {k: o.value for k, o in self._owned.items() if k.startswith(prefix)}

    def self_watched(self) -> list[bytes]:
        """The repaired prefixes the owner watches itself now (no one feeds them)."""
        return [p for p, r in self._repairs.items() if r.watching]

    def unresolved(self) -> frozenset[bytes]:
        """Abandoned keys not yet deleted (etcd has not answered since)."""
        return frozenset(self._unresolved)

    async def put(
        self, key: bytes, value: bytes, *, resource: str, write: WriteFn | None = None
    ) -> None:
        """Own ``key`` with ``value`` and write it, attached to one of our leases.

        When the write fails the key stays owned (repairs retry it); a caller that gives
        the key up instead calls :meth:`delete`, which also withdraws the failed write
        should it land later."""
        entry = _Owned(value, resource, write)
        async with self._lock(key):
            if key in self._unresolved:
                await self._delete_abandoned(key)  # an abandoned write must not linger
            self._abandoned.pop(key, None)
            self._owned[key] = entry
            try:
                await self._write(key, entry)
            except BaseException:
                self._uncertain[key] = value
                raise
            self._uncertain.pop(key, None)

    def track(
        self, key: bytes, value: bytes, *, resource: str, write: WriteFn | None = None
    ) -> None:
        """Own ``key``, which the caller has just written with a lease from ``self.leases``."""
        self._abandoned.pop(key, None)
        self._unresolved.discard(key)
        self._uncertain.pop(key, None)
        self._owned[key] = _Owned(value, resource, write)

    async def delete(self, key: bytes) -> None:
        """Stop owning ``key`` and delete it. If the delete fails, the key is abandoned:
        deleted in the background once etcd answers (the error is raised). After a failed
        write of the key, it is abandoned either way (that write may land later)."""
        async with self._lock(key):
            entry = self._owned.pop(key, None)
            self.leases.forget(key)
            lost = self._uncertain.pop(key, None)
            value = entry.value if entry is not None else lost or self._abandoned.get(key)
            try:
                await self.backend.delete(key)
            except BaseException:
                if value is not None:
                    self._abandon(key, value)
                raise
            self._unresolved.discard(key)
            if lost is not None:
                self._abandoned[key] = lost  # watched: deleted again if it lands late

    def abandon(self, key: bytes) -> None:
        """Give ``key`` up after its write failed: stop owning it, and delete it in the
        background while it holds the value we wrote (see the module)."""
        entry = self._owned.get(key)
        value = self._uncertain.pop(key, None) or (entry.value if entry is not None else None)
        if value is None:
            self.disown(key)
        else:
            self._abandon(key, value)

    def disown(self, key: bytes) -> None:
        """Stop owning ``key`` without deleting it (its lease keeps it until it expires)."""
        self._owned.pop(key, None)
        self.leases.forget(key)

    @contextlib.contextmanager
    def feeding(self, prefix: bytes) -> Iterator[Callable[[Sequence[WatchEvent]], None]]:
        """While in the context, the caller's list-then-watch of ``prefix`` on this
        owner's cluster feeds the repair (call the yielded function with every batch, in
        order, from a fresh list on); the owner's own watch of it stops meanwhile. The
        newest feed counts (an older one not closed yet is ignored)."""
        repaired = self._repairs.get(prefix)
        if repaired is None:
            raise ValueError(f"{prefix!r} is not repaired by this owner")
        token = object()
        repaired.feed = token
        repaired.present.clear()  # the feed lists from scratch
        repaired.changed.set()

        def observe(events: Sequence[WatchEvent]) -> None:
            if repaired.feed is token:
                self._observe(repaired, events)

        try:
            yield observe
        finally:
            if repaired.feed is token:
                repaired.feed = None
                repaired.changed.set()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self.leases.run(), name=f"leases:{self.backend.name}")
            group.create_task(self._drain(), name=f"recreate:{self.backend.name}")
            for prefix, repaired in self._repairs.items():
                group.create_task(self._watch_unless_fed(repaired), name=f"repair:{prefix!r}")

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

    # -- abandoned keys --------------------------------------------------------------

    def _abandon(self, key: bytes, value: bytes) -> None:
        self._owned.pop(key, None)
        self._uncertain.pop(key, None)
        self.leases.forget(key)
        self._abandoned[key] = value
        self._unresolved.add(key)
        self._enqueue(key, "withdraw")

    async def _delete_abandoned(self, key: bytes) -> None:
        """Delete ``key`` if it holds the value we abandoned there (lock held; raises)."""
        value = self._abandoned.get(key)
        if value is None or key in self._owned:
            self._unresolved.discard(key)
            return
        result = await self.backend.txn([value_is(key, value)], [Delete(key)])
        self._unresolved.discard(key)
        if result.succeeded:
            self.withdrawn_total += 1
            log.info("deleted %r: a write of ours whose caller was told it failed", key)

    async def _withdraw(self, key: bytes) -> None:
        async with self._lock(key):
            try:
                await self._delete_abandoned(key)
            except KvstoreError as exc:
                log.info("deleting abandoned %r failed (%s); retrying", key, exc)
                loop = asyncio.get_running_loop()
                loop.call_later(WITHDRAW_RETRY, self._enqueue, key, "withdraw")

    # -- the queue of keys to re-create or withdraw -----------------------------------

    def _enqueue(self, key: bytes, reason: str) -> None:
        if key not in self._queued:
            self._queued.add(key)
            self._pending.put_nowait((key, reason))

    async def _lease_lost(self, lease_id: int, keys: frozenset[bytes]) -> None:
        for key in sorted(keys):
            self._enqueue(key, "lease-lost")

    async def _drain(self) -> None:
        while True:
            key, reason = await self._pending.get()
            self._queued.discard(key)
            if key in self._owned:
                if reason != "withdraw":  # (owned again since: its put wrote it)
                    await self._restore(key, reason)
            elif key in self._abandoned:
                await self._withdraw(key)

    # -- repair watches --------------------------------------------------------------

    async def _watch_unless_fed(self, repaired: _Repaired) -> None:
        """The owner's own watch of ``repaired.prefix``, while no feed runs."""
        while True:
            repaired.changed.clear()
            if repaired.feed is not None:
                await repaired.changed.wait()
                continue
            repaired.present.clear()
            own = asyncio.create_task(self._own_watch(repaired))
            fed = asyncio.create_task(repaired.changed.wait())
            repaired.watching = True
            try:
                await asyncio.wait({own, fed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                repaired.watching = False
                for task in (own, fed):
                    task.cancel()
                await asyncio.gather(own, fed, return_exceptions=True)
            if own.done() and not own.cancelled() and (exc := own.exception()) is not None:
                raise exc

    async def _own_watch(self, repaired: _Repaired) -> None:
        async for batch in ListWatcher(self.backend, repaired.prefix).batches():
            if repaired.feed is not None:
                return  # a feed took over (this task is being cancelled)
            self._observe(repaired, batch)

    def _observe(self, repaired: _Repaired, events: Sequence[WatchEvent]) -> None:
        """Queue the repairs (and withdrawals) that a batch of watch events calls for."""
        present, owned, abandoned = repaired.present, self._owned, self._abandoned
        list_done, deleted = EventType.LIST_DONE, EventType.DELETE
        self.events_observed += len(events)
        for event in events:
            key, type_ = event.key, event.type
            if type_ is list_done:
                # Owned keys deleted before this (re-)list show up only as absent.
                for missing in sorted(self.owned(repaired.prefix).keys() - present):
                    self._enqueue(missing, "deleted")
                continue
            if type_ is deleted:
                present.discard(key)
                if key in owned:
                    self._enqueue(key, "deleted")
                continue
            present.add(key)
            entry = owned.get(key)
            if entry is not None:
                if event.value != entry.value or event.lease not in self.leases.leases:
                    self._enqueue(key, "changed")
            elif key in abandoned and event.value == abandoned[key]:
                self._enqueue(key, "withdraw")  # a lost write of ours landed late


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
