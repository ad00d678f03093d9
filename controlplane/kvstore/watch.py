"""List-then-watch over one prefix of one etcd cluster.

Emits every listed key, then ``LIST_DONE``, then changes in revision order. A broken stream
resumes from the last revision seen, so nothing is lost or repeated. Only when etcd has
compacted past that revision does it re-list, and then it marks and sweeps: puts for keys
that are new or changed, synthetic deletes for keys that vanished, then ``LIST_DONE``.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from aetcd import rpc

from controlplane.kvstore.backend import LIST_PAGE_SIZE, EtcdBackend
from controlplane.kvstore.errors import KvstoreError, PermissionDenied, channel_closed, translate
from controlplane.kvstore.types import EventType, WatchEvent, prefix_range_end

log = logging.getLogger(__name__)


class _Relist(Exception):
    """etcd compacted the revision the watch wanted; only a re-list can continue."""


@dataclass(slots=True)
class WatchStats:
    lists: int = 0
    resumes: int = 0
    compactions: int = 0
    events: int = 0


class ListWatcher:
    """Lists ``prefix`` and then watches it, forever, resuming across failures."""

    def __init__(
        self,
        backend: EtcdBackend,
        prefix: bytes,
        *,
        page_size: int = LIST_PAGE_SIZE,
        max_backoff: float = 2.0,
    ) -> None:
        self.backend = backend
        self.prefix = prefix
        self.page_size = page_size
        self.max_backoff = max_backoff
        self.revision = 0
        """Every change up to this revision has been emitted."""
        self.stats = WatchStats()
        self._known: dict[bytes, int] = {}

    async def events(self) -> AsyncIterator[WatchEvent]:
        """:meth:`batches`, one event at a time."""
        async for batch in self.batches():
            for event in batch:
                yield event

    async def batches(self) -> AsyncIterator[list[WatchEvent]]:
        """The events as etcd delivers them: one list per list page, then the re-list's
        synthetic deletes with ``LIST_DONE``, then one per watch response."""
        relist = True
        failures = 0
        while True:
            try:
                if relist:
                    async for batch in self._list():
                        yield batch
                    relist = False
                async for batch in self._watch():
                    failures = 0
                    yield batch
            except _Relist:
                relist = True
                continue
            except PermissionDenied:
                raise
            except KvstoreError as exc:
                failures += 1
                self.stats.resumes += 1
                delay = random.uniform(0, min(self.max_backoff, 0.05 * 2**failures))
                log.info(
                    "watch %r on %s broke (%s); resuming from revision %d in %.2fs",
                    self.prefix,
                    self.backend.name,
                    exc,
                    self.revision,
                    delay,
                )
                await asyncio.sleep(delay)

    async def _list(self) -> AsyncIterator[list[WatchEvent]]:
        self.stats.lists += 1
        seen: dict[bytes, int] = {}
        known = self._known
        revision = 0
        async for page, page_revision in self.backend.iter_prefix(
            self.prefix, page_size=self.page_size
        ):
            revision = page_revision
            batch: list[WatchEvent] = []
            append, known_get, put = batch.append, known.get, EventType.PUT  # once per key
            for kv in page:
                key, mod = kv.key, kv.mod_revision
                seen[key] = mod
                if known_get(key) != mod:
                    append(WatchEvent(put, key, kv.value, mod, kv.create_revision, kv.lease))
            if batch:
                yield batch
        if not revision:
            revision = await self.backend.current_revision()
        last = [
            WatchEvent(EventType.DELETE, key, b"", revision, synthetic=True)
            for key in known.keys() - seen.keys()
        ]
        self._known = seen
        self.revision = revision
        last.append(WatchEvent(EventType.LIST_DONE, self.prefix, b"", revision))
        yield last

    async def _watch(self) -> AsyncIterator[list[WatchEvent]]:
        call = self.backend.watch_stream()
        try:
            create = rpc.WatchCreateRequest(
                key=self.prefix,
                range_end=prefix_range_end(self.prefix),
                start_revision=self.revision + 1,
                progress_notify=True,
            )
            await call.write(rpc.WatchRequest(create_request=create))
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    raise KvstoreError(f"watch stream on {self.backend.name} ended")
                if response.canceled:
                    if response.compact_revision:
                        self.stats.compactions += 1
                        log.warning(
                            "watch %r on %s: revision %d compacted (now %d); re-listing",
                            self.prefix,
                            self.backend.name,
                            self.revision + 1,
                            response.compact_revision,
                        )
                        raise _Relist()
                    raise KvstoreError(f"watch canceled by etcd: {response.cancel_reason}")
                if not response.events:
                    if not response.created and response.header.revision > self.revision:
                        self.revision = response.header.revision  # progress notification
                    continue
                batch: list[WatchEvent] = []
                for event in response.events:
                    kv = event.kv
                    if kv.mod_revision <= self.revision:
                        continue  # replayed after a resume
                    if event.type == rpc.Event.PUT:
                        self._known[kv.key] = kv.mod_revision
                        batch.append(
                            WatchEvent(
                                EventType.PUT,
                                kv.key,
                                kv.value,
                                kv.mod_revision,
                                kv.create_revision,
                                kv.lease,
                            )
                        )
                    else:
                        self._known.pop(kv.key, None)
                        batch.append(WatchEvent(EventType.DELETE, kv.key, b"", kv.mod_revision))
                self.stats.events += len(batch)
                if batch:
                    yield batch
                # All events of one revision arrive in one response, so this is safe.
                self.revision = max(self.revision, response.events[-1].kv.mod_revision)
        except grpc.aio.AioRpcError as exc:
            raise translate(exc, self.backend.name) from exc
        except asyncio.InvalidStateError as exc:  # grpc: write after the stream ended
            raise KvstoreError(f"watch stream on {self.backend.name} ended") from exc
        except asyncio.CancelledError:
            if (closed := channel_closed(self.backend.name)) is None:
                raise
            raise closed from None
        finally:
            call.cancel()
