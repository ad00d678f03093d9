"""The operator's identity garbage collector in CRD mode: mark in one round, delete in a
later one, each delete guarded by uid and resourceVersion.

A round lists the Identities and the Endpoints (every namespace). An identity that no
endpoint references is *marked*: the annotation ``controlplane.io/gc-unused-since`` is set
(a merge patch guarded by the resourceVersion just read; an identity that already carries
the mark is not written again) and the collector remembers its uid and its resourceVersion
after the mark. In a later round (``gc_interval`` on), an identity that is still
unreferenced *and still at that resourceVersion* is deleted with both as preconditions. An
identity still referenced loses its mark (an rv-guarded patch).

What can never happen: deleting an identity that gained a user between the rounds. A user
shows in one of two ways, and either stops the delete:

- its endpoint is listed by the second round: the identity is referenced, not deleted;
- its agent wrote the identity: the store's ``acquire`` of an existing identity that
  carries the mark removes the mark (an rv-guarded patch) before the agent publishes the
  endpoint, which changes the resourceVersion, so the delete's precondition fails with
  409 and the identity is skipped (counted in ``cp_identity_gc_skipped_total``).

A conflict skips that one identity, never the round. Deletes are rate limited. Every write
first calls ``fence()`` (the leader's local check), so a deposed leader sends nothing; one
that was paused between the check and the send is stopped by the preconditions, exactly
as above. Malformed objects (an Identity whose name is not a number, an Endpoint without a
readable identity) are logged, counted and skipped; an identity is never collected on the
strength of an endpoint we could not read: any endpoint naming its ID keeps it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from controlplane.crd.client import JSON, KubeClient
from controlplane.crd.errors import Conflict, NotFound
from controlplane.crd.resources import ENDPOINTS, GC_MARK, IDENTITIES
from controlplane.metrics import StoreMetrics
from controlplane.store_types import GCStats

log = logging.getLogger(__name__)

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class _Candidate:
    uid: str
    resource_version: str


def _identity_id(obj: JSON) -> int | None:
    name = (obj.get("metadata") or {}).get("name")
    if isinstance(name, str) and name.isdigit() and not name.startswith("0"):
        return int(name)
    return None


def _referenced_id(obj: JSON) -> int | None:
    spec = obj.get("spec")
    ident = spec.get("identity") if isinstance(spec, dict) else None
    value = ident.get("id") if isinstance(ident, dict) else None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


class CrdIdentityCollector:
    """Two-round identity GC over the Kubernetes API; one instance per leader term."""

    def __init__(
        self,
        client: KubeClient,
        metrics: StoreMetrics,
        *,
        deletes_per_second: float = 100.0,
        fence: Callable[[], None] = lambda: None,
        clock: Clock = time.monotonic,
    ) -> None:
        if deletes_per_second <= 0:
            raise ValueError("deletes_per_second must be positive")
        self.client = client
        self.metrics = metrics
        self.fence = fence
        self.clock = clock
        self._interval = 1.0 / deletes_per_second
        self._next_delete = 0.0
        self._candidates: dict[str, _Candidate] = {}
        """Identity name -> uid and resourceVersion after our mark (or as found marked)."""

    async def collect(self) -> GCStats:
        started = self.clock()
        deleted = skipped = 0
        identities = (await self.client.list(IDENTITIES)).items
        referenced = await self._referenced()
        candidates: dict[str, _Candidate] = {}
        for obj in identities:
            meta = obj.get("metadata") or {}
            name = str(meta.get("name", ""))
            ident = _identity_id(obj)
            if ident is None:
                self.metrics.malformed.labels("identity").inc()
                log.warning("identity GC: skipping Identity %r: its name is not an ID", name)
                continue
            marked = GC_MARK in (meta.get("annotations") or {})
            version = str(meta.get("resourceVersion", ""))
            if ident in referenced:
                if marked:
                    await self._unmark(name, version)
                continue
            previous = self._candidates.get(name)
            if previous is not None and previous.resource_version == version:
                if await self._delete(name, previous):
                    deleted += 1
                else:
                    skipped += 1
                continue
            candidate = await self._mark(obj, name, version, marked)
            if candidate is not None:
                candidates[name] = candidate
        self._candidates = candidates
        duration = self.clock() - started
        self.metrics.gc_candidates.set(len(candidates))
        self.metrics.gc_deleted.inc(deleted)
        self.metrics.gc_skipped.inc(skipped)
        self.metrics.gc_duration.observe(duration)
        return GCStats(len(candidates), deleted, skipped, duration)

    async def _referenced(self) -> set[int]:
        out: set[int] = set()
        for obj in (await self.client.list(ENDPOINTS)).items:
            ident = _referenced_id(obj)
            if ident is None:
                self.metrics.malformed.labels("endpoint").inc()
                log.warning(
                    "identity GC: skipping Endpoint %s/%s: no readable identity",
                    (obj.get("metadata") or {}).get("namespace"),
                    (obj.get("metadata") or {}).get("name"),
                )
                continue
            out.add(ident)
        return out

    async def _mark(self, obj: JSON, name: str, version: str, marked: bool) -> _Candidate | None:
        uid = str((obj.get("metadata") or {}).get("uid", ""))
        if marked:
            return _Candidate(uid, version)
        since = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        patch = {"metadata": {"resourceVersion": version, "annotations": {GC_MARK: since}}}
        self.fence()
        try:
            written = await self.client.patch(IDENTITIES, name, patch)
        except (Conflict, NotFound):
            return None  # changed or gone since the list: look again next round
        meta = written.get("metadata") or {}
        return _Candidate(str(meta.get("uid", uid)), str(meta.get("resourceVersion", "")))

    async def _unmark(self, name: str, version: str) -> None:
        patch = {"metadata": {"resourceVersion": version, "annotations": {GC_MARK: None}}}
        self.fence()
        with contextlib.suppress(Conflict, NotFound):  # changed by someone else: in use
            await self.client.patch(IDENTITIES, name, patch)

    async def _delete(self, name: str, candidate: _Candidate) -> bool:
        now = self.clock()
        if now < self._next_delete:
            await asyncio.sleep(self._next_delete - now)
        self._next_delete = max(now, self._next_delete) + self._interval
        self.fence()
        try:
            gone = await self.client.delete(
                IDENTITIES,
                name,
                uid=candidate.uid or None,
                resource_version=candidate.resource_version,
            )
        except Conflict:
            log.info("identity GC: Identity %s changed since it was marked; skipped", name)
            return False
        if gone:
            log.info("identity GC: deleted unused Identity %s", name)
        return gone
