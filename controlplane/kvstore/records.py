"""Decoding stored records and turning key watches into store events, for every resource.

A key or value that does not decode is logged, counted in ``cp_store_malformed_values_total``
and skipped; nothing here raises on bad data.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from controlplane import codec
from controlplane.kvstore.shards import ShardMap
from controlplane.kvstore.types import EventType, KeyValue, WatchEvent
from controlplane.metrics import StoreMetrics
from controlplane.model import ModelError
from controlplane.store_types import EventKind, StoreEvent, Versioned

log = logging.getLogger(__name__)
T = TypeVar("T")

Decoder = Callable[[str, bytes], T]
"""Builds the domain object from (name, raw value); raises DecodeError or ModelError."""


class RecordCodec:
    """Decodes one resource's records, counting what it has to skip."""

    def __init__(self, resource: str, kind: str, metrics: StoreMetrics) -> None:
        self.resource = resource
        self.kind = kind
        self.metrics = metrics

    def encode(self, payload: Any) -> bytes:
        return codec.encode(self.kind, payload)

    def payload(self, raw: bytes) -> Any:
        """The envelope's payload (raises codec.DecodeError)."""
        return codec.decode(self.kind, raw)

    def skip(self, key: bytes, error: Exception) -> None:
        self.metrics.malformed.labels(self.resource).inc()
        log.warning("skipping malformed %s at %r: %s", self.resource, key, error)

    def decode(self, key: bytes, prefix: bytes, raw: bytes, build: Decoder[T]) -> T | None:
        """``build(name, raw)`` for the key's name under ``prefix``, or None when malformed."""
        try:
            name = key[len(prefix) :].decode("utf-8")
        except UnicodeDecodeError as exc:
            self.skip(key, exc)
            return None
        return self.decode_named(key, prefix, name, raw, build)

    def decode_named(
        self, key: bytes, prefix: bytes, name: str, raw: bytes, build: Decoder[T]
    ) -> T | None:
        """:meth:`decode` with the key's name under ``prefix`` already decoded (strictly)."""
        try:
            if not name or "/" in name or not key.startswith(prefix):
                raise ValueError("not a well-formed key for this resource")
            return build(name, raw)
        except (codec.DecodeError, ModelError, ValueError) as exc:
            self.skip(key, exc)
            return None

    def decode_all(
        self, kvs: list[KeyValue], prefix: bytes, build: Decoder[T]
    ) -> list[Versioned[T]]:
        out: list[Versioned[T]] = []
        for kv in kvs:
            value = self.decode(kv.key, prefix, kv.value, build)
            if value is not None:
                out.append(Versioned(value, kv.mod_revision))
        return out

    async def watch(
        self, shards: ShardMap, kind: str, prefix: bytes, build: Decoder[T]
    ) -> AsyncIterator[StoreEvent[T]]:
        """:meth:`watch_batches`, one event at a time."""
        async for batch in self.watch_batches(shards, kind, prefix, build):
            for event in batch:
                yield event

    async def watch_batches(
        self,
        shards: ShardMap,
        kind: str,
        prefix: bytes,
        build: Decoder[T],
        *,
        tap: Callable[[str, list[WatchEvent]], None] | None = None,
    ) -> AsyncIterator[list[StoreEvent[T]]]:
        """List-then-watch ``prefix`` on every shard of ``kind`` as store events, in the
        batches the shards deliver (a list page, a watch response); never empty.
        ``tap`` sees every shard's raw batch (shard name, events) before it is decoded."""
        last: dict[bytes, T] = {}
        cut = len(prefix)
        # Locals: this loop runs once per key of every list (100k keys on a cold sync).
        list_done, deleted = EventType.LIST_DONE, EventType.DELETE
        upsert, delete = EventKind.UPSERT, EventKind.DELETE
        decode = self.decode_named
        async for shard, events in shards.watch_batches(kind, prefix):
            if tap is not None:
                tap(shard, events)
            out: list[StoreEvent[T]] = []
            append = out.append
            for event in events:
                type_ = event.type
                if type_ is list_done:
                    if shard == "":
                        append(StoreEvent(EventKind.SYNCED, "", None, event.revision))
                    continue
                key = event.key
                bad: UnicodeDecodeError | None = None
                try:
                    name = key[cut:].decode("utf-8")
                except UnicodeDecodeError as exc:
                    name, bad = key[cut:].decode("utf-8", errors="replace"), exc
                if type_ is deleted:
                    append(StoreEvent(delete, name, last.pop(key, None), event.revision))
                    continue
                value = None
                if bad is None:
                    value = decode(key, prefix, name, event.value, build)
                else:
                    self.skip(key, bad)
                if value is None:
                    # A key that turned malformed is gone as far as readers are concerned.
                    previous = last.pop(key, None)
                    if previous is not None:
                        append(StoreEvent(delete, name, previous, event.revision))
                    continue
                last[key] = value
                append(StoreEvent(upsert, name, value, event.revision))
            if out:
                yield out
