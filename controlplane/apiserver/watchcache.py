"""One etcd watch per resource, fanned out to every client watch of that resource.

The cache watches the resource's key prefix from the revision it started at and keeps the
last ``capacity`` changes in a ring. A client watch from resourceVersion X replays the
ring's changes after X, then follows live ones, in revision order, with no gap and no
repeat. X older than the ring's floor is refused (410, "too old resource version"), as is
X older than etcd's compaction. A client that falls ``capacity`` changes behind is closed
(it re-lists, as with kube-apiserver) rather than slowing everyone else down. A watch from
a revision newer than the cache's own (another key's write) simply starts after it: each
client skips changes at or below its revision, so none is sent twice or out of order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from aetcd import rpc

from controlplane.apiserver.storage import Obj, decode
from controlplane.kvstore.backend import EtcdBackend
from controlplane.kvstore.errors import KvstoreError, translate
from controlplane.kvstore.types import prefix_range_end

log = logging.getLogger(__name__)


class TooOld(Exception):
    """The requested revision is older than the cache's history."""

    def __init__(self, requested: int, oldest: int) -> None:
        super().__init__(f"too old resource version: {requested} ({oldest})")
        self.requested = requested
        self.oldest = oldest


class Change:
    """One change of one key, its objects decoded from etcd's values when first read.

    Most changes are never read (no watcher, or one that filters them out, or they age out
    of the ring), so the JSON of ``obj`` and ``prev`` is decoded on first access, once.
    """

    __slots__ = ("_obj", "_prev", "_raw", "key", "lines", "revision", "type")

    def __init__(
        self,
        type: str,
        key: str,
        obj: Obj | None,
        prev: Obj | None,
        revision: int,
        raw: tuple[bytes, int, bytes, int] | None = None,
    ) -> None:
        self.type = type
        """ADDED, MODIFIED or DELETED."""
        self.key = key
        self.revision = revision
        self.lines: dict[tuple[str, str], bytes] = {}
        """Encoded watch events of this change, by (event type, apiVersion): encoded once,
        sent to every watcher that sees it the same way."""
        self._obj = obj
        self._prev = prev
        self._raw = raw
        """(value, its revision, previous value, its revision): what ``obj`` and ``prev``
        are decoded from when they were not given."""

    @property
    def obj(self) -> Obj:
        """The object after the change; for DELETED, its last state at the deleting
        revision."""
        if self._obj is None:
            value, revision = self._raw[0], self._raw[1]  # type: ignore[index]
            self._obj = decode(value, revision) if value else {"metadata": {}}
        return self._obj

    @property
    def prev(self) -> Obj | None:
        """The object before the change (None if it did not exist)."""
        if self._prev is None and self._raw is not None and self._raw[2]:
            self._prev = decode(self._raw[2], self._raw[3])
        return self._prev


@dataclass(eq=False)
class Subscription:
    prefix: str
    queue: asyncio.Queue[Change | None] = field(default_factory=asyncio.Queue)
    closed: bool = False


class WatchCache:
    """Watches ``prefix`` in etcd from the moment it starts; see the module docstring."""

    def __init__(self, backend: EtcdBackend, prefix: str, *, capacity: int = 10_000) -> None:
        self.backend = backend
        self.prefix = prefix
        self.capacity = capacity
        self.revision = 0
        """Every change up to this revision is in the ring (or was evicted from it)."""
        self.floor = 0
        """The oldest revision a client watch may start from."""
        self._ring: deque[Change] = deque()
        self._subscribers: set[Subscription] = set()
        self._listeners: list[Callable[[Change], None]] = []
        self._task: asyncio.Task[None] | None = None

    def add_listener(self, listener: Callable[[Change], None]) -> None:
        self._listeners.append(listener)

    async def start(self, revision: int = 0) -> None:
        self.revision = self.floor = revision or await self.backend.current_revision()
        self._task = asyncio.create_task(self._run(), name=f"watchcache {self.prefix}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for sub in list(self._subscribers):
            self._close(sub)

    # -- clients -----------------------------------------------------------------------

    def subscribe(self, after: int, prefix: str) -> Subscription:
        """Changes under ``prefix`` after revision ``after``: the ring's, then live ones."""
        if after < self.floor:
            raise TooOld(after, self.floor)
        sub = Subscription(prefix)
        for change in self._ring:
            if change.revision > after and change.key.startswith(prefix):
                sub.queue.put_nowait(change)
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)

    def _close(self, sub: Subscription) -> None:
        if not sub.closed:
            sub.closed = True
            sub.queue.put_nowait(None)
        self._subscribers.discard(sub)

    # -- the etcd side -----------------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                await self._watch()
            except KvstoreError as exc:
                failures += 1
                delay = min(2.0, 0.05 * 2**failures)
                log.info("watch cache %s: %s; resuming in %.2fs", self.prefix, exc, delay)
                await asyncio.sleep(delay)

    async def _watch(self) -> None:
        call = self.backend.watch_stream()
        try:
            create = rpc.WatchCreateRequest(
                key=self.prefix.encode(),
                range_end=prefix_range_end(self.prefix.encode()),
                start_revision=self.revision + 1,
                progress_notify=True,
                prev_kv=True,
            )
            await call.write(rpc.WatchRequest(create_request=create))
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    raise KvstoreError(f"watch of {self.prefix} ended")
                if response.canceled:
                    if response.compact_revision:
                        await self._reset(response.compact_revision)
                        return
                    raise KvstoreError(f"watch canceled by etcd: {response.cancel_reason}")
                if response.events:
                    self._deliver(response.events)
                elif not response.created and response.header.revision > self.revision:
                    self.revision = response.header.revision
        except grpc.aio.AioRpcError as exc:
            raise translate(exc, self.backend.name) from exc
        except asyncio.InvalidStateError as exc:
            raise KvstoreError(f"watch of {self.prefix} ended") from exc
        finally:
            call.cancel()

    async def _reset(self, compacted: int) -> None:
        """etcd compacted past our position: history is lost, so every client re-lists."""
        log.warning("watch cache %s: revision compacted (%d); resetting", self.prefix, compacted)
        for sub in list(self._subscribers):
            self._close(sub)
        self._ring.clear()
        self.revision = self.floor = await self.backend.current_revision()

    def _deliver(self, events: object) -> None:
        for event in events:  # type: ignore[attr-defined]
            change = _change(event)
            if change.revision <= self.revision:
                continue  # replayed after a resume
            self._ring.append(change)
            if len(self._ring) > self.capacity:
                self.floor = self._ring.popleft().revision
            for listener in self._listeners:
                listener(change)
            for sub in list(self._subscribers):
                if not change.key.startswith(sub.prefix):
                    continue
                if sub.queue.qsize() >= self.capacity:
                    log.info("watch cache %s: a client fell behind; closing it", self.prefix)
                    self._close(sub)
                else:
                    sub.queue.put_nowait(change)
        # Every event of one revision arrives in one response.
        last = events[-1].kv.mod_revision  # type: ignore[index]
        self.revision = max(self.revision, last)


def _change(event: object) -> Change:
    kv = event.kv  # type: ignore[attr-defined]
    prev_kv = event.prev_kv  # type: ignore[attr-defined]
    key = kv.key.decode()
    if event.type == rpc.Event.PUT:  # type: ignore[attr-defined]
        kind = "ADDED" if kv.create_revision == kv.mod_revision else "MODIFIED"
        raw = (kv.value, kv.mod_revision, prev_kv.value, prev_kv.mod_revision)
        return Change(kind, key, None, None, kv.mod_revision, raw)
    # a deleted object's last state is its previous value, at the deleting revision
    raw = (prev_kv.value, kv.mod_revision, prev_kv.value, prev_kv.mod_revision)
    return Change("DELETED", key, None, None, kv.mod_revision, raw)
