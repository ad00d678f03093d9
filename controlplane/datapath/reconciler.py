"""Keeps the ipcache map equal to the store: batched updates, mark-and-sweep resyncs.

The agent describes what it knows as *sources*: each endpoint and each node contributes
entries (prefix -> :class:`IpcacheEntry`). When several sources claim one prefix, the one
with the highest priority wins (ties: the smallest source name), so the result never
depends on event order. Changes only mark prefixes dirty; :meth:`flush` (run by
:meth:`run` shortly after the first change) writes the dirty ones in batches and skips an
entry whose map value is already right, so an unchanged entry is never rewritten.

A resync (after the agent re-lists: a restart, a new process on pinned maps) is
mark-and-sweep: :meth:`begin_resync` marks every source; sources that come back are
unmarked; :meth:`end_resync` drops the ones that did not and then compares the whole map
with the desired state, writing only the differences. The map is never emptied first, so
the datapath keeps forwarding with the old truth until the new one is known.

A new process on an already-populated pinned map first *adopts* the map's content
(:meth:`adopt_map`): every entry found is treated as marked, so an entry a previous run
wrote and the store no longer wants is deleted by the first :meth:`end_resync`, while the
entries that are still right are never rewritten. The sweep always compares against what
the map actually holds, not only against what this process wrote: the map as read at
adoption or on the first flush (for the first resync), or read again (for later ones),
plus this process's writes since.

On a kernel map, :meth:`run` writes large flushes *behind*: the ``bpf()`` calls run on a
worker thread (ctypes lets go of the GIL) while the loop decodes the next list page. The
shadow counts such a write as done as soon as it starts, so that a sweep computed
meanwhile includes it, and every map access (the thread's, or the loop's, which then
waits for it) holds one lock, so that a sweep's deletes land after the write they follow.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import threading
import time
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass
from operator import itemgetter

from controlplane.datapath.ipcache import Ipcache, IpcacheEntry, decode_key, encode_key
from controlplane.datapath.maps import MapError
from controlplane.model import IPNetwork

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ReconcilerStats:
    """What the reconciler wrote, cumulatively."""

    flushes: int = 0
    updates: int = 0
    """Entries written to the map."""
    deletes: int = 0
    """Entries removed from the map."""
    unchanged: int = 0
    """Dirty entries whose map value was already right (not rewritten)."""
    resyncs: int = 0
    swept: int = 0
    """Entries removed by a resync's sweep (absent from the desired state)."""
    errors: int = 0
    """Batch writes the map refused (logged; retried at the next flush)."""
    adopted: int = 0
    """Entries found in the map when it was adopted (a previous run's content)."""


_Claim = tuple[str, int, bytes]
"""One source's claim on a key: (source, priority, encoded value)."""


def _others(held: _Claim | list[_Claim], source: str) -> list[_Claim]:
    """The claims in ``held`` that are not ``source``'s."""
    claims = [held] if isinstance(held, tuple) else held
    return [claim for claim in claims if claim[0] != source]


def _rank(claim: _Claim) -> tuple[int, str]:
    """Highest priority first, then the smallest source name."""
    return -claim[1], claim[0]


class IpcacheReconciler:
    """Desired ipcache state from sources, applied to an :class:`Ipcache` in batches.

    Everything is kept as encoded map keys and values (what the kernel map holds), so a
    flush or a resync compares bytes and never encodes an entry twice.
    """

    def __init__(
        self,
        ipcache: Ipcache,
        *,
        batch_size: int = 1024,
        batch_delay: float = 0.0,
        write_behind_min: int = 256,
    ) -> None:
        self.ipcache = ipcache
        self.batch_size = batch_size
        self.write_behind_min = write_behind_min
        """The smallest flush :meth:`run` hands to a worker thread (see there)."""
        self._thread_safe = ipcache.map.thread_safe
        self._map_lock = threading.Lock()
        """Held by whoever reads or writes the map: a write-behind's thread, or the loop
        (which then waits for at most one batch in flight)."""
        self.batch_delay = batch_delay
        """Seconds :meth:`run` waits after the first change, to gather a batch. The default
        0 flushes at once: changes that arrive while a flush runs form the next batch, so
        batches grow with load and an idle agent adds no delay."""
        self.stats = ReconcilerStats()
        self.written_at: dict[bytes, float] = {}
        """Map key -> when we last wrote it (monotonic): for latency measurements."""
        self._sources: dict[str, bytes | tuple[bytes, ...]] = {}
        """Source -> the keys it claims: one key as itself (nearly every source: saves a
        tuple per endpoint), several as a tuple."""
        self._claims: dict[bytes, _Claim | list[_Claim]] = {}
        """Key -> its claims: one tuple (nearly always), or a list when contested."""
        self._want: dict[bytes, bytes] = {}
        """The winning claim's value for every claimed key: the desired map."""
        self._dirty: dict[bytes, None] = {}
        """Keys to write at the next flush, in the order they changed (a list arrives in key
        order, and an LPM trie takes near-ordered inserts ~1.5x faster than random ones)."""
        self._marked: builtins.set[str] | None = None
        self._adopted: builtins.set[bytes] = builtins.set()
        self._full_sync_pending = False
        self._wake = asyncio.Event()
        self._read_since_full_sync = False
        """The shadow was read from the map since the last full sync (so the next one need
        not read it again)."""
        self._shadow: dict[bytes, bytes] | None = None
        """What the map holds, as far as we know: read from the map at adoption (or by the
        first flush) and by full resyncs, then kept by our own writes (the agent is the
        maps' only writer; after a failed write it is dropped and read again). Flushes
        compare against it instead of the kernel, saving two or three syscalls per entry
        (an exact lookup in an LPM trie needs GET_NEXT_KEY)."""

    # -- desired state ---------------------------------------------------------------

    def set(
        self, source: str, entries: Mapping[IPNetwork, IpcacheEntry], *, priority: int = 0
    ) -> None:
        """Replace what ``source`` contributes (an empty mapping removes it)."""
        self.set_encoded(
            source, {encode_key(p): e.encode() for p, e in entries.items()}, priority=priority
        )

    def set_encoded(
        self, source: str, entries: Mapping[bytes, bytes], *, priority: int = 0
    ) -> None:
        """:meth:`set` with entries already encoded (map key -> map value)."""
        self._release(source, entries)
        for key, value in entries.items():
            self._claim(key, source, priority, value)
        if len(entries) == 1:
            self._sources[source] = next(iter(entries))
        elif entries:
            self._sources[source] = tuple(entries)
        self._wake.set()

    def set_entry(self, source: str, key: bytes, value: bytes, priority: int = 0) -> None:
        """:meth:`set_encoded` of a source with one entry (an endpoint's)."""
        self.set_entries(((source, key, value),), priority)

    def set_entries(self, entries: Iterable[tuple[str, bytes, bytes]], priority: int = 0) -> None:
        """:meth:`set_entry` for each ``(source, key, value)``, in order. The agent calls it
        for every endpoint of the cluster on a cold sync, a watch batch at a time, so the
        common cases of :meth:`_release` and :meth:`_claim` are inlined."""
        sources, claims, want, dirty = self._sources, self._claims, self._want, self._dirty
        marked = self._marked
        for source, key, value in entries:
            old = sources.get(source)
            if old != key:  # None, another key, or a tuple of several
                if old is None:
                    if marked:
                        marked.discard(source)
                else:
                    self._release(source, (key,))
                sources[source] = key
            elif marked:
                marked.discard(source)
            held = claims.get(key)
            if held is None or (held.__class__ is tuple and held[0] == source):
                claims[key] = (source, priority, value)
                want[key] = value
                dirty[key] = None
            else:
                self._claim(key, source, priority, value)
        self._wake.set()

    def _release(self, source: str, keep: Container[bytes]) -> None:
        """Unmark ``source`` and drop its claims on keys not in ``keep``."""
        if self._marked is not None:
            self._marked.discard(source)
        old = self._sources.pop(source, None)
        if old is not None:
            for key in (old,) if isinstance(old, bytes) else old:
                if key not in keep:
                    self._unclaim(key, source)

    def _claim(self, key: bytes, source: str, priority: int, value: bytes) -> None:
        held = self._claims.get(key)
        if held is None or (held.__class__ is tuple and held[0] == source):
            self._claims[key] = (source, priority, value)
            self._want[key] = value
        else:
            self._settle(key, [*_others(held, source), (source, priority, value)])
        self._dirty[key] = None

    def remove(self, source: str) -> None:
        self.set_encoded(source, {})

    def sources(self) -> frozenset[str]:
        return frozenset(self._sources)

    @property
    def map_entries(self) -> int:
        """How many entries the map holds: counted from the shadow (a gauge read every few
        seconds must not dump a map of 100k entries), from the map when there is none."""
        return len(self._shadow) if self._shadow is not None else len(self.ipcache)

    def resolve(self, prefix: IPNetwork) -> IpcacheEntry | None:
        value = self._want.get(encode_key(prefix))
        return IpcacheEntry.decode(value) if value is not None else None

    def desired(self) -> dict[IPNetwork, IpcacheEntry]:
        return {decode_key(k): IpcacheEntry.decode(v) for k, v in self._want.items()}

    def _unclaim(self, key: bytes, source: str) -> None:
        held = self._claims.get(key)
        if held is not None:
            self._settle(key, _others(held, source))
            self._dirty[key] = None

    def _settle(self, key: bytes, claims: list[_Claim]) -> None:
        """Store ``key``'s claims (a lone claim as a tuple) and its winner's value."""
        if not claims:
            del self._claims[key]
            del self._want[key]
        elif len(claims) == 1:
            self._claims[key] = claims[0]
            self._want[key] = claims[0][2]
        else:
            self._claims[key] = claims
            self._want[key] = min(claims, key=_rank)[2]

    # -- resync ----------------------------------------------------------------------

    @property
    def resyncing(self) -> bool:
        return self._marked is not None

    def adopt_map(self) -> int:
        """Take the map's current content (a previous run's) as marked: kept untouched
        until the first :meth:`end_resync`, which deletes what the desired state lacks and
        rewrites only what differs. Returns how many entries were found."""
        self._shadow = None
        self._adopted = set(self._map_content())
        self.stats.adopted = len(self._adopted)
        if self._adopted:
            log.info(
                "ipcache %s: adopted %d existing entries; stale ones are swept after the "
                "first full sync",
                self.ipcache.map.name,
                len(self._adopted),
            )
        return len(self._adopted)

    @property
    def adopted(self) -> frozenset[bytes]:
        """Keys adopted from the map and not yet confirmed or swept by a resync."""
        return frozenset(self._adopted)

    def begin_resync(self) -> None:
        """Mark every source; those not set again before :meth:`end_resync` are dropped."""
        self._marked = {*self._sources}

    def end_resync(self, keep: Iterable[str] = ()) -> int:
        """Sweep: drop unrefreshed sources (except ``keep``), then make the whole map equal
        the desired state, touching only what differs. Returns the entries removed."""
        marked: builtins.set[str] = self._marked or builtins.set()
        self._marked = None
        for source in marked - frozenset(keep):
            self.remove(source)
        self.stats.resyncs += 1
        return self._full_sync()

    def _full_sync(self) -> int:
        """Make the whole map (its actual content: adopted entries, entries of any earlier
        run) equal the desired state, touching only what differs."""
        # A resync compares with the real map, not only with what we wrote: it is where
        # anything written behind our back (by a previous run, or by hand) gets swept. A
        # map read since the last full sync (at adoption, by the first flush of a cold
        # start) is that; otherwise read it again.
        if not self._read_since_full_sync:
            self._shadow = None
        content = self._map_content()
        want = self._want
        if content == want:  # the usual case, compared in C
            stale: list[bytes] = []
            writes: list[tuple[bytes, bytes]] = []
        else:
            stale = [key for key in content if key not in want]
            content_get = content.get
            writes = [(k, v) for k, v in want.items() if content_get(k) != v]
        self._dirty.clear()
        if not self._write(writes, stale):
            self._full_sync_pending = True  # the next flush compares the whole map again
            return 0
        self._full_sync_pending = False
        self._read_since_full_sync = False
        self.stats.unchanged += len(want) - len(writes)
        self._adopted.clear()
        self.stats.swept += len(stale)
        if stale:
            log.info("ipcache resync swept %d stale entries", len(stale))
        return len(stale)

    # -- applying --------------------------------------------------------------------

    def flush(self) -> None:
        """Write the dirty prefixes: batched updates and deletes, unchanged ones skipped."""
        planned = self._plan()
        if planned is not None:
            self._write_or_requeue(*planned)

    async def run(self) -> None:
        """Flush shortly after changes arrive, until cancelled.

        On a map that allows it (a kernel map), a flush of at least ``write_behind_min``
        entries is written by a worker thread while the loop goes on: a cold sync's batch
        keeps the kernel busy for milliseconds (~1-2 µs per LPM-trie entry), time in which
        the next list page is decoded. Smaller flushes (single watch events) are written
        inline, with no thread hop."""
        while True:
            await self._wake.wait()
            await asyncio.sleep(self.batch_delay)
            self._wake.clear()
            planned = self._plan()
            if planned is None:
                continue
            writes, deletes, _ = planned
            if len(writes) + len(deletes) < self.write_behind_min or not self._thread_safe:
                self._write_or_requeue(*planned)
            else:
                await self._write_behind(*planned)

    def _plan(self) -> tuple[list[tuple[bytes, bytes]], list[bytes], dict[bytes, None]] | None:
        """Take the dirty keys: (writes, deletes, the keys taken); None when there is
        nothing to write (or a pending full sync did it)."""
        if self._full_sync_pending and not self.resyncing:
            self._full_sync()
            return None
        if not self._dirty:
            return None
        dirty, self._dirty = self._dirty, {}
        want, content, keys = self._want, self._map_content(), dirty.keys()
        if content.keys().isdisjoint(keys) and want.keys() >= keys:
            # Every key new to the map and wanted (a cold sync's pages): all writes, taken
            # in C, in arrival order.
            return list(zip(keys, map(want.__getitem__, keys), strict=True)), [], dirty
        writes: list[tuple[bytes, bytes]] = []
        deletes: list[bytes] = []
        want_get, content_get = want.get, content.get
        unchanged = 0
        for key in dirty:
            value = want_get(key)
            current = content_get(key)
            if value is None:
                if current is not None:
                    deletes.append(key)
            elif current == value:
                unchanged += 1
            else:
                writes.append((key, value))
        self.stats.unchanged += unchanged
        if not writes and not deletes:
            return None
        return writes, deletes, dirty

    def _write_or_requeue(
        self, writes: list[tuple[bytes, bytes]], deletes: list[bytes], dirty: dict[bytes, None]
    ) -> None:
        if not self._write(writes, deletes):
            self._dirty.update(dirty)  # try again next time

    def _write(self, writes: list[tuple[bytes, bytes]], deletes: list[bytes]) -> bool:
        """Write on the loop (waiting for a write-behind in flight, if any)."""
        self._assume_written(writes, deletes)
        try:
            counts = self._apply(writes, deletes, self.batch_size)
        except MapError as exc:
            self._write_failed(exc)
            return False
        self._written(writes, deletes, counts)
        return True

    async def _write_behind(
        self, writes: list[tuple[bytes, bytes]], deletes: list[bytes], dirty: dict[bytes, None]
    ) -> None:
        self._assume_written(writes, deletes)
        # One call for the whole flush: between calls the thread needs the GIL, which the
        # busy loop hands over only every switch interval (5 ms).
        size = max(len(writes), len(deletes))
        done = asyncio.get_running_loop().run_in_executor(None, self._apply, writes, deletes, size)
        try:
            await asyncio.shield(done)
        except MapError:
            pass  # handled below, like the success
        except asyncio.CancelledError:
            # The thread goes on: let it finish before the caller (who may close the map,
            # or flush on the loop) goes on.
            await asyncio.wait([done])
            raise
        finally:
            if done.done():
                self._behind_done(writes, deletes, dirty, done)

    def _behind_done(
        self,
        writes: list[tuple[bytes, bytes]],
        deletes: list[bytes],
        dirty: dict[bytes, None],
        done: asyncio.Future[tuple[int, int]],
    ) -> None:
        exc = done.exception()
        if exc is None:
            self._written(writes, deletes, done.result())
        elif isinstance(exc, MapError):
            self._write_failed(exc)
            self._dirty.update(dirty)
            self._wake.set()

    def _assume_written(self, writes: list[tuple[bytes, bytes]], deletes: list[bytes]) -> None:
        """Record a write in the shadow before it is done, so that whatever is computed
        while it is in flight (a resync's sweep, the next flush) counts it; a failed
        write drops the shadow, and the map is read again."""
        self.stats.flushes += 1
        content = self._map_content()
        for key in deletes:
            content.pop(key, None)
        content.update(writes)

    def _apply(
        self, writes: list[tuple[bytes, bytes]], deletes: list[bytes], size: int
    ) -> tuple[int, int]:
        """The batched map calls, ``size`` entries per call (on the loop or a worker
        thread): (updated, deleted)."""
        updated = deleted = 0
        with self._map_lock:
            for i in range(0, len(deletes), size):
                deleted += self.ipcache.map.batch_delete(deletes[i : i + size])
            for i in range(0, len(writes), size):
                updated += self.ipcache.map.batch_update(writes[i : i + size])
        return updated, deleted

    def _written(
        self, writes: list[tuple[bytes, bytes]], deletes: list[bytes], counts: tuple[int, int]
    ) -> None:
        self.stats.updates += counts[0]
        self.stats.deletes += counts[1]
        written_at = self.written_at
        for key in deletes:
            written_at.pop(key, None)
        written_at.update(dict.fromkeys(map(itemgetter(0), writes), time.monotonic()))

    def _write_failed(self, exc: MapError) -> None:
        self.stats.errors += 1
        self._shadow = None  # part of the batch may have landed: read the map again
        log.warning("ipcache write failed: %s", exc)

    def _map_content(self) -> dict[bytes, bytes]:
        if self._shadow is None:
            with self._map_lock:  # not while a write-behind is half done
                self._shadow = dict(self.ipcache.map.items())
            self._read_since_full_sync = True
        return self._shadow


def describe(
    ipcache: Ipcache, written_at: Mapping[bytes, float] | None = None
) -> list[dict[str, object]]:
    """The map as JSON-friendly rows, sorted by prefix (for the agent's API and cpctl).

    ``written_at`` adds when each entry was last written (host-wide monotonic seconds).
    """
    rows = []
    for key, value in ipcache.map.items():
        prefix = decode_key(key)
        entry = IpcacheEntry.decode(value)
        row: dict[str, object] = {
            "prefix": str(prefix),
            "identity": int(entry.identity),
            "tunnel_endpoint": str(entry.tunnel_endpoint),
            "flags": entry.flags,
        }
        if written_at is not None and key in written_at:
            row["written_at"] = written_at[key]
        rows.append(row)
    rows.sort(key=lambda r: str(r["prefix"]))
    return rows
