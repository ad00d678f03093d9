"""Security identities as ``Identity`` objects: lock-free allocation and a two-round GC.

An Identity is cluster-scoped, named by its numeric ID, with the full label set in
``spec.labels`` and the label ``controlplane.io/labels-sha256`` (a hash of the label
set), so a label set is found with one label-selector list, never a full one.

Allocation has no lock. A node looks its label set up; when found, it adopts the
identity. Otherwise it creates an Identity named by a random free ID of the range: the
create is the atomic step (AlreadyExists: the ID is taken, try another). Two nodes may
race for one label set and create two identities; each creator then lists the label set
again and keeps its own only when it is the **earliest created** (by creation revision,
then uid); a loser deletes its orphan (guarded by its uid) and adopts the winner. Why the
earliest and not the lowest ID: whoever adopted an identity saw it as the earliest of its
label set then, and an identity created later can never become earlier, so a winner that
someone already adopted is never deleted as a loser. The creation revision is the
object's resourceVersion until its first update; every update we make (the GC's mark)
writes it into the ``controlplane.io/created-revision`` annotation first.

While :meth:`CrdIdentityStore.run` runs, its watch of every Identity (which repairs the
identities this node holds: re-created with the same ID when deleted, put back when
edited) also keeps an index by label set; a list+watch is a consistent view, as good as a
fresh list for "the earliest created of this label set", so adopting a known identity
costs no request (a marked one, the guarded unmark).

References are the Endpoint objects (there are no per-node reference objects, so
``release`` is local). The collector marks identities that no Endpoint references (the
``controlplane.io/gc-unused-since`` annotation, a resourceVersion-guarded write) and, a
round later, deletes those still unreferenced and unchanged since it marked them, guarded
by uid and resourceVersion. A node that acquires a marked identity removes the mark with a
resourceVersion-guarded write first, which changes the resourceVersion: the collector's
delete then fails, so an identity that gained a user between the rounds is never deleted.
Reserved identities (1..255) are never stored, never allocated and never collected.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

from controlplane.crd.client import JSON, KubeClient
from controlplane.crd.errors import AlreadyExists, Conflict, CrdError, NotFound
from controlplane.crd.listwatch import EventType, KubeEvent, KubeListWatcher, revision_of
from controlplane.crd.names import (
    CREATED_REVISION,
    GC_MARK,
    LABELS_HASH,
    identity_name,
    labels_hash,
    labels_selector,
)
from controlplane.crd.owner import Repairer
from controlplane.crd.records import MALFORMED, ObjectCodec, meta_of, spec_of
from controlplane.crd.resources import ENDPOINTS, IDENTITIES
from controlplane.crd.retry import backoff, on_conflict
from controlplane.keyedlocks import KeyedLocks
from controlplane.metrics import StoreMetrics
from controlplane.model import (
    Identity,
    IdentityRange,
    InvalidRecord,
    Labels,
    ModelError,
    NodeName,
    NumericIdentity,
    cluster_identity_range,
    is_reserved_identity,
    parse_numeric_identity,
    reserved_identity_for,
    reserved_labels,
)
from controlplane.store_types import GCStats, StoreEvent, Versioned

__all__ = [
    "AllocationConflict",
    "CrdIdentityCollector",
    "CrdIdentityStore",
    "IdentityRangeExhausted",
]

log = logging.getLogger(__name__)

RESOURCE = "identity"
MAX_ATTEMPTS = 64

Fence = Callable[[], Awaitable[None]]
"""Awaited before each of the collector's writes; raises when the caller may not write
(an operator that is no longer the leader)."""


class IdentityRangeExhausted(CrdError):
    """Every ID of the range is in use."""


class AllocationConflict(CrdError):
    """Allocation kept losing races; the store is changing faster than we can read it."""


def identity_object(identity: Identity) -> JSON:
    return {
        "apiVersion": IDENTITIES.api_version,
        "kind": IDENTITIES.kind,
        "metadata": {
            "name": identity_name(identity.id),
            "labels": {LABELS_HASH: labels_hash(identity.labels)},
        },
        "spec": {"labels": identity.labels.to_strings()},
    }


def _expand(obj: JSON) -> list[tuple[str, Identity]]:
    meta = meta_of(obj)
    name = meta["name"]
    ident = parse_numeric_identity(name)
    identity = Identity.from_dict({"id": ident, "labels": spec_of(obj)["labels"]})
    if (meta.get("labels") or {}).get(LABELS_HASH) != labels_hash(identity.labels):
        raise InvalidRecord(f"identity {name}: its {LABELS_HASH} label does not match its labels")
    return [(name, identity)]


def _uid(obj: JSON) -> str:
    return str(meta_of(obj).get("uid", ""))


def _version(obj: JSON) -> str:
    return str(meta_of(obj).get("resourceVersion", ""))


def _annotations(obj: JSON) -> dict[str, str]:
    annotations = meta_of(obj).get("annotations")
    return annotations if isinstance(annotations, dict) else {}


def creation_order(obj: JSON) -> tuple[int, str]:
    """(creation revision, uid): the earliest-created identity of a label set wins."""
    created = _annotations(obj).get(CREATED_REVISION) or _version(obj)
    return revision_of(created), _uid(obj)


class CrdIdentityStore:
    """The identity store of one node (``node``), or a read-only view (``node=None``)."""

    def __init__(
        self,
        client: KubeClient,
        metrics: StoreMetrics,
        *,
        node: NodeName | None = None,
        id_range: IdentityRange | None = None,
    ) -> None:
        self.client = client
        self.node = node
        self.ids = id_range or cluster_identity_range()
        self.metrics = metrics
        self.codec = ObjectCodec(RESOURCE, metrics, _expand)
        self._used: set[int] = set()
        self._loaded = False
        self.changed: list[Callable[[Identity, Identity], None]] = []
        """Called with (old, new) when an identity this node holds was deleted (by hand, or
        by the GC in its known window) and its labels had to take another ID."""
        self._held: dict[Labels, Identity] = {}
        self._held_by_name: dict[str, Identity] = {}
        self._locks: KeyedLocks[Labels] = KeyedLocks()
        self.repairer: Repairer | None = None
        if node is not None:
            self.repairer = Repairer(
                f"identities of {node}",
                lambda: KubeListWatcher(client, IDENTITIES),
                lambda: self._held_by_name.keys(),
                self._looks_right,
                self._reconcile,
                observe=self._observe,
            )
        self._index: dict[Labels, dict[str, tuple[tuple[int, str], JSON]]] = {}
        """label set -> its identity objects as the repair watch last saw them."""
        self._index_keys: dict[str, Labels] = {}
        self._indexed = False

    async def run(self) -> None:
        """Put back the identities this node holds when they are deleted or edited by
        others (re-created with the same ID when it is still free), until cancelled.
        Its watch also feeds the index that lets :meth:`acquire` find an existing
        identity without asking the API server."""
        if self.repairer is None:
            return
        try:
            await self.repairer.run()
        finally:
            self._indexed = False
            self._index.clear()
            self._index_keys.clear()

    def _observe(self, event: KubeEvent) -> None:
        if event.type is EventType.LIST_DONE:
            self._indexed = True
            return
        labels = self._index_keys.pop(event.key, None)
        if labels is not None:
            bucket = self._index[labels]
            del bucket[event.key]
            if not bucket:
                del self._index[labels]
        if event.type is not EventType.PUT or event.object is None:
            return
        try:
            identity = _expand(event.object)[0][1]
        except MALFORMED:
            return  # readers count it; for allocation it does not exist
        if identity.is_reserved:
            return
        order = creation_order(event.object)
        self._index.setdefault(identity.labels, {})[event.key] = (order, event.object)
        self._index_keys[event.key] = identity.labels

    def _indexed_matches(self, labels: Labels) -> list[JSON]:
        """The identities of ``labels`` the watch knows, earliest created first; [] when
        the index is not ready or knows none (then the API server is asked)."""
        bucket = self._index.get(labels) if self._indexed else None
        if not bucket:
            return []
        return [obj for _, obj in sorted(bucket.values(), key=lambda item: item[0])]

    @property
    def id_ranges(self) -> list[IdentityRange]:
        return [self.ids]

    # -- allocation ------------------------------------------------------------------

    async def acquire(self, labels: Labels) -> Identity:
        reserved = reserved_identity_for(labels)
        if reserved is not None:
            return Identity(reserved, labels)
        if self.node is None:
            raise RuntimeError("a read-only identity store cannot allocate")
        async with self._locks(labels):
            identity = await self._allocate(labels)
            self._hold(identity)
        return identity

    def _hold(self, identity: Identity) -> None:
        previous = self._held.pop(identity.labels, None)
        if previous is not None:
            self._held_by_name.pop(identity_name(previous.id), None)
        self._held[identity.labels] = identity
        self._held_by_name[identity_name(identity.id)] = identity

    async def _allocate(self, labels: Labels, prefer: int | None = None) -> Identity:
        # The watch's index is a consistent (if slightly late) view, as good as a list for
        # "the earliest created of this label set"; it saves a list per acquire.
        indexed = self._indexed_matches(labels)
        if indexed and prefer is None:
            adopted = await self._adopt(labels, indexed[0])
            if adopted is not None:
                return adopted
        for attempt in range(MAX_ATTEMPTS):
            matches = await self._matches(labels)
            if matches:
                adopted = await self._adopt(labels, matches[0][0])
                if adopted is not None:
                    return adopted
                continue  # collected under us: look again
            created = await self._create(labels, prefer if attempt == 0 else None)
            if created is None:
                continue  # the ID was taken: another one
            obj, identity = created
            winner = (await self._matches(labels) or [(obj, identity)])[0]
            if _uid(winner[0]) == _uid(obj):
                return identity
            log.info(
                "identity race for %s: %s was created first; deleting our %s",
                labels,
                winner[1].id,
                identity.id,
            )
            try:
                if await self.client.delete(IDENTITIES, identity_name(identity.id), uid=_uid(obj)):
                    self._used.discard(identity.id)
            except Conflict:
                pass  # gone and re-created by someone else: not ours any more
            await backoff(attempt % 4)
        raise AllocationConflict(
            f"could not allocate an identity for {labels} in {MAX_ATTEMPTS} tries"
        )

    async def _matches(self, labels: Labels) -> list[tuple[JSON, Identity]]:
        """The identities of ``labels``, earliest created first."""
        found = await self.client.list(IDENTITIES, label_selector=labels_selector(labels))
        out: list[tuple[JSON, Identity]] = []
        for obj in found.items:
            values = self.codec.decode(obj)
            if values and values[0][1].labels == labels and not values[0][1].is_reserved:
                out.append((obj, values[0][1]))
                self._used.add(values[0][1].id)
        out.sort(key=lambda item: creation_order(item[0]))
        return out

    async def _adopt(self, labels: Labels, obj: JSON) -> Identity | None:
        """Take ``obj``'s identity, removing the GC's mark first (a guarded write that
        makes the collector's delete fail); None when it was deleted meanwhile."""
        for attempt in range(MAX_ATTEMPTS):
            values = self.codec.decode(obj)
            if not values or values[0][1].labels != labels:
                return None
            identity = values[0][1]
            if GC_MARK not in _annotations(obj):
                return identity
            patch: JSON = {
                "metadata": {"resourceVersion": _version(obj), "annotations": {GC_MARK: None}}
            }
            try:
                await self.client.patch(IDENTITIES, identity_name(identity.id), patch)
                return identity
            except NotFound:
                return None
            except Conflict:
                await backoff(attempt % 6)
                current = await self.client.get_or_none(IDENTITIES, identity_name(identity.id))
                if current is None or _uid(current) != _uid(obj):
                    return None
                obj = current
        raise AllocationConflict(f"identity for {labels} kept changing while we adopted it")

    async def _create(
        self, labels: Labels, prefer: int | None = None
    ) -> tuple[JSON, Identity] | None:
        if prefer is not None and self.ids.contains(prefer):
            candidate = NumericIdentity(prefer)
        else:
            candidate = await self._pick_free()
        identity = Identity(candidate, labels)
        try:
            obj = await self.client.create(IDENTITIES, identity_object(identity))
        except AlreadyExists:
            self._used.add(candidate)
            return None
        self._used.add(candidate)
        return obj, identity

    async def _pick_free(self) -> NumericIdentity:
        if not self._loaded:
            await self._load_used()
        for attempt in range(2):
            if self.ids.size - len(self._used) > 0:
                # Random, not lowest-free: concurrent allocators rarely pick the same ID.
                while True:
                    candidate = random.randint(self.ids.first, self.ids.last)
                    if candidate not in self._used:
                        return NumericIdentity(candidate)
            if attempt == 0:
                await self._load_used()  # our view may be stale: IDs get collected
        raise IdentityRangeExhausted(f"identity range {self.ids} is full")

    async def _load_used(self) -> None:
        used: set[int] = set()
        async for page in self.client.list_pages(IDENTITIES):
            for obj in page.items:
                try:
                    ident = parse_numeric_identity(meta_of(obj).get("name"))
                except (ModelError, ValueError):
                    continue  # not an ID we could ever pick
                if self.ids.contains(ident):
                    used.add(ident)
        self._used = used
        self._loaded = True

    async def release(self, identity: Identity) -> None:
        """Nothing to write (in CRD mode a node's references are its Endpoint objects);
        the identity is no longer this node's to repair."""
        if self._held.get(identity.labels) == identity:
            del self._held[identity.labels]
            self._held_by_name.pop(identity_name(identity.id), None)

    # -- repair ----------------------------------------------------------------------

    def _looks_right(self, key: str, obj: JSON) -> bool:
        held = self._held_by_name.get(key)
        try:
            return held is None or _expand(obj)[0][1] == held
        except MALFORMED:
            return False

    async def _reconcile(self, key: str) -> None:
        held = self._held_by_name.get(key)
        if held is None:
            return
        async with self._locks(held.labels):
            if self._held.get(held.labels) != held:
                return  # released or replaced meanwhile
            current = await self.client.get_or_none(IDENTITIES, key)
            if current is not None:
                if self._looks_right(key, current):
                    return
                await self._put_back(held, current)
                log.warning("identity %s was edited by someone else; put back", key)
                self.metrics.repairs.labels(RESOURCE, "changed").inc()
                return
            identity = await self._allocate(held.labels, prefer=held.id)
            self._hold(identity)
            self.metrics.repairs.labels(RESOURCE, "deleted").inc()
        if identity == held:
            log.warning("identity %s was deleted while this node holds it; re-created", key)
            return
        log.warning(
            "identity %s of %s was deleted while this node holds it; it is %d now",
            key,
            held.labels,
            identity.id,
        )
        for callback in self.changed:
            callback(held, identity)

    async def _put_back(self, held: Identity, current: JSON) -> None:
        """Rewrite the object's labels as ``held`` has them (guarded; 409 re-read)."""
        seen: JSON | None = current

        async def step() -> None:
            nonlocal seen
            obj = (
                seen
                if seen is not None
                else await self.client.get(IDENTITIES, identity_name(held.id))
            )
            seen = None
            meta = meta_of(obj)
            body = identity_object(held)
            body["metadata"] = {
                **meta,
                "labels": {**(meta.get("labels") or {}), LABELS_HASH: labels_hash(held.labels)},
            }
            await self.client.replace(IDENTITIES, body)

        await on_conflict(step, f"put back identity {held.id}")

    # -- reads -----------------------------------------------------------------------

    async def get(self, ident: NumericIdentity) -> Versioned[Identity] | None:
        labels = reserved_labels(ident)
        if labels is not None:
            return Versioned(Identity(ident, labels), 0)
        obj = await self.client.get_or_none(IDENTITIES, identity_name(ident))
        return None if obj is None else self.codec.decode_one(obj)

    async def lookup(self, labels: Labels) -> Versioned[Identity] | None:
        reserved = reserved_identity_for(labels)
        if reserved is not None:
            return Versioned(Identity(reserved, labels), 0)
        matches = await self._matches(labels)
        if not matches:
            return None
        obj, identity = matches[0]
        return Versioned(identity, revision_of(_version(obj)))

    async def list(self) -> builtins.list[Versioned[Identity]]:
        return self.codec.decode_all((await self.client.list(IDENTITIES)).items)

    def watch(self) -> AsyncIterator[StoreEvent[Identity]]:
        return self.codec.watch(KubeListWatcher(self.client, IDENTITIES))

    async def references(self) -> dict[NumericIdentity, builtins.list[NodeName]]:
        """Which nodes reference each identity: the nodes of the Endpoints that name it
        (for `cpctl identity get`)."""
        refs: dict[NumericIdentity, set[NodeName]] = {}
        async for page in self.client.list_pages(ENDPOINTS):
            for obj in page.items:
                try:
                    spec = spec_of(obj)
                    ident, node = spec["identity"]["id"], spec["node"]
                except (ValueError, KeyError, TypeError):
                    continue  # the endpoint readers count it
                if isinstance(ident, int) and isinstance(node, str):
                    refs.setdefault(NumericIdentity(ident), set()).add(NodeName(node))
        return {ident: sorted(nodes) for ident, nodes in refs.items()}


class CrdIdentityCollector:
    """Two-round identity garbage collection over Identity and Endpoint objects, one
    instance per operator leader (``fence`` is awaited before every write).

    An identity is deleted in the round after the one in which this collector marked it
    (or first saw it marked, by a previous leader), when it is still unreferenced and its
    resourceVersion unchanged since; a conflict skips that identity, never the round.
    Deletes are paced to ``deletes_per_second``.
    """

    def __init__(
        self,
        client: KubeClient,
        metrics: StoreMetrics,
        *,
        deletes_per_second: float = 100.0,
        fence: Fence | None = None,
        in_use_elsewhere: Callable[[], Awaitable[set[int]]] | None = None,
    ) -> None:
        self.client = client
        self.metrics = metrics
        self.fence = fence
        self.in_use_elsewhere = in_use_elsewhere
        """Double-write mode: the identities the other store's users hold; never collected
        (an identity goes only when unused in both stores)."""
        self.codec = ObjectCodec(RESOURCE, metrics, _expand)
        self._interval = 1.0 / deletes_per_second if deletes_per_second > 0 else 0.0
        self._last_delete = 0.0
        self._marked: dict[str, tuple[str, str]] = {}
        """name -> (uid, resourceVersion) of identities left marked by the last round."""

    async def collect(self) -> GCStats:
        started = time.monotonic()
        # Identities first: a reference that appears after the endpoint list belongs to an
        # acquire that, for a marked identity, changed its resourceVersion.
        identities = (await self.client.list(IDENTITIES)).items
        referenced = await self.in_use()
        if self.in_use_elsewhere is not None:
            referenced |= await self.in_use_elsewhere()
        marked: dict[str, tuple[str, str]] = {}
        deleted = skipped = 0
        for obj in identities:
            meta = obj.get("metadata") or {}
            name = str(meta.get("name", ""))
            try:
                ident = parse_numeric_identity(name)
            except ModelError:
                continue  # not an identity we know how to judge; readers count it
            if is_reserved_identity(ident):
                continue
            uid, version = _uid(obj), _version(obj)
            is_marked = GC_MARK in _annotations(obj)
            if ident in referenced:
                if is_marked:
                    await self._unmark(obj)
                continue
            if not is_marked:
                new_version = await self._mark(obj)
                if new_version is not None:
                    marked[name] = (uid, new_version)
                continue
            if self._marked.get(name) != (uid, version):
                marked[name] = (uid, version)  # marked by someone else: ours next round
                continue
            if await self._delete(name, uid, version):
                deleted += 1
            else:
                skipped += 1
        self._marked = marked
        duration = time.monotonic() - started
        self.metrics.gc_candidates.set(len(marked))
        self.metrics.gc_deleted.inc(deleted)
        self.metrics.gc_skipped.inc(skipped)
        self.metrics.gc_duration.observe(duration)
        return GCStats(len(marked), deleted, skipped, duration)

    async def in_use(self) -> set[int]:
        """The identities some Endpoint uses."""
        out: set[int] = set()
        async for page in self.client.list_pages(ENDPOINTS):
            for obj in page.items:
                try:
                    ident = spec_of(obj)["identity"]["id"]
                except (ValueError, KeyError, TypeError):
                    continue  # the endpoint readers count it
                if isinstance(ident, int):
                    out.add(ident)
        return out

    async def _mark(self, obj: JSON) -> str | None:
        """Mark as unused now; the new resourceVersion, or None when it changed."""
        version = _version(obj)
        created = _annotations(obj).get(CREATED_REVISION) or version
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        patch: JSON = {
            "metadata": {
                "resourceVersion": version,
                "annotations": {GC_MARK: stamp, CREATED_REVISION: created},
            }
        }
        if self.fence is not None:
            await self.fence()
        try:
            updated = await self.client.patch(IDENTITIES, str(meta_of(obj)["name"]), patch)
        except (Conflict, NotFound):
            return None
        return _version(updated)

    async def _unmark(self, obj: JSON) -> None:
        patch: JSON = {
            "metadata": {"resourceVersion": _version(obj), "annotations": {GC_MARK: None}}
        }
        if self.fence is not None:
            await self.fence()
        with contextlib.suppress(Conflict, NotFound):  # changed: the next round looks again
            await self.client.patch(IDENTITIES, str(meta_of(obj)["name"]), patch)

    async def _delete(self, name: str, uid: str, version: str) -> bool:
        wait = self._last_delete + self._interval - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        if self.fence is not None:
            await self.fence()
        self._last_delete = time.monotonic()
        try:
            gone = await self.client.delete(IDENTITIES, name, uid=uid, resource_version=version)
        except Conflict:
            log.info("identity GC: %s changed since it was marked; skipped", name)
            return False
        return gone
