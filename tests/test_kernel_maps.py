"""Kernel BPF maps through bpf(): needs root and a working bpf() (skipped otherwise)."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from ipaddress import ip_address, ip_network
from pathlib import Path

import pytest

from controlplane.datapath import bpf_syscall, kernel
from controlplane.datapath.bpf_syscall import (
    BPF_MAP_TYPE_HASH,
    BPF_MAP_TYPE_LPM_TRIE,
    BPF_MAP_TYPE_PERCPU_ARRAY,
    BPF_NOEXIST,
    KernelMapError,
    MapFullError,
    MapMismatchError,
    MapNotFoundError,
    MapUnsupportedError,
    ensure_bpffs,
    possible_cpus,
)
from controlplane.datapath.capabilities import DatapathSupport, detect_datapath
from controlplane.datapath.ipcache import (
    IPCACHE_MAP_NAME,
    KEY_SIZE,
    VALUE_SIZE,
    Ipcache,
    IpcacheEntry,
    encode_key,
)
from controlplane.datapath.kernel import KernelMap, pinned_ipcache
from controlplane.datapath.maps import Map, MapError, MapStats
from controlplane.datapath.reconciler import IpcacheReconciler
from controlplane.model import IPNetwork, NumericIdentity
from tests.helpers import kernel_maps_unmet, requires

_SUPPORT = detect_datapath()
pytestmark = requires(kernel_maps_unmet())

REPO = Path(__file__).resolve().parent.parent


# -- fixtures and helpers ---------------------------------------------------------------


@pytest.fixture
def pin_dir(bpf_pin_dir: Path) -> Path:
    """A fresh directory on the bpffs; pins in it are unlinked afterwards."""
    ensure_bpffs()
    bpf_pin_dir.mkdir()
    return bpf_pin_dir


@pytest.fixture
def maps() -> Iterator[list[KernelMap]]:
    """Maps to close after the test (closing the last fd frees an unpinned map)."""
    opened: list[KernelMap] = []
    yield opened
    for m in opened:
        m.close()


def u32(i: int) -> bytes:
    return i.to_bytes(4, "little")


def entry(ident: int, host: str = "192.168.0.1", flags: int = 0) -> IpcacheEntry:
    return IpcacheEntry(NumericIdentity(ident), ip_address(host), flags)


def net(text: str) -> IPNetwork:
    return ip_network(text)


def host_key(ip: str) -> bytes:
    addr = ip_address(ip)
    return encode_key(ip_network((addr, addr.max_prefixlen)))


def run_python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


class CountingMap:
    """A :class:`Map` wrapper that counts the writes reaching the kernel map."""

    def __init__(self, inner: KernelMap) -> None:
        self.inner = inner
        self.stats = MapStats()

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def key_size(self) -> int:
        return self.inner.key_size

    @property
    def value_size(self) -> int:
        return self.inner.value_size

    @property
    def thread_safe(self) -> bool:
        return self.inner.thread_safe

    def lookup(self, key: bytes) -> bytes | None:
        return self.inner.lookup(key)

    def update(self, key: bytes, value: bytes) -> None:
        self.stats.single_calls += 1
        self.stats.updates += 1
        self.inner.update(key, value)

    def delete(self, key: bytes) -> bool:
        self.stats.single_calls += 1
        removed = self.inner.delete(key)
        self.stats.deletes += removed
        return removed

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        return self.inner.items()

    def batch_update(self, entries: Sequence[tuple[bytes, bytes]]) -> int:
        self.stats.batch_calls += 1
        written = self.inner.batch_update(entries)
        self.stats.updates += written
        return written

    def batch_delete(self, keys: Sequence[bytes]) -> int:
        self.stats.batch_calls += 1
        removed = self.inner.batch_delete(keys)
        self.stats.deletes += removed
        return removed

    def __len__(self) -> int:
        return len(self.inner)


def lpm(maps: list[KernelMap], max_entries: int = 1024) -> KernelMap:
    m = KernelMap.create("cp_t_lpm", BPF_MAP_TYPE_LPM_TRIE, KEY_SIZE, VALUE_SIZE, max_entries)
    maps.append(m)
    return m


# -- capabilities -------------------------------------------------------------------------


def test_detect_datapath_says_why() -> None:
    assert _SUPPORT.kernel
    assert "usable" in _SUPPORT.reason
    assert "\n" not in _SUPPORT.reason


def test_detect_datapath_reasons_when_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(cmd: int, attr: ctypes.Structure) -> tuple[int, int]:
        return -1, errno.EPERM

    monkeypatch.setattr(kernel, "bpf", refuse)
    assert detect_datapath() == DatapathSupport(False, "bpf() refused: EPERM")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert detect_datapath() == DatapathSupport(False, "not root")


# -- hash map -----------------------------------------------------------------------------


def test_hash_crud_and_items(maps: list[KernelMap]) -> None:
    m = KernelMap.create("cp_t_hash", BPF_MAP_TYPE_HASH, 4, 8, 4)
    maps.append(m)
    as_map: Map = m  # the Protocol is satisfied structurally
    assert (as_map.name, as_map.key_size, as_map.value_size) == ("cp_t_hash", 4, 8)
    assert m.lookup(u32(1)) is None and len(m) == 0
    m.update(u32(1), b"a" * 8)
    m.update(u32(2), b"b" * 8)
    assert m.lookup(u32(1)) == b"a" * 8
    m.update(u32(1), b"c" * 8)
    assert m.lookup(u32(1)) == b"c" * 8
    with pytest.raises(KernelMapError, match="EEXIST"):
        m.update(u32(1), b"d" * 8, flags=BPF_NOEXIST)
    assert dict(m.items()) == {u32(1): b"c" * 8, u32(2): b"b" * 8}
    # items() is a snapshot: deleting while iterating is safe
    for key, _ in m.items():
        assert m.delete(key)
    assert len(m) == 0
    assert m.delete(u32(1)) is False
    with pytest.raises(MapError, match="key of 3 bytes"):
        m.lookup(b"abc")
    with pytest.raises(MapError, match="value of 2 bytes"):
        m.update(u32(1), b"xx")
    # a batch with one wrong size is refused whole, even when the total length adds up
    with pytest.raises(MapError, match="key of 3 bytes"):
        m.batch_update([(b"abc", b"e" * 8), (b"abcde", b"f" * 8)])
    with pytest.raises(MapError, match="value of 7 bytes"):
        m.batch_update([(u32(3), b"e" * 7), (u32(4), b"f" * 9)])
    assert m.lookup(u32(3)) is None and m.lookup(u32(4)) is None
    for i in range(4):
        m.update(u32(i), b"f" * 8)
    with pytest.raises(MapFullError, match="E2BIG") as full:
        m.update(u32(99), b"f" * 8)
    assert full.value.errno == errno.E2BIG
    assert "\n" not in str(full.value)
    assert m.info()["name"] == "cp_t_hash"
    m.close()
    assert m.closed
    with pytest.raises(KernelMapError, match="closed"):
        m.lookup(u32(1))


def test_hash_batch_update_and_delete_10k(maps: list[KernelMap]) -> None:
    n = 10_000
    m = KernelMap.create("cp_t_batch", BPF_MAP_TYPE_HASH, 4, 8, n)
    maps.append(m)
    entries = [(u32(i), i.to_bytes(8, "little")) for i in range(n)]
    assert m.batch_update(entries) == n
    assert m.batch_update_supported is True
    assert len(m) == n
    assert dict(m.items()) == dict(entries)
    # a rewrite of existing keys is fine; a batch past max_entries stops with E2BIG
    assert m.batch_update(entries[:10]) == 10
    with pytest.raises(MapFullError, match="BPF_MAP_UPDATE_BATCH"):
        m.batch_update([(u32(n + 1), b"\0" * 8)])
    # delete the even keys plus some absent ones: absent keys are skipped, not fatal
    doomed = [u32(i) for i in range(0, n, 2)] + [u32(n + 5), u32(n + 6)]
    assert m.batch_delete(doomed) == n // 2
    assert m.batch_delete_supported is True
    assert len(m) == n // 2
    assert m.lookup(u32(2)) is None and m.lookup(u32(3)) == (3).to_bytes(8, "little")
    assert m.batch_delete([u32(i) for i in range(n)]) == n // 2
    assert len(m) == 0
    assert m.batch_update([]) == 0 and m.batch_delete([]) == 0


# -- LPM trie -----------------------------------------------------------------------------


def test_lpm_longest_prefix_match_v4_mapped_and_v6(maps: list[KernelMap]) -> None:
    m = lpm(maps)
    stored = {
        "0.0.0.0/0": 1,
        "10.0.0.0/8": 8,
        "10.1.0.0/16": 16,
        "10.1.2.3/32": 32,
        "2001:db8::/32": 632,
        "2001:db8:1::/48": 648,
        "2001:db8:1::5/128": 6128,
    }
    for prefix, ident in stored.items():
        m.update(encode_key(net(prefix)), entry(ident).encode())

    def match(ip: str) -> int | None:
        raw = m.lpm_lookup(host_key(ip))
        return int(IpcacheEntry.decode(raw).identity) if raw is not None else None

    assert match("10.1.2.3") == 32
    assert match("10.1.2.4") == 16
    assert match("10.9.9.9") == 8
    assert match("192.168.1.1") == 1  # IPv4-mapped 0.0.0.0/0 is ::ffff:0:0/96
    assert match("2001:db8:1::5") == 6128
    assert match("2001:db8:1::6") == 648
    assert match("2001:db8:ffff::1") == 632
    assert match("2001:db9::1") is None  # the v4 default does not cover IPv6
    # the Map Protocol's lookup stays exact on an LPM trie
    assert m.lookup(encode_key(net("10.1.2.0/24"))) is None
    assert m.lookup(encode_key(net("10.1.0.0/16"))) == entry(16).encode()
    assert m.lookup(host_key("10.1.2.4")) is None
    last = sorted(m.keys())[-1]
    assert m.lookup(last) is not None
    # the userspace walk of Ipcache agrees with the kernel's longest-prefix match
    cache = Ipcache(m)
    for ip in ("10.1.2.3", "10.1.2.4", "10.9.9.9", "192.168.1.1", "2001:db8:1::6"):
        found = cache.lookup_ip(ip_address(ip))
        assert found is not None
        assert int(found[1].identity) == match(ip)
    assert {str(p): int(e.identity) for p, e in cache.entries()} == stored


def test_lpm_batch_ops_work_natively_or_by_fallback(maps: list[KernelMap]) -> None:
    m = lpm(maps)
    prefixes = [net(f"10.{i // 256}.{i % 256}.0/24") for i in range(500)]
    assert m.batch_update([(encode_key(p), entry(i).encode()) for i, p in enumerate(prefixes)])
    print(
        f"LPM trie batch support on this kernel: update={m.batch_update_supported} "
        f"delete={m.batch_delete_supported}"
    )
    assert len(m) == 500
    gone = [encode_key(p) for p in prefixes[:100]] + [encode_key(net("11.0.0.0/8"))]
    assert m.batch_delete(gone) == 100
    assert len(m) == 400


@pytest.mark.parametrize("kind", ["hash", "lpm"])
def test_items_read_by_lookup_batch_in_chunks_equal_the_key_walk(
    maps: list[KernelMap], kind: str
) -> None:
    n = 3 * 4096 + 17  # several BPF_MAP_LOOKUP_BATCH chunks and a partial one
    if kind == "hash":
        m = KernelMap.create("cp_t_dump", BPF_MAP_TYPE_HASH, 4, 8, n)
        maps.append(m)
        entries = [(u32(i), (i * 7).to_bytes(8, "little")) for i in range(n)]
    else:
        m = lpm(maps, max_entries=n)
        entries = [
            (encode_key(net(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}/32")), entry(i).encode())
            for i in range(n)
        ]
    assert dict(m.items()) == {} and len(m) == 0
    m.batch_update(entries)
    batched = list(m.items())
    assert m.batch_lookup_supported is True
    assert len(batched) == n and dict(batched) == dict(entries)
    assert len(m) == n
    m.batch_lookup_supported = False  # the per-key walk sees the same map
    assert dict(m.items()) == dict(entries) and len(m) == n


def test_batch_falls_back_per_element_when_kernel_lacks_batch_ops(
    maps: list[KernelMap], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kernels whose LPM trie has no batch ops answer ENOTSUPP without touching the count:
    simulate that and check the per-element fallback (and that it is remembered)."""
    real_bpf = kernel.bpf
    batch_calls: list[int] = []

    def no_batch(cmd: int, attr: ctypes.Structure) -> tuple[int, int]:
        if cmd in (
            bpf_syscall.BPF_MAP_LOOKUP_BATCH,
            bpf_syscall.BPF_MAP_UPDATE_BATCH,
            bpf_syscall.BPF_MAP_DELETE_BATCH,
        ):
            batch_calls.append(cmd)
            return -1, bpf_syscall.ENOTSUPP
        return real_bpf(cmd, attr)

    monkeypatch.setattr(kernel, "bpf", no_batch)
    m = lpm(maps)
    entries = [(encode_key(net(f"10.0.{i}.0/24")), entry(i).encode()) for i in range(50)]
    assert m.batch_update(entries) == 50
    assert m.batch_update_supported is False
    assert m.batch_update(entries[:5]) == 5  # no second batch attempt
    assert batch_calls == [bpf_syscall.BPF_MAP_UPDATE_BATCH]
    assert dict(m.items()) == dict(entries)
    assert m.batch_lookup_supported is False and len(m) == 50
    assert m.batch_delete([k for k, _ in entries[:10]] + [encode_key(net("11.0.0.0/8"))]) == 10
    assert m.batch_delete_supported is False
    assert len(m) == 40
    # forcing the fallback on a map that has batch ops works the same way
    monkeypatch.setattr(kernel, "bpf", real_bpf)
    h = KernelMap.create("cp_t_forced", BPF_MAP_TYPE_HASH, 4, 4, 16)
    maps.append(h)
    h.batch_update_supported = h.batch_delete_supported = False
    assert h.batch_update([(u32(i), u32(i)) for i in range(10)]) == 10
    assert h.batch_delete([u32(i) for i in range(12)]) == 10


# -- per-CPU array ------------------------------------------------------------------------


def test_percpu_array(maps: list[KernelMap]) -> None:
    m = KernelMap.create("cp_t_drops", BPF_MAP_TYPE_PERCPU_ARRAY, 4, 4, 8)
    maps.append(m)
    ncpu = possible_cpus()
    assert m.ncpus == ncpu >= 1
    assert m.lookup_percpu(u32(0)) == [b"\0" * 4] * ncpu  # arrays start zeroed
    assert m.lookup_percpu(u32(8)) is None  # out of range
    values = [(i + 1).to_bytes(4, "little") for i in range(ncpu)]
    m.update_percpu(u32(3), values)
    assert m.lookup_percpu(u32(3)) == values
    total = sum(int.from_bytes(v, "little") for v in m.lookup_percpu(u32(3)) or [])
    assert total == ncpu * (ncpu + 1) // 2
    m.update(u32(4), b"\x07\0\0\0")  # one value for every CPU
    assert m.lookup_percpu(u32(4)) == [b"\x07\0\0\0"] * ncpu
    assert m.batch_update([(u32(5), b"\x09\0\0\0")]) == 1
    assert m.lookup_percpu(u32(5)) == [b"\x09\0\0\0"] * ncpu
    with pytest.raises(MapUnsupportedError, match="lookup_percpu"):
        m.lookup(u32(0))
    with pytest.raises(KernelMapError, match="CPUs"):
        m.update_percpu(u32(1), [*values, b"\0" * 4])
    with pytest.raises(MapError, match="EINVAL"):  # array elements cannot be deleted
        m.delete(u32(3))
    with pytest.raises(MapError):
        m.batch_delete([u32(3)])
    assert len(m) == 8  # an array always has max_entries keys


# -- pinning ------------------------------------------------------------------------------

_READ_PINNED = """
import json, sys
from controlplane.datapath.kernel import KernelMap
m = KernelMap.open_pinned(sys.argv[1] if len(sys.argv) > 1 else {path!r})
print(json.dumps({{"info": m.info(), "items": {{k.hex(): v.hex() for k, v in m.items()}}}}))
"""

_CREATE_PINNED = """
from controlplane.datapath.kernel import KernelMap
from controlplane.datapath.bpf_syscall import BPF_MAP_TYPE_HASH
m = KernelMap.create("cp_t_child", BPF_MAP_TYPE_HASH, 4, 4, 64)
m.batch_update([(i.to_bytes(4, "little"), (i * i).to_bytes(4, "little")) for i in range(20)])
m.pin({path!r})
print("pinned")
"""


def test_pin_and_reopen_in_a_new_process(pin_dir: Path) -> None:
    path = pin_dir / "cp_t_pinned"
    m = KernelMap.create("cp_t_pinned", BPF_MAP_TYPE_HASH, 4, 8, 128)
    entries = {u32(i): bytes([i]) * 8 for i in range(30)}
    m.batch_update(list(entries.items()))
    m.pin(path)
    with pytest.raises(KernelMapError, match="EEXIST"):
        m.pin(path)
    m.close()  # only the pin keeps the map alive now
    out = json.loads(run_python(_READ_PINNED.format(path=str(path))))
    assert out["info"]["name"] == "cp_t_pinned"
    assert (out["info"]["type"], out["info"]["key_size"], out["info"]["value_size"]) == (
        BPF_MAP_TYPE_HASH,
        4,
        8,
    )
    assert out["info"]["max_entries"] == 128
    assert {bytes.fromhex(k): bytes.fromhex(v) for k, v in out["items"].items()} == entries
    with KernelMap.open_pinned(path) as again:
        assert again.name == "cp_t_pinned" and again.max_entries == 128
        assert dict(again.items()) == entries
    with pytest.raises(MapNotFoundError, match="ENOENT"):
        KernelMap.open_pinned(pin_dir / "absent")


def test_map_outlives_the_process_that_created_it(pin_dir: Path) -> None:
    path = pin_dir / "cp_t_child"
    assert run_python(_CREATE_PINNED.format(path=str(path))).strip() == "pinned"
    with KernelMap.open_pinned(path) as m:  # the creator has exited
        assert m.map_type == BPF_MAP_TYPE_HASH
        assert {int.from_bytes(k, "little"): int.from_bytes(v, "little") for k, v in m.items()} == {
            i: i * i for i in range(20)
        }


def test_pinned_ipcache_creates_then_reopens(pin_dir: Path) -> None:
    cache = pinned_ipcache(str(pin_dir))
    first = cache.map
    assert isinstance(first, KernelMap)
    assert first.map_type == BPF_MAP_TYPE_LPM_TRIE
    assert (pin_dir / IPCACHE_MAP_NAME).exists()
    first.update(encode_key(net("10.0.0.0/24")), entry(42).encode())
    first.close()
    again = pinned_ipcache(str(pin_dir))
    assert again.get(net("10.0.0.0/24")) == entry(42)
    assert isinstance(again.map, KernelMap) and again.map.name == IPCACHE_MAP_NAME
    again.map.close()
    # a relative prefix lives under /sys/fs/bpf
    name = f"cp-test-{secrets.token_hex(4)}"
    rel = pinned_ipcache(name, max_entries=64).map
    assert isinstance(rel, KernelMap)
    try:
        assert Path(bpf_syscall.BPFFS_ROOT, name, IPCACHE_MAP_NAME).exists()
        assert rel.max_entries == 64
    finally:
        rel.close()
        os.unlink(Path(bpf_syscall.BPFFS_ROOT, name, IPCACHE_MAP_NAME))
        os.rmdir(Path(bpf_syscall.BPFFS_ROOT, name))


def test_pinned_ipcache_refuses_a_foreign_map(pin_dir: Path) -> None:
    with KernelMap.create("cp_ipcache", BPF_MAP_TYPE_HASH, 4, 4, 4) as foreign:
        foreign.pin(pin_dir / IPCACHE_MAP_NAME)
    with pytest.raises(MapMismatchError, match="want an LPM trie"):
        pinned_ipcache(str(pin_dir))


# -- Ipcache and reconciler over the kernel map ------------------------------------------


def test_reconciler_over_kernel_map_with_mark_and_sweep(pin_dir: Path) -> None:
    cache = pinned_ipcache(str(pin_dir))
    kmap = cache.map
    assert isinstance(kmap, KernelMap)
    counting = CountingMap(kmap)
    rec = IpcacheReconciler(Ipcache(counting), batch_size=64)
    pods = {net(f"10.0.{i // 250}.{i % 250 + 1}/32"): entry(1000 + i) for i in range(300)}
    rec.set("node-a", pods)
    rec.set("node-b", {net("10.1.0.0/16"): entry(7, "192.168.0.2", 2)}, priority=1)
    rec.set("v6", {net("fd00::/64"): entry(9, "fd00::1")})
    rec.flush()
    assert counting.stats.updates == 302
    assert counting.stats.batch_calls == 5  # 302 writes in batches of 64
    assert Ipcache(kmap).dump() == rec.desired()
    raw = kmap.lpm_lookup(host_key("10.1.3.4"))
    assert raw is not None and IpcacheEntry.decode(raw) == entry(7, "192.168.0.2", 2)
    # flushing again with nothing dirty, or re-setting identical entries, writes nothing
    rec.set("node-a", pods)
    rec.flush()
    assert counting.stats.updates == 302

    # a "restarted agent" on the pinned map: a new reconciler re-lists and resyncs
    kmap.close()
    reopened = KernelMap.open_pinned(pin_dir / IPCACHE_MAP_NAME)
    counting = CountingMap(reopened)
    rec = IpcacheReconciler(Ipcache(counting), batch_size=64)
    rec.begin_resync()
    changed = {**pods, net("10.0.0.1/32"): entry(5555)}
    del changed[net("10.0.0.2/32")]
    rec.set("node-a", changed)
    rec.set("v6", {net("fd00::/64"): entry(9, "fd00::1")})
    swept = rec.end_resync()  # node-b was not re-listed: its entry goes
    assert swept == 2
    assert counting.stats.updates == 1  # only the changed entry is rewritten
    assert counting.stats.deletes == 2
    assert rec.stats.unchanged == 299
    assert Ipcache(reopened).dump() == rec.desired()
    assert reopened.lookup(encode_key(net("10.1.0.0/16"))) is None
    assert reopened.lpm_lookup(host_key("10.1.3.4")) is None
    reopened.close()


# -- micro-benchmark (printed, not asserted) ---------------------------------------------


def test_micro_benchmark(maps: list[KernelMap], capsys: pytest.CaptureFixture[str]) -> None:
    n = 100_000
    h = KernelMap.create("cp_t_bench", BPF_MAP_TYPE_HASH, KEY_SIZE, VALUE_SIZE, n)
    maps.append(h)
    entries = [
        (encode_key(ip_network((ip_address(0x0A000000 + i), 32))), entry(i).encode())
        for i in range(n)
    ]
    start = time.perf_counter()
    for i in range(0, n, 1024):
        h.batch_update(entries[i : i + 1024])
    batch_s = time.perf_counter() - start
    assert len(h) == n

    t = lpm(maps, max_entries=20_000)
    lpm_entries = entries[:20_000]
    start = time.perf_counter()
    for key, value in lpm_entries:
        t.update(key, value)
    single_s = time.perf_counter() - start

    start = time.perf_counter()
    for key, _ in lpm_entries[:5000]:
        t.lpm_lookup(key)
    lookup_s = time.perf_counter() - start
    with capsys.disabled():
        print(
            f"\n[bench] hash BPF_MAP_UPDATE_BATCH (1024/call): {n / batch_s:,.0f} entries/s; "
            f"LPM per-element update: {len(lpm_entries) / single_s:,.0f} entries/s; "
            f"LPM lpm_lookup: {5000 / lookup_s:,.0f} lookups/s"
        )
