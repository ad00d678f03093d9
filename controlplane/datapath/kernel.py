"""Kernel BPF maps through the raw ``bpf()`` syscall (ctypes, no libbpf).

:class:`KernelMap` implements the :class:`~controlplane.datapath.maps.Map` Protocol over a
map file descriptor, so the :class:`~controlplane.datapath.ipcache.Ipcache` and its
reconciler run unchanged on a real, pinned map. Only the ``union bpf_attr`` layouts of the
commands used here are mirrored (the kernel zero-fills the rest of the union).

Semantics worth knowing:

* ``lookup`` is an *exact* lookup for every map type. On an LPM trie the kernel's
  ``BPF_MAP_LOOKUP_ELEM`` does longest-prefix match, so exactness is checked with
  ``BPF_MAP_GET_NEXT_KEY`` (which returns the successor of an existing key and the
  leftmost key for an absent one); :meth:`KernelMap.lpm_lookup` is the kernel's LPM match.
* ``batch_update``/``batch_delete`` use ``BPF_MAP_UPDATE_BATCH``/``BPF_MAP_DELETE_BATCH``
  and fall back to one syscall per element when the map type has no batch ops (the kernel
  answers ``ENOTSUPP``/``EOPNOTSUPP``/``EINVAL`` before touching any element: LPM tries
  on older kernels, array deletes). The fallback is remembered per map and per operation
  (``batch_update_supported``/``batch_delete_supported``; set one False to force it).
  Kernel 6.18 does batch LPM-trie updates and deletes (generic per-element batch ops).
* Per-CPU maps hold one value per possible CPU, each padded to 8 bytes in the syscall
  buffer: use :meth:`KernelMap.lookup_percpu`/:meth:`KernelMap.update_percpu`;
  ``update``/``batch_update`` write the same value on every CPU, and ``lookup``/``items``
  refuse (a single value would hide the other CPUs).
"""

from __future__ import annotations

import ctypes
import errno
import os
import weakref
from collections.abc import Iterator, Sequence

from controlplane.datapath.bpf_syscall import (
    BPF_ANY,
    BPF_F_NO_PREALLOC,
    BPF_MAP_CREATE,
    BPF_MAP_DELETE_BATCH,
    BPF_MAP_DELETE_ELEM,
    BPF_MAP_GET_NEXT_KEY,
    BPF_MAP_LOOKUP_BATCH,
    BPF_MAP_LOOKUP_ELEM,
    BPF_MAP_TYPE_LPM_TRIE,
    BPF_MAP_UPDATE_BATCH,
    BPF_MAP_UPDATE_ELEM,
    BPF_OBJ_GET,
    BPF_OBJ_PIN,
    BPFFS_ROOT,
    DUMP_CHUNK,
    NAME_RE,
    NO_BATCH_ERRNOS,
    PERCPU_TYPES,
    KernelMapError,
    MapBatchAttr,
    MapCreateAttr,
    MapElemAttr,
    MapMismatchError,
    MapUnsupportedError,
    ObjAttr,
    addr,
    bpf,
    bpf_error,
    ensure_bpffs,
    map_info,
    no_batch,
    possible_cpus,
    round8,
)
from controlplane.datapath.ipcache import (
    IPCACHE_MAP_NAME,
    IPCACHE_MAX_ENTRIES,
    KEY_SIZE,
    VALUE_SIZE,
    Ipcache,
)
from controlplane.datapath.maps import SizedMap

__all__ = ["KernelMap", "pinned_ipcache"]


# -- the map --------------------------------------------------------------------------


class KernelMap(SizedMap):
    """A kernel BPF map behind the :class:`~controlplane.datapath.maps.Map` Protocol."""

    bpf_error = KernelMapError
    thread_safe = True

    def __init__(
        self,
        fd: int,
        *,
        name: str,
        map_type: int,
        key_size: int,
        value_size: int,
        max_entries: int,
        flags: int = 0,
    ) -> None:
        super().__init__(name, key_size, value_size)
        self._fd = fd
        self.map_type = map_type
        self.max_entries = max_entries
        self.flags = flags
        self.percpu = map_type in PERCPU_TYPES
        self.ncpus = possible_cpus() if self.percpu else 1
        self._slot = round8(value_size) if self.percpu else value_size
        """Bytes per value in the syscall buffer (all CPUs' values for per-CPU maps)."""
        self._buf_size = self._slot * self.ncpus
        self.batch_update_supported: bool | None = None
        """None until the first batch update tells whether the kernel does it."""
        self.batch_delete_supported: bool | None = None
        self.batch_lookup_supported: bool | None = None
        self._finalizer = weakref.finalize(self, os.close, fd)

    # -- construction ------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        name: str,
        map_type: int,
        key_size: int,
        value_size: int,
        max_entries: int,
        flags: int = 0,
    ) -> KernelMap:
        """Create a map (``BPF_MAP_CREATE``). LPM tries need ``BPF_F_NO_PREALLOC``, which
        is added for them; ``name`` is at most 15 characters of ``[A-Za-z0-9_.]``."""
        if not NAME_RE.match(name):
            raise KernelMapError(f"map name {name!r}: at most 15 of [A-Za-z0-9_.]")
        if map_type == BPF_MAP_TYPE_LPM_TRIE:
            flags |= BPF_F_NO_PREALLOC
        attr = MapCreateAttr(
            map_type=map_type,
            key_size=key_size,
            value_size=value_size,
            max_entries=max_entries,
            map_flags=flags,
            map_name=name.encode(),
        )
        fd, err = bpf(BPF_MAP_CREATE, attr)
        if fd < 0:
            raise bpf_error(BPF_MAP_CREATE, err, f"creating map {name} (type {map_type})")
        return cls(
            fd,
            name=name,
            map_type=map_type,
            key_size=key_size,
            value_size=value_size,
            max_entries=max_entries,
            flags=flags,
        )

    @classmethod
    def open_pinned(cls, path: str | os.PathLike[str]) -> KernelMap:
        """Open a pinned map (``BPF_OBJ_GET``) and learn its layout from the kernel."""
        cpath = ctypes.create_string_buffer(os.fsencode(path))
        fd, err = bpf(BPF_OBJ_GET, ObjAttr(pathname=ctypes.addressof(cpath)))
        if fd < 0:
            raise bpf_error(BPF_OBJ_GET, err, f"opening {os.fspath(path)}")
        try:
            info = map_info(fd)
        except BaseException:
            os.close(fd)
            raise
        return cls(
            fd,
            name=info.name.decode(errors="replace"),
            map_type=info.type,
            key_size=info.key_size,
            value_size=info.value_size,
            max_entries=info.max_entries,
            flags=info.map_flags,
        )

    def pin(self, path: str | os.PathLike[str]) -> None:
        """Pin the map at ``path`` (on a bpffs) so it outlives this process."""
        cpath = ctypes.create_string_buffer(os.fsencode(path))
        ret, err = bpf(BPF_OBJ_PIN, ObjAttr(pathname=ctypes.addressof(cpath), bpf_fd=self.fd))
        if ret < 0:
            raise bpf_error(BPF_OBJ_PIN, err, f"pinning map {self._name} at {os.fspath(path)}")

    def info(self) -> dict[str, int | str]:
        """What the kernel says about the map (``BPF_OBJ_GET_INFO_BY_FD``)."""
        info = map_info(self.fd)
        return {
            "id": info.id,
            "type": info.type,
            "name": info.name.decode(errors="replace"),
            "key_size": info.key_size,
            "value_size": info.value_size,
            "max_entries": info.max_entries,
            "flags": info.map_flags,
        }

    def close(self) -> None:
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def __enter__(self) -> KernelMap:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd}"
        return f"KernelMap({self._name!r}, type={self.map_type}, {state})"

    # -- Map Protocol ----------------------------------------------------------------

    @property
    def fd(self) -> int:
        if self.closed:
            raise KernelMapError(f"map {self._name}: closed")
        return self._fd

    def lookup(self, key: bytes) -> bytes | None:
        """The value under exactly ``key`` (an LPM trie too: no longest-prefix match)."""
        self._refuse_percpu("lookup")
        if self.map_type == BPF_MAP_TYPE_LPM_TRIE and not self._lpm_has(key):
            return None
        raw = self._lookup_raw(key)
        return raw[: self._value_size] if raw is not None else None

    def lpm_lookup(self, key: bytes) -> bytes | None:
        """The kernel's lookup: on an LPM trie, the value of the longest stored prefix that
        covers the first ``prefixlen`` bits of ``key`` (what the tc program sees)."""
        self._refuse_percpu("lpm_lookup")
        raw = self._lookup_raw(key)
        return raw[: self._value_size] if raw is not None else None

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        """Write one entry (per-CPU maps: the same value on every CPU)."""
        self._check_key(key)
        kbuf = ctypes.create_string_buffer(key, len(key))
        vbuf = ctypes.create_string_buffer(self._pack_value(value), self._buf_size)
        attr = MapElemAttr(map_fd=self.fd, key=addr(kbuf), value=addr(vbuf), flags=flags)
        ret, err = bpf(BPF_MAP_UPDATE_ELEM, attr)
        if ret < 0:
            raise bpf_error(BPF_MAP_UPDATE_ELEM, err, f"on map {self._name}")

    def delete(self, key: bytes) -> bool:
        self._check_key(key)
        kbuf = ctypes.create_string_buffer(key, len(key))
        ret, err = bpf(BPF_MAP_DELETE_ELEM, MapElemAttr(map_fd=self.fd, key=addr(kbuf)))
        if ret < 0:
            if err == errno.ENOENT:
                return False
            raise bpf_error(BPF_MAP_DELETE_ELEM, err, f"on map {self._name}")
        return True

    def keys(self) -> list[bytes]:
        """Every key (``BPF_MAP_GET_NEXT_KEY`` walk; a snapshot)."""
        out: list[bytes] = []
        prev: bytes | None = None
        while (nxt := self._next_key(prev)) is not None:
            out.append(nxt)
            prev = nxt
            if len(out) > self.max_entries:  # a hash map restarted under concurrent deletes
                break
        return out

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Every entry, as a snapshot taken before the first item is returned: read with
        ``BPF_MAP_LOOKUP_BATCH`` in chunks, or (where the kernel has no batch lookup for
        the map type) by a key walk and one lookup per key, leaving out entries deleted
        between the two."""
        self._refuse_percpu("items")
        batched = self._batch_items() if self.batch_lookup_supported is not False else None
        if batched is not None:
            return iter(batched)
        snapshot: list[tuple[bytes, bytes]] = []
        for key in self.keys():
            raw = self._lookup_raw(key)
            if raw is not None:
                snapshot.append((key, raw[: self._value_size]))
        return iter(snapshot)

    def _batch_items(self) -> list[tuple[bytes, bytes]] | None:
        """The whole map by ``BPF_MAP_LOOKUP_BATCH``; None when the kernel has no batch
        lookup for this map type (remembered in ``batch_lookup_supported``)."""
        ks, vs = self._key_size, self._value_size
        chunk = max(1, min(self.max_entries, DUMP_CHUNK))
        keys = ctypes.create_string_buffer(ks * chunk)
        values = ctypes.create_string_buffer(vs * chunk)
        # The resume token is a key for generic batch ops and a bucket index for hashes.
        token_in = ctypes.create_string_buffer(max(ks, 8))
        token_out = ctypes.create_string_buffer(max(ks, 8))
        out: list[tuple[bytes, bytes]] = []
        first = True
        while True:
            attr = MapBatchAttr(
                in_batch=0 if first else addr(token_in),
                out_batch=addr(token_out),
                keys=addr(keys),
                values=addr(values),
                count=chunk,
                map_fd=self.fd,
            )
            ret, err = bpf(BPF_MAP_LOOKUP_BATCH, attr)
            if ret < 0 and err != errno.ENOENT:  # ENOENT: the end of the map
                if first and self.batch_lookup_supported is None and err in NO_BATCH_ERRNOS:
                    self.batch_lookup_supported = False
                    return None
                raise bpf_error(BPF_MAP_LOOKUP_BATCH, err, f"on map {self._name}")
            self.batch_lookup_supported = True
            count = int(attr.count)
            kraw, vraw = keys.raw, values.raw
            out.extend(
                (kraw[i * ks : i * ks + ks], vraw[i * vs : i * vs + vs]) for i in range(count)
            )
            if ret < 0:
                return out
            ctypes.memmove(token_in, token_out, len(token_out))
            first = False

    def batch_update(self, entries: Sequence[tuple[bytes, bytes]]) -> int:
        """Write every entry with one ``BPF_MAP_UPDATE_BATCH``; falls back to one
        ``BPF_MAP_UPDATE_ELEM`` per entry where the kernel has no batch update for the map
        type (LPM tries on older kernels). Like the kernel, a failing element stops the
        call; the entries before it stay written. Returns how many were written."""
        if not entries:
            return 0
        key_list = [k for k, _ in entries]
        value_list = [v for _, v in entries]
        key_sizes, value_sizes = {*map(len, key_list)}, {*map(len, value_list)}
        if key_sizes != {self._key_size} or value_sizes != {self._value_size}:
            for key, value in entries:  # raises for the first wrong one
                self._check_key(key)
                self._check_value(value)
        if self.batch_update_supported is not False:
            key_blob = b"".join(key_list)
            value_blob = b"".join(
                [self._pack_value(v) for v in value_list] if self.percpu else value_list
            )
            keys = ctypes.create_string_buffer(key_blob, len(key_blob))
            values = ctypes.create_string_buffer(value_blob, len(value_blob))
            attr = MapBatchAttr(
                keys=addr(keys), values=addr(values), count=len(entries), map_fd=self.fd
            )
            ret, err = bpf(BPF_MAP_UPDATE_BATCH, attr)
            if ret == 0:
                self.batch_update_supported = True
                return len(entries)
            if not (self.batch_update_supported is None and no_batch(err, attr.count, entries)):
                raise bpf_error(
                    BPF_MAP_UPDATE_BATCH,
                    err,
                    f"on map {self._name} at element {attr.count} of {len(entries)}",
                )
            self.batch_update_supported = False
        for key, value in entries:
            self.update(key, value)
        return len(entries)

    def batch_delete(self, keys: Sequence[bytes]) -> int:
        """Remove every key with ``BPF_MAP_DELETE_BATCH`` (falling back to one
        ``BPF_MAP_DELETE_ELEM`` per key where the map type has no batch delete: LPM tries
        on older kernels). Absent keys are skipped (the kernel stops at them with
        ``ENOENT``; the call resumes after). Returns how many were present."""
        if not keys:
            return 0
        for key in keys:
            self._check_key(key)
        if self.batch_delete_supported is False:
            return sum(self.delete(k) for k in keys)
        removed = 0
        rest = list(keys)
        while rest:
            kbuf = ctypes.create_string_buffer(b"".join(rest))
            attr = MapBatchAttr(keys=addr(kbuf), count=len(rest), map_fd=self.fd)
            ret, err = bpf(BPF_MAP_DELETE_BATCH, attr)
            if ret == 0:
                self.batch_delete_supported = True
                return removed + len(rest)
            done = int(attr.count)
            if err == errno.ENOENT:
                self.batch_delete_supported = True
                removed += done
                rest = rest[done + 1 :]  # skip the absent key
                continue
            if self.batch_delete_supported is None and no_batch(err, done, rest):
                self.batch_delete_supported = False
                return removed + sum(self.delete(k) for k in rest)
            raise bpf_error(
                BPF_MAP_DELETE_BATCH, err, f"on map {self._name} at element {done} of {len(rest)}"
            )
        return removed

    def __len__(self) -> int:
        if not self.percpu and self.batch_lookup_supported is not False:
            batched = self._batch_items()
            if batched is not None:
                return len(batched)
        return len(self.keys())

    # -- per-CPU ---------------------------------------------------------------------

    def lookup_percpu(self, key: bytes) -> list[bytes] | None:
        """One value per possible CPU (per-CPU maps), or None when the key is absent."""
        raw = self._lookup_raw(key)
        if raw is None:
            return None
        return [raw[i * self._slot : i * self._slot + self._value_size] for i in range(self.ncpus)]

    def update_percpu(self, key: bytes, values: Sequence[bytes], flags: int = BPF_ANY) -> None:
        """Write one value per possible CPU."""
        if not self.percpu:
            raise KernelMapError(f"map {self._name}: not a per-CPU map")
        if len(values) != self.ncpus:
            raise KernelMapError(f"map {self._name}: {len(values)} values for {self.ncpus} CPUs")
        self._check_key(key)
        for v in values:
            self._check_value(v)
        packed = b"".join(v.ljust(self._slot, b"\0") for v in values)
        kbuf = ctypes.create_string_buffer(key, len(key))
        vbuf = ctypes.create_string_buffer(packed, len(packed))
        attr = MapElemAttr(map_fd=self.fd, key=addr(kbuf), value=addr(vbuf), flags=flags)
        ret, err = bpf(BPF_MAP_UPDATE_ELEM, attr)
        if ret < 0:
            raise bpf_error(BPF_MAP_UPDATE_ELEM, err, f"on map {self._name}")

    # -- internals -------------------------------------------------------------------

    def _lookup_raw(self, key: bytes) -> bytes | None:
        self._check_key(key)
        kbuf = ctypes.create_string_buffer(key, len(key))
        vbuf = ctypes.create_string_buffer(self._buf_size)
        attr = MapElemAttr(map_fd=self.fd, key=addr(kbuf), value=addr(vbuf))
        ret, err = bpf(BPF_MAP_LOOKUP_ELEM, attr)
        if ret < 0:
            if err == errno.ENOENT:
                return None
            raise bpf_error(BPF_MAP_LOOKUP_ELEM, err, f"on map {self._name}")
        return vbuf.raw

    def _next_key(self, key: bytes | None) -> bytes | None:
        kbuf = ctypes.create_string_buffer(key, len(key)) if key is not None else None
        nbuf = ctypes.create_string_buffer(self._key_size)
        attr = MapElemAttr(map_fd=self.fd, key=addr(kbuf), value=addr(nbuf))
        ret, err = bpf(BPF_MAP_GET_NEXT_KEY, attr)
        if ret < 0:
            if err == errno.ENOENT:
                return None
            raise bpf_error(BPF_MAP_GET_NEXT_KEY, err, f"on map {self._name}")
        return nbuf.raw

    def _lpm_has(self, key: bytes) -> bool:
        # GET_NEXT_KEY on an LPM trie: an exactly stored key yields its successor (or
        # ENOENT when last); any other key yields the leftmost key, which is never the
        # successor of a stored key.
        self._check_key(key)
        successor = self._next_key(key)
        if successor is None:
            return self._next_key(None) is not None  # key was the last one
        return successor != self._next_key(None)

    def _pack_value(self, value: bytes) -> bytes:
        self._check_value(value)
        if not self.percpu:
            return value
        return value.ljust(self._slot, b"\0") * self.ncpus

    def _refuse_percpu(self, op: str) -> None:
        if self.percpu:
            raise MapUnsupportedError(
                f"map {self._name}: {op} on a per-CPU map, use lookup_percpu()"
            )


def pinned_map(
    directory: str | os.PathLike[str],
    name: str,
    map_type: int,
    sizes: tuple[int, int],
    max_entries: int,
    flags: int = 0,
) -> KernelMap:
    """The map pinned at ``<directory>/<name>``: opened when pinned (its type, key and value
    sizes, max entries and flags must be these), else created so and pinned. Declared so
    in the C program too, libbpf reuses the pin and the map outlives the agent."""
    path = os.path.join(directory, name)
    want = (map_type, sizes[0], sizes[1], max_entries, flags)
    if os.path.exists(path):
        kmap = KernelMap.open_pinned(path)
        got = (kmap.map_type, kmap.key_size, kmap.value_size, kmap.max_entries, kmap.flags)
        if got != want:
            kmap.close()
            raise MapMismatchError(
                f"pinned map {path}: (type, key, value, max, flags) {got}, want {want}"
            )
        return kmap
    kmap = KernelMap.create(name, map_type, sizes[0], sizes[1], max_entries, flags)
    try:
        kmap.pin(path)
    except BaseException:
        kmap.close()
        raise
    return kmap


def pinned_ipcache(
    prefix_dir: str, *, bpffs: str = BPFFS_ROOT, max_entries: int = IPCACHE_MAX_ENTRIES
) -> Ipcache:
    """The ipcache on the LPM trie pinned at ``<bpffs>/<prefix_dir>/cp_ipcache``: opened
    when pinned (its layout must match), else created and pinned. An absolute
    ``prefix_dir`` is used as is (it must lie on a bpffs). The layout is exactly what
    ``bpf/cp_maps.h`` declares (LPM trie, ``BPF_F_NO_PREALLOC``, 20/24, ``max_entries``), so
    libbpf reuses the pin for the tc program and vice versa."""
    ensure_bpffs(bpffs)
    directory = prefix_dir if os.path.isabs(prefix_dir) else os.path.join(bpffs, prefix_dir)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, IPCACHE_MAP_NAME)
    if os.path.exists(path):
        kmap = KernelMap.open_pinned(path)
        got = (kmap.map_type, kmap.key_size, kmap.value_size, kmap.max_entries, kmap.flags)
        want = (BPF_MAP_TYPE_LPM_TRIE, KEY_SIZE, VALUE_SIZE, max_entries, BPF_F_NO_PREALLOC)
        if got != want:  # libbpf would refuse to reuse it for the tc program, too
            kmap.close()
            raise MapMismatchError(
                f"pinned map {path}: type {got[0]} key/value {got[1]}/{got[2]} max_entries "
                f"{got[3]} flags {got[4]:#x}, want an LPM trie 20/24 with {max_entries} "
                f"entries and BPF_F_NO_PREALLOC"
            )
        return Ipcache(kmap)
    kmap = KernelMap.create(
        IPCACHE_MAP_NAME, BPF_MAP_TYPE_LPM_TRIE, KEY_SIZE, VALUE_SIZE, max_entries
    )
    try:
        kmap.pin(path)
    except BaseException:
        kmap.close()
        raise
    return Ipcache(kmap)
