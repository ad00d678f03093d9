"""Kubernetes objects -> domain values, and list+watch -> store events, for every resource.

An object that does not decode is logged, counted in ``cp_store_malformed_values_total``
(by resource) and skipped; nothing here raises on bad data. One object may publish several
named values (an Endpoint object holds one store endpoint per address), and one name may
be claimed by several objects (two Endpoint objects naming one IP): readers then see the
claim of the object whose key (``namespace/name``) sorts first, on every node alike, and a
name is deleted only once no object claims it. An object that turns malformed is, for
readers, a DELETE of what it published (as in kvstore mode). ``SYNCED`` follows the
initial list once; a later re-list (after 410) is folded in as ordinary changes.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Generic, TypeVar

from controlplane.crd.client import JSON
from controlplane.crd.listwatch import EventType, KubeListWatcher, object_key, object_revision
from controlplane.metrics import StoreMetrics
from controlplane.model import ModelError
from controlplane.store_types import EventKind, StoreEvent, Versioned

log = logging.getLogger(__name__)
T = TypeVar("T")

Expand = Callable[[JSON], list[tuple[str, T]]]
"""Builds the named values an object publishes; raises ModelError, ValueError, KeyError,
TypeError or AttributeError when the object is malformed."""

MALFORMED = (ModelError, ValueError, KeyError, TypeError, AttributeError)


def spec_of(obj: JSON) -> JSON:
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        raise ValueError("spec is missing or not an object")
    return spec


def meta_of(obj: JSON) -> JSON:
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        raise ValueError("metadata is missing or not an object")
    return meta


class ObjectCodec(Generic[T]):
    """Decodes one resource's objects with ``expand``, counting what it has to skip."""

    def __init__(self, resource: str, metrics: StoreMetrics, expand: Expand[T]) -> None:
        self.resource = resource
        self.metrics = metrics
        self.expand = expand

    def skip(self, key: str, error: BaseException) -> None:
        self.metrics.malformed.labels(self.resource).inc()
        log.warning("skipping malformed %s %r: %s", self.resource, key, error)

    def decode(self, obj: JSON) -> list[tuple[str, T]] | None:
        """What ``obj`` publishes, or None (counted) when it is malformed."""
        try:
            return self.expand(obj)
        except MALFORMED as exc:
            self.skip(object_key(obj), exc)
            return None

    def decode_one(self, obj: JSON) -> Versioned[T] | None:
        values = self.decode(obj)
        if not values:
            return None
        return Versioned(values[0][1], object_revision(obj))

    def decode_all(self, objects: Iterable[JSON]) -> list[Versioned[T]]:
        """Every value of ``objects``; a name claimed twice is the first key's claim."""
        chosen: dict[str, tuple[str, Versioned[T]]] = {}
        for obj in objects:
            values = self.decode(obj)
            if not values:
                continue
            key, revision = object_key(obj), object_revision(obj)
            for name, value in values:
                held = chosen.get(name)
                if held is None or key < held[0]:
                    chosen[name] = (key, Versioned(value, revision))
        return [held[1] for held in chosen.values()]

    async def watch(self, watcher: KubeListWatcher) -> AsyncIterator[StoreEvent[T]]:
        """:meth:`watch_batches`, one event at a time."""
        async for batch in self.watch_batches(watcher):
            for event in batch:
                yield event

    async def watch_batches(
        self, watcher: KubeListWatcher, claims: dict[str, dict[str, T]] | None = None
    ) -> AsyncIterator[list[StoreEvent[T]]]:
        """The watcher's list+watch as store events, in its batches (never empty ones).

        ``claims`` (empty; kept up to date for the caller to read): name -> {object key:
        value} of every object that claims the name."""
        claims = {} if claims is None else claims
        names_of: dict[str, list[str]] = {}
        shown: dict[str, T] = {}
        synced = False
        upsert, delete = EventKind.UPSERT, EventKind.DELETE

        def settle(name: str, revision: int, out: list[StoreEvent[T]]) -> None:
            held = claims.get(name)
            if not held:
                claims.pop(name, None)
                previous = shown.pop(name, None)
                if previous is not None:
                    out.append(StoreEvent(delete, name, previous, revision))
                return
            value = held[min(held)] if len(held) > 1 else next(iter(held.values()))
            if shown.get(name) != value:
                shown[name] = value
                out.append(StoreEvent(upsert, name, value, revision))

        async for events in watcher.batches():
            out: list[StoreEvent[T]] = []
            for event in events:
                if event.type is EventType.LIST_DONE:
                    if not synced:
                        synced = True
                        out.append(StoreEvent(EventKind.SYNCED, "", None, event.revision))
                    continue
                key, revision = event.key, event.revision
                new: list[tuple[str, T]] = []
                if event.type is EventType.PUT and event.object is not None:
                    new = self.decode(event.object) or []
                old = names_of.pop(key, [])
                current = [name for name, _ in new]
                for name in old:
                    if name not in current:
                        held = claims.get(name)
                        if held is not None:
                            held.pop(key, None)
                        settle(name, revision, out)
                for name, value in new:
                    claims.setdefault(name, {})[key] = value
                    settle(name, revision, out)
                if current:
                    names_of[key] = current
            if out:
                yield out
