"""List-then-watch of one Kubernetes resource, forever, resuming across failures.

What client-go's reflector does, as batches of events: every listed object, then
``LIST_DONE``, then changes in order. A broken or ended stream resumes from the last
resourceVersion seen (bookmarks advance it on an idle stream), so nothing is lost or
repeated. Only when the server answers 410 (the version was compacted) does it re-list,
and then it marks and sweeps: puts for objects that are new or changed, synthetic deletes
for objects that vanished, then ``LIST_DONE``. An outage is retried with jittered backoff;
the caller's view is never emptied by it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

from controlplane.crd.client import JSON, LIST_PAGE_SIZE, ApiResource, KubeClient
from controlplane.crd.errors import CrdError, Expired, Forbidden, NotFound

log = logging.getLogger(__name__)


class EventType(enum.Enum):
    PUT = "put"
    DELETE = "delete"
    LIST_DONE = "list-done"


@dataclass(frozen=True, slots=True)
class KubeEvent:
    type: EventType
    key: str
    """``namespace/name`` for namespaced resources, else ``name``."""
    object: JSON | None
    """The object (for DELETE its last state, None for a synthetic delete)."""
    revision: int
    synthetic: bool = False


@dataclass(slots=True)
class WatchStats:
    lists: int = 0
    resumes: int = 0
    expired: int = 0
    events: int = 0
    bookmarks: int = 0


def object_key(obj: JSON) -> str:
    meta = obj.get("metadata") or {}
    namespace = meta.get("namespace")
    name = str(meta.get("name", ""))
    return f"{namespace}/{name}" if namespace else name


def revision_of(value: object) -> int:
    """A resourceVersion as a number (kube's are etcd revisions); 0 if it is not one."""
    try:
        return int(str(value))
    except ValueError:
        return 0


def object_revision(obj: JSON) -> int:
    return revision_of((obj.get("metadata") or {}).get("resourceVersion", ""))


class KubeListWatcher:
    """Lists ``resource`` and then watches it, forever."""

    def __init__(
        self,
        client: KubeClient,
        resource: ApiResource,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        page_size: int = LIST_PAGE_SIZE,
        max_backoff: float = 2.0,
        idle_timeout: float | None = None,
    ) -> None:
        self.client = client
        self.resource = resource
        self.namespace = namespace
        self.label_selector = label_selector
        self.field_selector = field_selector
        self.page_size = page_size
        self.max_backoff = max_backoff
        self.idle_timeout = idle_timeout
        self.resource_version = ""
        """Every change up to this version has been emitted."""
        self.stats = WatchStats()
        self._known: dict[str, int] = {}
        self.connected = False
        """The watch stream is open now (for health reports)."""

    async def events(self) -> AsyncIterator[KubeEvent]:
        async for batch in self.batches():
            for event in batch:
                yield event

    async def batches(self) -> AsyncIterator[list[KubeEvent]]:
        relist = True
        failures = 0
        while True:
            try:
                if relist:
                    async for batch in self._list():
                        yield batch
                    relist = False
                    failures = 0
                async for batch in self._watch():
                    failures = 0
                    yield batch
                # The server ended the stream (its timeout): resume at once.
            except Expired:
                self.stats.expired += 1
                log.warning(
                    "watch %s: resourceVersion %s expired; re-listing",
                    self.resource.plural,
                    self.resource_version,
                )
                relist = True
            except Forbidden:
                raise
            except (CrdError, NotFound) as exc:
                self.connected = False
                failures += 1
                self.stats.resumes += 1
                delay = random.uniform(0, min(self.max_backoff, 0.05 * 2**failures))
                log.info(
                    "watch %s broke (%s); resuming from %s in %.2fs",
                    self.resource.plural,
                    exc,
                    self.resource_version or "a new list",
                    delay,
                )
                await asyncio.sleep(delay)
            finally:
                self.connected = False

    async def _list(self) -> AsyncIterator[list[KubeEvent]]:
        self.stats.lists += 1
        seen: dict[str, int] = {}
        known_get = self._known.get
        version = ""
        put = EventType.PUT
        async for page in self.client.list_pages(
            self.resource,
            namespace=self.namespace,
            label_selector=self.label_selector,
            field_selector=self.field_selector,
            limit=self.page_size,
        ):
            version = page.resource_version
            batch: list[KubeEvent] = []
            for obj in page.items:
                key = object_key(obj)
                rev = object_revision(obj)
                seen[key] = rev
                if known_get(key) != rev:
                    batch.append(KubeEvent(put, key, obj, rev))
            if batch:
                yield batch
        revision = revision_of(version)
        last = [
            KubeEvent(EventType.DELETE, key, None, revision, synthetic=True)
            for key in self._known.keys() - seen.keys()
        ]
        self._known = seen
        self.resource_version = version
        last.append(KubeEvent(EventType.LIST_DONE, "", None, revision))
        yield last

    async def _watch(self) -> AsyncIterator[list[KubeEvent]]:
        stream = self.client.watch(
            self.resource,
            self.resource_version,
            namespace=self.namespace,
            label_selector=self.label_selector,
            field_selector=self.field_selector,
            idle_timeout=self.idle_timeout,
        )
        try:
            self.connected = True
            async for event in stream:
                obj = event.object
                kind = event.type
                if kind == "BOOKMARK":
                    self.stats.bookmarks += 1
                    version = (obj.get("metadata") or {}).get("resourceVersion")
                    if version:
                        self.resource_version = str(version)
                    continue
                if kind == "ERROR":
                    code = obj.get("code")
                    message = obj.get("message", "")
                    if code == 410:
                        raise Expired(f"watch {self.resource.plural}: {message}", status=410)
                    raise CrdError(f"watch {self.resource.plural}: error {code}: {message}")
                key = object_key(obj)
                rev = object_revision(obj)
                if kind == "DELETED":
                    self._known.pop(key, None)
                    out = KubeEvent(EventType.DELETE, key, obj, rev)
                elif kind in ("ADDED", "MODIFIED"):
                    self._known[key] = rev
                    out = KubeEvent(EventType.PUT, key, obj, rev)
                else:
                    log.warning("watch %s: unknown event type %r", self.resource.plural, kind)
                    continue
                version = (obj.get("metadata") or {}).get("resourceVersion")
                if version:
                    self.resource_version = str(version)
                self.stats.events += 1
                yield [out]
        finally:
            self.connected = False
            await stream.aclose()
