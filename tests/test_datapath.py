"""The datapath seam: map layouts, the userspace map, the ipcache reconciler."""

from __future__ import annotations

import asyncio
import ctypes
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
from tests.helpers import eventually


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


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(_SOURCES),
            st.dictionaries(st.sampled_from(range(len(_PREFIXES))), st.integers(1, 5), max_size=3),
            st.integers(0, 2),
        ),
        max_size=30,
    )
)
def test_claims_resolve_like_a_from_scratch_computation(
    ops: list[tuple[str, dict[int, int], int]],
) -> None:
    """Any sequence of set/set_entry/remove leaves the map equal to: for each prefix, the claim of
    the highest priority, ties to the smallest source name."""
    cache = userspace_ipcache()
    rec = IpcacheReconciler(cache)
    current: dict[str, tuple[int, dict[IPNetwork, IpcacheEntry]]] = {}
    for source, picks, priority in ops:
        entries = {_PREFIXES[i]: entry(ident) for i, ident in picks.items()}
        if len(entries) == 1 and priority != 1:  # some single entries by set_entry
            ((prefix, one),) = entries.items()
            rec.set_entry(source, encode_key(prefix), one.encode(), priority=priority)
        else:
            rec.set(source, entries, priority=priority)
        current[source] = (priority, entries)
        rec.flush()
    expected: dict[IPNetwork, IpcacheEntry] = {}
    for prefix in _PREFIXES:
        claims = [(-p, s, e[prefix]) for s, (p, e) in current.items() if prefix in e]
        if claims:
            expected[prefix] = min(claims, key=lambda c: (c[0], c[1]))[2]
    assert rec.desired() == expected
    assert cache.dump() == expected
    assert rec.map_entries == len(expected)
    assert rec.sources() == {s for s, (_, e) in current.items() if e}
