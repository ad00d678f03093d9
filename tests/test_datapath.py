"""The datapath seam: map layouts, the userspace map, the ipcache reconciler."""

from __future__ import annotations

import asyncio
import ctypes
import threading
from collections.abc import Sequence
from ipaddress import ip_address, ip_network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.datapath.ipcache import (
    FLAG_LOCAL,
    KEY_SIZE,
    VALUE_SIZE,
    Ipcache,
    IpcacheEntry,
    IpcacheKey,
    IpcacheValue,
    decode_key,
    encode_key,
    ip_identity_key,
    ip_identity_value,
    userspace_ipcache,
)
from controlplane.datapath.maps import MapError, UserspaceMap
from controlplane.datapath.reconciler import IpcacheReconciler
from controlplane.model import Endpoint, IPNetwork, NodeName, NumericIdentity
from tests.helpers import eventually, holds_for


def entry(ident: int, host: str = "192.168.0.1", flags: int = 0) -> IpcacheEntry:
    return IpcacheEntry(NumericIdentity(ident), ip_address(host), flags)


def test_layouts_are_the_c_structs() -> None:
    assert (KEY_SIZE, VALUE_SIZE) == (20, 24)
    assert IpcacheKey.addr.offset == 4
    assert IpcacheValue.tunnel_endpoint.offset == 4
    assert IpcacheValue.flags.offset == 20
    key = encode_key(ip_network("10.0.1.0/24"))
    raw = IpcacheKey.from_buffer_copy(key)
    assert raw.prefixlen == 96 + 24
    assert bytes(raw.addr) == b"\0" * 10 + b"\xff\xff" + bytes([10, 0, 1, 0])
    for net in ("10.0.1.7/32", "0.0.0.0/0", "2001:db8::/64", "::1/128"):
        assert decode_key(encode_key(ip_network(net))) == ip_network(net)
    e = IpcacheEntry(NumericIdentity(70000), ip_address("2001:db8::1"), 3)
    assert IpcacheEntry.decode(e.encode()) == e
    assert ctypes.sizeof(IpcacheValue) == len(e.encode())


def test_userspace_map_checks_sizes_and_capacity() -> None:
    m = UserspaceMap("m", 4, 2, max_entries=2)
    m.update(b"aaaa", b"xx")
    with pytest.raises(MapError):
        m.update(b"a", b"xx")
    with pytest.raises(MapError):
        m.update(b"bbbb", b"x")
    assert m.batch_update([(b"bbbb", b"yy"), (b"aaaa", b"zz")]) == 2
    with pytest.raises(MapError, match="full"):
        m.batch_update([(b"cccc", b"yy")])
    assert m.lookup(b"aaaa") == b"zz"
    assert m.batch_delete([b"aaaa", b"dddd"]) == 1
    assert len(m) == 1 and not m.delete(b"aaaa")


def test_longest_prefix_match() -> None:
    cache = userspace_ipcache()
    rec = IpcacheReconciler(cache)
    rec.set("pool", {ip_network("10.0.0.0/8"): entry(2)})
    rec.set("ep", {ip_network("10.0.1.5/32"): entry(1000)})
    rec.flush()
    hit = cache.lookup_ip(ip_address("10.0.1.5"))
    assert hit is not None and hit[1].identity == 1000
    hit = cache.lookup_ip(ip_address("10.9.9.9"))
    assert hit is not None and hit[0] == ip_network("10.0.0.0/8")
    assert cache.lookup_ip(ip_address("11.0.0.1")) is None


def _map(cache: Ipcache) -> UserspaceMap:
    assert isinstance(cache.map, UserspaceMap)
    return cache.map


def test_changes_are_batched_and_unchanged_entries_skipped() -> None:
    cache = userspace_ipcache()
    m = _map(cache)
    rec = IpcacheReconciler(cache, batch_size=100)
    for i in range(250):
        rec.set(f"ep:{i}", {ip_network(f"10.0.{i}.1/32"): entry(1000 + i)})
    assert len(m) == 0  # nothing written before a flush
    rec.flush()
    assert len(m) == 250
    assert m.stats.batch_calls == 3 and m.stats.single_calls == 0
    assert m.stats.updates == 250
    # The same values again: nothing is rewritten.
    for i in range(250):
        rec.set(f"ep:{i}", {ip_network(f"10.0.{i}.1/32"): entry(1000 + i)})
    rec.flush()
    assert m.stats.updates == 250
    # Priorities: an endpoint beats a node on the same prefix, whatever the order.
    rec.set("ep:x", {ip_network("10.0.0.1/32"): entry(7)}, priority=2)
    rec.set("node:x", {ip_network("10.0.0.1/32"): entry(6)}, priority=1)
    rec.flush()
    assert cache.get(ip_network("10.0.0.1/32")) == entry(7)
    rec.remove("ep:x")
    rec.remove("ep:0")
    rec.flush()
    assert cache.get(ip_network("10.0.0.1/32")) == entry(6)
    rec.remove("node:x")
    rec.flush()
    assert cache.get(ip_network("10.0.0.1/32")) is None
    assert m.stats.deletes == 1


def test_resync_is_mark_and_sweep_never_a_flush() -> None:
    cache = userspace_ipcache()
    m = _map(cache)
    rec = IpcacheReconciler(cache)
    prefixes: list[IPNetwork] = [ip_network(f"10.1.0.{i}/32") for i in range(100)]
    # Something outside the desired state sits in the map (a pinned map from before).
    m.update(encode_key(ip_network("172.16.0.1/32")), entry(9).encode())
    for i, p in enumerate(prefixes):
        rec.set(f"ep:{i}", {p: entry(2000 + i)})
    rec.flush()
    updates_before = m.stats.updates
    rec.begin_resync()
    # The re-list brings back 0..89 (unchanged) and 90 with a new identity; 91..99 vanished.
    seen_sizes: list[int] = []
    for i in range(91):
        rec.set(f"ep:{i}", {prefixes[i]: entry(2000 + i + (1 if i == 90 else 0))})
        rec.flush()
        seen_sizes.append(len(m))
    assert min(seen_sizes) >= 100, "the map must never shrink during a resync"
    swept = rec.end_resync()
    assert swept == 10  # 91..99 and the foreign entry
    assert len(m) == 91
    assert m.stats.updates - updates_before == 1  # only the changed entry was written
    assert cache.get(prefixes[90]) == entry(2091)
    assert rec.stats.resyncs == 1
    assert cache.dump() == rec.desired()
    # Written behind the reconciler's back after it read the map: the next resync reads
    # the map again and sweeps it.
    m.update(encode_key(ip_network("172.16.0.2/32")), entry(9).encode())
    rec.begin_resync()
    for i in range(91):
        rec.set(f"ep:{i}", {prefixes[i]: entry(2000 + i + (1 if i == 90 else 0))})
    assert rec.end_resync() == 1
    assert cache.dump() == rec.desired() and len(m) == 91
    assert rec.map_entries == 91  # counted from the shadow, which follows the map


async def test_run_flushes_in_the_background() -> None:
    cache = userspace_ipcache()
    rec = IpcacheReconciler(cache, batch_delay=0.01)
    task = asyncio.create_task(rec.run())
    try:
        for i in range(50):
            rec.set(f"ep:{i}", {ip_network(f"10.2.0.{i}/32"): entry(3000)})
        await eventually(lambda: len(cache) == 50, timeout=5)
        assert _map(cache).stats.batch_calls <= 2
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.parametrize(
    ("ip", "prefix_len", "host"),
    [("10.0.0.7", 32, "192.168.0.1"), ("10.1.0.0", 16, "fd00::1"), ("fd00::5", 128, "10.0.0.1")],
)
def test_endpoint_entries_encode_like_the_generic_ones(ip: str, prefix_len: int, host: str) -> None:
    pair = Endpoint(
        ip=ip_address(ip),
        prefix_len=prefix_len,
        identity=NumericIdentity(4242),
        node=NodeName("n1"),
        host_ip=ip_address(host),
        name="p",
        namespace="ns",
    ).ip_identity
    assert ip_identity_key(pair) == encode_key(ip_network(f"{ip}/{prefix_len}"))
    assert ip_identity_value(pair, FLAG_LOCAL) == entry(4242, host, FLAG_LOCAL).encode()


def test_ipcache_rejects_a_map_of_the_wrong_shape() -> None:
    with pytest.raises(ValueError, match="key/value sizes"):
        Ipcache(UserspaceMap("m", 8, 24, 10))


_PREFIXES = [ip_network(p) for p in ("10.0.0.1/32", "10.0.0.2/32", "10.0.0.0/24", "fd00::1/128")]
_SOURCES = ["ep:a", "ep:b", "node:a", "node:b"]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(_SOURCES),
            st.dictionaries(st.sampled_from(range(len(_PREFIXES))), st.integers(1, 5), max_size=3),
            st.integers(0, 2),
            st.booleans(),
        ),
        max_size=30,
    )
)
def test_claims_resolve_like_a_from_scratch_computation(
    ops: list[tuple[str, dict[int, int], int, bool]],
) -> None:
    """Any sequence of set/set_entry/set_entries/remove leaves the map equal to: for each
    prefix, the claim of the highest priority, ties to the smallest source name."""
    cache = userspace_ipcache()
    rec = IpcacheReconciler(cache)
    current: dict[str, tuple[int, dict[IPNetwork, IpcacheEntry]]] = {}
    batch: list[tuple[str, bytes, bytes]] = []  # single entries for one set_entries call
    batch_priority = 0

    def set_batch() -> None:
        if batch:
            rec.set_entries(batch, batch_priority)
            batch.clear()
            rec.flush()

    for source, picks, priority, batched in ops:
        entries = {_PREFIXES[i]: entry(ident) for i, ident in picks.items()}
        if len(entries) == 1 and priority != 1:  # some single entries by set_entry(ies)
            ((prefix, one),) = entries.items()
            triple = (source, encode_key(prefix), one.encode())
            if batched:
                if priority != batch_priority:
                    set_batch()
                batch.append(triple)
                batch_priority = priority
            else:
                set_batch()
                rec.set_entry(*triple, priority=priority)
        else:
            set_batch()
            rec.set(source, entries, priority=priority)
        current[source] = (priority, entries)
        rec.flush()
    set_batch()
    expected: dict[IPNetwork, IpcacheEntry] = {}
    for prefix in _PREFIXES:
        claims = [(-p, s, e[prefix]) for s, (p, e) in current.items() if prefix in e]
        if claims:
            expected[prefix] = min(claims, key=lambda c: (c[0], c[1]))[2]
    assert rec.desired() == expected
    assert cache.dump() == expected
    assert rec.map_entries == len(expected)
    assert rec.sources() == {s for s, (_, e) in current.items() if e}


class GatedMap(UserspaceMap):
    """A userspace ipcache map that lets the reconciler write it from a worker thread
    (every access goes through the reconciler's lock) and whose batch updates wait at
    ``gate``: a write held in flight for as long as a test needs."""

    thread_safe = True

    def __init__(self) -> None:
        super().__init__("gated", KEY_SIZE, VALUE_SIZE, 4096)
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.writers: set[str] = set()

    def batch_update(self, entries: Sequence[tuple[bytes, bytes]]) -> int:
        self.writers.add(threading.current_thread().name)
        self.entered.set()
        if not self.gate.wait(timeout=30):
            raise MapError("the gate never opened")
        return super().batch_update(entries)


class OpenOnContention:
    """The reconciler's map lock, opening ``gate`` when the loop has to wait for a write
    in flight (so a test can hold a write-behind and still let the loop through)."""

    def __init__(self, gate: threading.Event) -> None:
        self._lock = threading.Lock()
        self._gate = gate
        self.contended = 0

    def __enter__(self) -> None:
        if not self._lock.acquire(blocking=False):
            self.contended += 1
            self._gate.set()
            self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def _key(i: int) -> bytes:
    return encode_key(ip_network(f"10.3.{i // 250}.{i % 250}/32"))


async def test_large_flushes_are_written_behind_while_the_loop_goes_on() -> None:
    m = GatedMap()
    cache = Ipcache(m)
    rec = IpcacheReconciler(cache, write_behind_min=10)
    task = asyncio.create_task(rec.run())
    try:
        for i in range(40):
            rec.set_entry(f"ep:{i}", _key(i), entry(4000 + i).encode())
        await eventually(m.entered.is_set, timeout=10)  # held in its thread; we run
        assert threading.current_thread().name not in m.writers
        # Changes while the write is in flight: one endpoint goes, one changes.
        rec.remove("ep:0")
        rec.set_entry("ep:1", _key(1), entry(9999).encode())
        m.gate.set()
        await eventually(lambda: cache.dump() == rec.desired(), timeout=10)
        assert len(m) == 39 and cache.map.lookup(_key(1)) == entry(9999).encode()
        assert rec.stats.errors == 0 and all(_key(i) in rec.written_at for i in range(1, 40))
        # A single change is written on the loop, no thread hop.
        m.writers.clear()
        rec.set_entry("ep:40", _key(40), entry(4040).encode())
        await eventually(lambda: cache.map.lookup(_key(40)) is not None, timeout=10)
        assert m.writers == {threading.current_thread().name}
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_sweep_waits_for_the_write_in_flight() -> None:
    """A resync ends while a write-behind still holds an entry the resync drops: the
    sweep's delete must land after that write, or the entry would stay in the map."""
    m = GatedMap()
    cache = Ipcache(m)
    rec = IpcacheReconciler(cache, write_behind_min=10)
    lock = OpenOnContention(m.gate)
    rec._map_lock = lock  # type: ignore[assignment]
    rec.begin_resync()
    task = asyncio.create_task(rec.run())
    try:
        for i in range(40):
            rec.set_entry(f"ep:{i}", _key(i), entry(4000 + i).encode())
        await eventually(m.entered.is_set, timeout=10)
        rec.remove("ep:0")  # gone before the re-list ends, its write still in flight
        assert rec.end_resync() == 1  # the sweep deletes it: after the write
        assert lock.contended >= 1, "the sweep did not meet the write in flight"
        await eventually(lambda: rec.stats.updates == 40, timeout=10)
        assert cache.dump() == rec.desired() and len(m) == 39
        assert cache.map.lookup(_key(0)) is None
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_cancelled_run_waits_for_its_write_in_flight() -> None:
    """Whoever cancels the flusher (the agent on stop, before its last flush and before
    closing the map) must not race the write still running in its thread."""
    m = GatedMap()
    cache = Ipcache(m)
    rec = IpcacheReconciler(cache, write_behind_min=10)
    task = asyncio.create_task(rec.run())
    try:
        for i in range(40):
            rec.set_entry(f"ep:{i}", _key(i), entry(4000 + i).encode())
        await eventually(m.entered.is_set, timeout=10)
        task.cancel()
        await holds_for(lambda: not task.done(), 0.2, "run() returned with its write in flight")
    finally:  # (on a failure too: no task, no thread left behind)
        m.gate.set()
        if not task.cancelling():  # a second cancel would end its wait for the write
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()
    assert len(m) == 40 and rec.stats.updates == 40 and len(rec.written_at) == 40
    rec.flush()  # nothing left, nothing rewritten
    assert m.stats.updates == 40
