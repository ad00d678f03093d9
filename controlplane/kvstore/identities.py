"""Security identities in etcd: lock-free allocation and a two-round garbage collector.

Three keys per identity (see docs/key-layout.md): the labels index (unique label set ->
ID), the master key (ID -> labels) and one value key per node using it (leased by that
node). Allocation is one transaction that creates the index, the master key and the
caller's value key together, guarded by both index and master being absent. Taking a
reference to an existing identity rewrites the index (bumping its mod revision) in the
same transaction as the value key, so the collector's delete, guarded by the index's mod
revision and by "no value keys", can never remove an identity that gained a user in
between. No locks, so none can leak.
"""

from __future__ import annotations

import builtins
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from controlplane import codec
from controlplane.kvstore.backend import LIST_PAGE_SIZE, EtcdBackend
from controlplane.kvstore.errors import LeaseLost
from controlplane.kvstore.keys import KeyLayout
from controlplane.kvstore.owner import KeyOwner, Owners
from controlplane.kvstore.ratelimit import RateLimiter
from controlplane.kvstore.records import RecordCodec
from controlplane.kvstore.shards import ShardMap
from controlplane.kvstore.types import (
    Compare,
    Delete,
    Get,
    KeyValue,
    Put,
    absent,
    mod_revision_is,
    none_under,
    value_is,
)
from controlplane.metrics import StoreMetrics
from controlplane.model import (
    Identity,
    IdentityRange,
    Labels,
    ModelError,
    NodeName,
    NumericIdentity,
    cluster_identity_range,
    parse_numeric_identity,
    reserved_identity_for,
    reserved_labels,
    shard_identity_ranges,
)
from controlplane.store_types import EventKind, GCStats, StoreEvent, Versioned

log = logging.getLogger(__name__)

KIND = "identities"
MAX_ATTEMPTS = 64


class IdentityRangeExhausted(RuntimeError):
    """Every ID of a shard's slice is in use."""


class AllocationConflict(RuntimeError):
    """Allocation kept losing races; the store is changing faster than we can read it."""


def _index_value(ident: int) -> bytes:
    return codec.encode("identity-index", {"id": ident})


def _ref_value(ident: int) -> bytes:
    return codec.encode("identity-ref", {"id": ident})


def _master_value(identity: Identity) -> bytes:
    return codec.encode("identity", identity.to_dict())


def _id_of(payload: Any) -> NumericIdentity:
    if not isinstance(payload, dict):
        raise codec.DecodeError("identity index is not a map")
    return parse_numeric_identity(str(payload.get("id")))


def _identity(name: str, raw: bytes) -> Identity:
    identity = Identity.from_dict(codec.decode("identity", raw))
    if str(identity.id) != name:
        raise ValueError(f"master key names ID {name} but its value says {identity.id}")
    return identity


@dataclass(slots=True)
class _Shard:
    backend: EtcdBackend
    ids: IdentityRange
    used: set[int] = field(default_factory=set)
    loaded: bool = False


class KvIdentityStore:
    """The identity store of one node (``node``), or a read-only view (``owners=None``)."""

    def __init__(
        self,
        shards: ShardMap,
        layout: KeyLayout,
        metrics: StoreMetrics,
        owners: Owners | None = None,
        *,
        node: NodeName | None = None,
        id_range: IdentityRange | None = None,
    ) -> None:
        self.shards = shards
        self.layout = layout
        self.node = node
        self.codec = RecordCodec("identity", "identity", metrics)
        backends = shards.shards(KIND)
        ranges = shard_identity_ranges(id_range or cluster_identity_range(), len(backends))
        self._shards = [_Shard(b, r) for b, r in zip(backends, ranges, strict=True)]
        self._owners: dict[str, KeyOwner] = {}
        if owners is not None:
            for backend in backends:
                owner = owners.for_backend(backend)
                owner.repair_under(layout.identity_value_prefix)
                self._owners[backend.name] = owner
        self._hints: dict[str, NumericIdentity] = {}
        """labels key component -> ID, learned from lists, watches and our own allocations;
        a right hint makes a reference one round trip, a stale one costs one more."""
        self.changed: list[Callable[[Identity, Identity], None]] = []
        """Called when a reference re-created after a lease loss had to take a new ID."""

    @property
    def id_ranges(self) -> list[IdentityRange]:
        return [s.ids for s in self._shards]

    def _shard_for_labels(self, labels: Labels) -> _Shard:
        return self._shards[self.shards.shard_index(KIND, labels.canonical())]

    def _shard_for_id(self, ident: int) -> _Shard | None:
        return next((s for s in self._shards if s.ids.contains(ident)), None)

    # -- allocation ------------------------------------------------------------------

    async def acquire(self, labels: Labels) -> Identity:
        reserved = reserved_identity_for(labels)
        if reserved is not None:
            return Identity(reserved, labels)
        if self.node is None:
            raise RuntimeError("a read-only identity store cannot allocate")
        shard = self._shard_for_labels(labels)
        owner = self._owners[shard.backend.name]
        key = self.layout.identity_value(labels.key_component(), self.node)
        for attempt in range(2):
            lease = await owner.leases.lease_for(key)
            try:
                identity = await self._acquire(shard, labels, lease)
                break
            except LeaseLost:
                if attempt == 1:
                    raise
                await owner.leases.invalidate(lease)
        owner.track(
            key, _ref_value(identity.id), resource="identity-ref", write=self._restorer(labels)
        )
        return identity

    async def _acquire(self, shard: _Shard, labels: Labels, lease: int) -> Identity:
        assert self.node is not None
        component = labels.key_component()
        index_key = self.layout.identity_labels(component)
        value_key = self.layout.identity_value(component, self.node)
        known = self._hints.get(component)
        for _ in range(MAX_ATTEMPTS):
            if known is not None:
                # Reference: the index must still name this ID; rewriting it bumps its mod
                # revision, which is what makes the collector's guarded delete fail.
                result = await shard.backend.txn(
                    [value_is(index_key, _index_value(known))],
                    [Put(index_key, _index_value(known)), Put(value_key, _ref_value(known), lease)],
                    [Get(index_key)],
                )
                if result.succeeded:
                    return Identity(known, labels)
                known = self._index_id(result.results[0].kvs)
                self._hint(component, known)
                continue
            candidate = await self._pick_free(shard)
            master_key = self.layout.identity_id(candidate)
            result = await shard.backend.txn(
                [absent(index_key), absent(master_key)],
                [
                    Put(index_key, _index_value(candidate)),
                    Put(master_key, _master_value(Identity(candidate, labels))),
                    Put(value_key, _ref_value(candidate), lease),
                ],
                [Get(index_key), Get(master_key)],
            )
            if result.succeeded:
                shard.used.add(candidate)
                self._hint(component, candidate)
                return Identity(candidate, labels)
            known = self._index_id(result.results[0].kvs)
            self._hint(component, known)
            if result.results[1].kvs:
                shard.used.add(candidate)
        raise AllocationConflict(
            f"could not allocate an identity for {labels} in {MAX_ATTEMPTS} tries"
        )

    def _hint(self, component: str, ident: NumericIdentity | None) -> None:
        if ident is None:
            self._hints.pop(component, None)
        else:
            self._hints[component] = ident

    def _index_id(self, kvs: Sequence[KeyValue]) -> NumericIdentity | None:
        if not kvs:
            return None
        try:
            return _id_of(codec.decode("identity-index", kvs[0].value))
        except (codec.DecodeError, ModelError) as exc:
            # A corrupt index blocks these labels until someone repairs it; say so loudly.
            self.codec.skip(kvs[0].key, exc)
            raise AllocationConflict(f"identity index {kvs[0].key!r} is malformed") from exc

    async def _pick_free(self, shard: _Shard) -> NumericIdentity:
        if not shard.loaded:
            await self._load_used(shard)
        for attempt in range(2):
            free = shard.ids.size - len(shard.used)
            if free > 0:
                # Random, not lowest-free: concurrent allocators rarely pick the same ID.
                while True:
                    candidate = random.randint(shard.ids.first, shard.ids.last)
                    if candidate not in shard.used:
                        return NumericIdentity(candidate)
            if attempt == 0:
                await self._load_used(shard)  # our view may be stale: IDs get collected
        raise IdentityRangeExhausted(f"identity range {shard.ids} of {shard.backend.name} is full")

    async def _load_used(self, shard: _Shard) -> None:
        prefix = self.layout.identity_id_prefix
        used: set[int] = set()
        async for page, _ in shard.backend.iter_prefix(prefix, page_size=LIST_PAGE_SIZE):
            for kv in page:
                try:
                    used.add(parse_numeric_identity(kv.key[len(prefix) :].decode()))
                except (ModelError, UnicodeDecodeError):
                    continue  # not an ID we could ever pick
        shard.used = used
        shard.loaded = True

    def _restorer(self, labels: Labels) -> Callable[[bytes, bytes, int], Any]:
        async def restore(key: bytes, value: bytes, lease: int) -> None:
            shard = self._shard_for_labels(labels)
            before = _id_of(codec.decode("identity-ref", value))
            identity = await self._acquire(shard, labels, lease)
            if identity.id != before:
                log.warning(
                    "identity of %s changed from %d to %d while our reference was gone",
                    labels,
                    before,
                    identity.id,
                )
                self._owners[shard.backend.name].track(
                    key, _ref_value(identity.id), resource="identity-ref", write=restore
                )
                for callback in self.changed:
                    callback(Identity(before, labels), identity)

        return restore

    async def release(self, identity: Identity) -> None:
        if identity.is_reserved or self.node is None:
            return
        shard = self._shard_for_labels(identity.labels)
        key = self.layout.identity_value(identity.labels.key_component(), self.node)
        await self._owners[shard.backend.name].delete(key)

    # -- reads -----------------------------------------------------------------------

    async def get(self, ident: NumericIdentity) -> Versioned[Identity] | None:
        labels = reserved_labels(ident)
        if labels is not None:
            return Versioned(Identity(ident, labels), 0)
        shard = self._shard_for_id(ident)
        if shard is None:
            return None
        kv = await shard.backend.get(self.layout.identity_id(ident))
        if kv is None:
            return None
        found = self.codec.decode(kv.key, self.layout.identity_id_prefix, kv.value, _identity)
        return Versioned(found, kv.mod_revision) if found is not None else None

    async def lookup(self, labels: Labels) -> Versioned[Identity] | None:
        reserved = reserved_identity_for(labels)
        if reserved is not None:
            return Versioned(Identity(reserved, labels), 0)
        shard = self._shard_for_labels(labels)
        kv = await shard.backend.get(self.layout.identity_labels(labels.key_component()))
        if kv is None:
            return None
        try:
            ident = _id_of(codec.decode("identity-index", kv.value))
        except (codec.DecodeError, ModelError) as exc:
            self.codec.skip(kv.key, exc)
            return None
        return Versioned(Identity(ident, labels), kv.mod_revision)

    async def list(self) -> list[Versioned[Identity]]:
        prefix = self.layout.identity_id_prefix
        kvs = await self.shards.list_prefix(KIND, prefix)
        identities = self.codec.decode_all(kvs, prefix, _identity)
        for found in identities:
            self._hint(found.value.labels.key_component(), found.value.id)
        return identities

    async def watch(self) -> AsyncIterator[StoreEvent[Identity]]:
        prefix = self.layout.identity_id_prefix
        async for event in self.codec.watch(self.shards, KIND, prefix, _identity):
            if event.value is not None:
                component = event.value.labels.key_component()
                if event.kind is EventKind.UPSERT:
                    self._hint(component, event.value.id)
                elif self._hints.get(component) == event.value.id:
                    self._hint(component, None)
            yield event

    async def references(self) -> dict[NumericIdentity, builtins.list[NodeName]]:
        """Which nodes reference each identity (for `cpctl identity get`)."""
        prefix = self.layout.identity_value_prefix
        refs: dict[NumericIdentity, list[NodeName]] = {}
        for kv in await self.shards.list_prefix(KIND, prefix):
            try:
                ident = _id_of(codec.decode("identity-ref", kv.value))
                node = kv.key[len(prefix) :].decode().rsplit("/", 1)[1]
            except (codec.DecodeError, ModelError, UnicodeDecodeError, IndexError) as exc:
                self.codec.skip(kv.key, exc)
                continue
            refs.setdefault(ident, []).append(NodeName(node))
        return refs


@dataclass(frozen=True, slots=True)
class _Candidate:
    key: bytes
    mod_revision: int
    master_key: bytes | None


class KvIdentityCollector:
    """Two-round identity garbage collection, one instance per operator leader.

    Round N marks identities with no value keys; round N+1 deletes those still unused and
    unchanged (index mod revision equal), each in its own guarded transaction, so a
    conflict skips that identity and never the round. Deletes are rate limited.
    """

    def __init__(
        self,
        shards: ShardMap,
        layout: KeyLayout,
        metrics: StoreMetrics,
        *,
        deletes_per_second: float = 100.0,
        fence: Callable[[], Sequence[Compare]] = lambda: (),
        in_use_elsewhere: Callable[[], Awaitable[set[int]]] | None = None,
    ) -> None:
        self.shards = shards
        self.layout = layout
        self.metrics = metrics
        self.fence = fence
        self.in_use_elsewhere = in_use_elsewhere
        """Double-write mode: the identities the other store's users hold; never collected
        (an identity goes only when unused in both stores)."""
        self.codec = RecordCodec("identity", "identity", metrics)
        self._limiter = RateLimiter(deletes_per_second, max(1, int(deletes_per_second)))
        self._candidates: dict[tuple[str, bytes], _Candidate] = {}

    async def collect(self) -> GCStats:
        started = time.monotonic()
        deleted = skipped = 0
        candidates: dict[tuple[str, bytes], _Candidate] = {}
        keep = await self.in_use_elsewhere() if self.in_use_elsewhere is not None else set()
        for backend in self.shards.shards(KIND):
            for candidate in await self._unused(backend, keep):
                marker = (backend.name, candidate.key)
                previous = self._candidates.get(marker)
                if previous is None or previous.mod_revision != candidate.mod_revision:
                    candidates[marker] = candidate
                    continue
                await self._limiter.acquire()
                if await self._delete(backend, candidate):
                    deleted += 1
                else:
                    skipped += 1
        self._candidates = candidates
        duration = time.monotonic() - started
        self.metrics.gc_candidates.set(len(candidates))
        self.metrics.gc_deleted.inc(deleted)
        self.metrics.gc_skipped.inc(skipped)
        self.metrics.gc_duration.observe(duration)
        return GCStats(len(candidates), deleted, skipped, duration)

    async def in_use(self) -> set[int]:
        """The identities some node references (a value key), on every cluster."""
        layout = self.layout
        out: set[int] = set()
        for backend in self.shards.shards(KIND):
            revision = await backend.current_revision()
            index = await backend.list_prefix(layout.identity_labels_prefix, revision=revision)
            values = await backend.list_prefix(layout.identity_value_prefix, revision=revision)
            prefix = layout.identity_value_prefix
            referenced = {kv.key[len(prefix) :].rsplit(b"/", 1)[0] for kv in values.kvs}
            for kv in index.kvs:
                if kv.key[len(layout.identity_labels_prefix) :] not in referenced:
                    continue
                try:
                    out.add(_id_of(codec.decode("identity-index", kv.value)))
                except (codec.DecodeError, ModelError):
                    continue  # the collector counts it
        return out

    async def _unused(self, backend: EtcdBackend, keep: set[int]) -> list[_Candidate]:
        """Index keys and orphan master keys that no node references, as read now (an
        identity in ``keep`` never is one)."""
        layout = self.layout
        revision = await backend.current_revision()
        index = await backend.list_prefix(layout.identity_labels_prefix, revision=revision)
        masters = await backend.list_prefix(layout.identity_id_prefix, revision=revision)
        values = await backend.list_prefix(layout.identity_value_prefix, revision=revision)
        value_prefix = layout.identity_value_prefix
        referenced = {kv.key[len(value_prefix) :].rsplit(b"/", 1)[0] for kv in values.kvs}
        masters_by_id = {kv.key[len(layout.identity_id_prefix) :]: kv for kv in masters.kvs}
        out: list[_Candidate] = []
        named: set[bytes] = set()
        for kv in index.kvs:
            component = kv.key[len(layout.identity_labels_prefix) :]
            master_key: bytes | None = None
            try:
                ident = _id_of(codec.decode("identity-index", kv.value))
                master_key = layout.identity_id(ident)
                named.add(str(ident).encode())
                if ident in keep:
                    continue
            except (codec.DecodeError, ModelError) as exc:
                self.codec.skip(kv.key, exc)  # a corrupt index still gets collected
            if component not in referenced:
                out.append(_Candidate(kv.key, kv.mod_revision, master_key))
        for master_id, kv in masters_by_id.items():
            if master_id not in named and not _kept(master_id, keep):  # its index is gone
                out.append(_Candidate(kv.key, kv.mod_revision, None))
        return out

    async def _delete(self, backend: EtcdBackend, candidate: _Candidate) -> bool:
        guards = [mod_revision_is(candidate.key, candidate.mod_revision), *self.fence()]
        ops = [Delete(candidate.key)]
        if candidate.key.startswith(self.layout.identity_labels_prefix):
            component = candidate.key[len(self.layout.identity_labels_prefix) :].decode()
            guards.append(none_under(self.layout.identity_values(component)))
            if candidate.master_key is not None:
                ops.append(Delete(candidate.master_key))
        result = await backend.txn(guards, ops)
        if not result.succeeded:
            log.info("identity GC: %r changed since it was marked; skipped", candidate.key)
        return result.succeeded


def _kept(master_id: bytes, keep: set[int]) -> bool:
    return master_id.isdigit() and int(master_id) in keep
