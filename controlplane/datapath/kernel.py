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
import platform
import re
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

from controlplane.datapath.ipcache import (
    IPCACHE_MAP_NAME,
    IPCACHE_MAX_ENTRIES,
    KEY_SIZE,
    VALUE_SIZE,
    Ipcache,
)
from controlplane.datapath.maps import MapError, SizedMap

# -- constants (include/uapi/linux/bpf.h) ---------------------------------------------

BPF_MAP_CREATE: Final = 0
BPF_MAP_LOOKUP_ELEM: Final = 1
BPF_MAP_UPDATE_ELEM: Final = 2
BPF_MAP_DELETE_ELEM: Final = 3
BPF_MAP_GET_NEXT_KEY: Final = 4
BPF_OBJ_PIN: Final = 6
BPF_OBJ_GET: Final = 7
BPF_OBJ_GET_INFO_BY_FD: Final = 15
BPF_MAP_LOOKUP_BATCH: Final = 24
BPF_MAP_UPDATE_BATCH: Final = 26
BPF_MAP_DELETE_BATCH: Final = 27

BPF_MAP_TYPE_HASH: Final = 1
BPF_MAP_TYPE_ARRAY: Final = 2
BPF_MAP_TYPE_PERCPU_HASH: Final = 5
BPF_MAP_TYPE_PERCPU_ARRAY: Final = 6
BPF_MAP_TYPE_LPM_TRIE: Final = 11

BPF_F_NO_PREALLOC: Final = 1 << 0

BPF_ANY: Final = 0
BPF_NOEXIST: Final = 1
BPF_EXIST: Final = 2

ENOTSUPP: Final = 524
"""The kernel-internal "operation not supported" (not in userspace ``errno``)."""

BPFFS_ROOT: Final = "/sys/fs/bpf"
BPF_FS_MAGIC: Final = 0xCAFE4A11

_SYSCALL_NR: Final = {"x86_64": 321, "aarch64": 280, "arm64": 280}
_PERCPU_TYPES: Final = frozenset({BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY})
_ARRAY_TYPES: Final = frozenset({BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_PERCPU_ARRAY})
_NO_BATCH_ERRNOS: Final = frozenset({errno.EINVAL, errno.EOPNOTSUPP, ENOTSUPP})
_NAME_RE: Final = re.compile(r"^[A-Za-z0-9_.]{0,15}$")
_DUMP_CHUNK: Final = 4096
"""Entries per ``BPF_MAP_LOOKUP_BATCH`` call when reading a whole map."""

_CMD_NAMES: Final = {
    BPF_MAP_CREATE: "BPF_MAP_CREATE",
    BPF_MAP_LOOKUP_ELEM: "BPF_MAP_LOOKUP_ELEM",
    BPF_MAP_UPDATE_ELEM: "BPF_MAP_UPDATE_ELEM",
    BPF_MAP_DELETE_ELEM: "BPF_MAP_DELETE_ELEM",
    BPF_MAP_GET_NEXT_KEY: "BPF_MAP_GET_NEXT_KEY",
    BPF_OBJ_PIN: "BPF_OBJ_PIN",
    BPF_OBJ_GET: "BPF_OBJ_GET",
    BPF_OBJ_GET_INFO_BY_FD: "BPF_OBJ_GET_INFO_BY_FD",
    BPF_MAP_LOOKUP_BATCH: "BPF_MAP_LOOKUP_BATCH",
    BPF_MAP_UPDATE_BATCH: "BPF_MAP_UPDATE_BATCH",
    BPF_MAP_DELETE_BATCH: "BPF_MAP_DELETE_BATCH",
}

# -- bpf_attr layouts -----------------------------------------------------------------


class _MapCreateAttr(ctypes.Structure):
    _fields_ = (
        ("map_type", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("inner_map_fd", ctypes.c_uint32),
        ("numa_node", ctypes.c_uint32),
        ("map_name", ctypes.c_char * 16),
    )


class _MapElemAttr(ctypes.Structure):
    _fields_ = (
        ("map_fd", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),  # also next_key
        ("flags", ctypes.c_uint64),
    )


class _MapBatchAttr(ctypes.Structure):
    _fields_ = (
        ("in_batch", ctypes.c_uint64),
        ("out_batch", ctypes.c_uint64),
        ("keys", ctypes.c_uint64),
        ("values", ctypes.c_uint64),
        ("count", ctypes.c_uint32),
        ("map_fd", ctypes.c_uint32),
        ("elem_flags", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    )


class _ObjAttr(ctypes.Structure):
    _fields_ = (
        ("pathname", ctypes.c_uint64),
        ("bpf_fd", ctypes.c_uint32),
        ("file_flags", ctypes.c_uint32),
    )


class _InfoAttr(ctypes.Structure):
    _fields_ = (
        ("bpf_fd", ctypes.c_uint32),
        ("info_len", ctypes.c_uint32),
        ("info", ctypes.c_uint64),
    )


class _MapInfo(ctypes.Structure):
    _fields_ = (
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
        ("ifindex", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("map_extra", ctypes.c_uint64),
    )


# -- errors ---------------------------------------------------------------------------


class KernelMapError(MapError):
    """A ``bpf()`` call failed; ``errno`` is the kernel's answer (0: a userspace check)."""

    def __init__(self, message: str, err: int = 0) -> None:
        super().__init__(message)
        self.errno = err


class MapFullError(KernelMapError):
    """The map has no room (``E2BIG``/``ENOSPC``/``ENOMEM``)."""


class MapPermissionError(KernelMapError):
    """The kernel refused the caller (``EPERM``/``EACCES``)."""


class MapUnsupportedError(KernelMapError):
    """The kernel does not do this for this map type (``EINVAL``/``ENOTSUPP``/...)."""


class MapNotFoundError(KernelMapError):
    """No pinned object at the path, or no such key (``ENOENT``)."""


class MapMismatchError(KernelMapError):
    """A pinned map exists but has another type or layout than wanted."""


def _strerror(err: int) -> str:
    return "Operation not supported" if err == ENOTSUPP else os.strerror(err)


def errno_name(err: int) -> str:
    if err == ENOTSUPP:
        return "ENOTSUPP"
    return errno.errorcode.get(err, f"errno {err}")


def _error_class(err: int) -> type[KernelMapError]:
    if err in (errno.E2BIG, errno.ENOSPC, errno.ENOMEM):
        return MapFullError
    if err in (errno.EPERM, errno.EACCES):
        return MapPermissionError
    if err in _NO_BATCH_ERRNOS:
        return MapUnsupportedError
    if err == errno.ENOENT:
        return MapNotFoundError
    return KernelMapError


def _error(cmd: int, err: int, what: str) -> KernelMapError:
    msg = f"bpf({_CMD_NAMES.get(cmd, str(cmd))}) {what}: {errno_name(err)} ({_strerror(err)})"
    return _error_class(err)(msg, err)


# -- the syscall ----------------------------------------------------------------------

_libc: ctypes.CDLL | None = None


def _syscall_nr() -> int:
    machine = platform.machine()
    nr = _SYSCALL_NR.get(machine)
    if nr is None:
        raise MapUnsupportedError(f"bpf(): no syscall number known for {machine}")
    return nr


def _get_libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.syscall.restype = ctypes.c_long
        lib.mount.argtypes = (
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_ulong,
            ctypes.c_void_p,
        )
        lib.mount.restype = ctypes.c_int
        _libc = lib
    return _libc


def bpf(cmd: int, attr: ctypes.Structure) -> tuple[int, int]:
    """One ``bpf(cmd, &attr, sizeof attr)`` call: (return value, errno); -1 on failure."""
    libc = _get_libc()
    ctypes.set_errno(0)
    ret = int(
        libc.syscall(
            ctypes.c_long(_syscall_nr()),
            ctypes.c_int(cmd),
            ctypes.byref(attr),
            ctypes.c_uint(ctypes.sizeof(attr)),
        )
    )
    return ret, (ctypes.get_errno() if ret < 0 else 0)


def _addr(buf: ctypes.Array[ctypes.c_char] | None) -> int:
    return ctypes.addressof(buf) if buf is not None else 0


def possible_cpus() -> int:
    """CPUs the kernel may bring up (``/sys/devices/system/cpu/possible``: "0-3,5")."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += (int(hi) - int(lo) + 1) if hi else 1
    return count


def _round8(n: int) -> int:
    return (n + 7) & ~7


# -- the map --------------------------------------------------------------------------


class KernelMap(SizedMap):
    """A kernel BPF map behind the :class:`~controlplane.datapath.maps.Map` Protocol."""

    _error = KernelMapError
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
        self.percpu = map_type in _PERCPU_TYPES
        self.ncpus = possible_cpus() if self.percpu else 1
        self._slot = _round8(value_size) if self.percpu else value_size
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
        if not _NAME_RE.match(name):
            raise KernelMapError(f"map name {name!r}: at most 15 of [A-Za-z0-9_.]")
        if map_type == BPF_MAP_TYPE_LPM_TRIE:
            flags |= BPF_F_NO_PREALLOC
        attr = _MapCreateAttr(
            map_type=map_type,
            key_size=key_size,
            value_size=value_size,
            max_entries=max_entries,
            map_flags=flags,
            map_name=name.encode(),
        )
        fd, err = bpf(BPF_MAP_CREATE, attr)
        if fd < 0:
            raise _error(BPF_MAP_CREATE, err, f"creating map {name} (type {map_type})")
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
        fd, err = bpf(BPF_OBJ_GET, _ObjAttr(pathname=ctypes.addressof(cpath)))
        if fd < 0:
            raise _error(BPF_OBJ_GET, err, f"opening {os.fspath(path)}")
        try:
            info = _map_info(fd)
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
        ret, err = bpf(BPF_OBJ_PIN, _ObjAttr(pathname=ctypes.addressof(cpath), bpf_fd=self.fd))
        if ret < 0:
            raise _error(BPF_OBJ_PIN, err, f"pinning map {self._name} at {os.fspath(path)}")

    def info(self) -> dict[str, int | str]:
        """What the kernel says about the map (``BPF_OBJ_GET_INFO_BY_FD``)."""
        info = _map_info(self.fd)
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
        attr = _MapElemAttr(map_fd=self.fd, key=_addr(kbuf), value=_addr(vbuf), flags=flags)
        ret, err = bpf(BPF_MAP_UPDATE_ELEM, attr)
        if ret < 0:
            raise _error(BPF_MAP_UPDATE_ELEM, err, f"on map {self._name}")

    def delete(self, key: bytes) -> bool:
        self._check_key(key)
        kbuf = ctypes.create_string_buffer(key, len(key))
        ret, err = bpf(BPF_MAP_DELETE_ELEM, _MapElemAttr(map_fd=self.fd, key=_addr(kbuf)))
        if ret < 0:
            if err == errno.ENOENT:
                return False
            raise _error(BPF_MAP_DELETE_ELEM, err, f"on map {self._name}")
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
        chunk = max(1, min(self.max_entries, _DUMP_CHUNK))
        keys = ctypes.create_string_buffer(ks * chunk)
        values = ctypes.create_string_buffer(vs * chunk)
        # The resume token is a key for generic batch ops and a bucket index for hashes.
        token_in = ctypes.create_string_buffer(max(ks, 8))
        token_out = ctypes.create_string_buffer(max(ks, 8))
        out: list[tuple[bytes, bytes]] = []
        first = True
        while True:
            attr = _MapBatchAttr(
                in_batch=0 if first else _addr(token_in),
                out_batch=_addr(token_out),
                keys=_addr(keys),
                values=_addr(values),
                count=chunk,
                map_fd=self.fd,
            )
            ret, err = bpf(BPF_MAP_LOOKUP_BATCH, attr)
            if ret < 0 and err != errno.ENOENT:  # ENOENT: the end of the map
                if first and self.batch_lookup_supported is None and err in _NO_BATCH_ERRNOS:
                    self.batch_lookup_supported = False
                    return None
                raise _error(BPF_MAP_LOOKUP_BATCH, err, f"on map {self._name}")
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
            attr = _MapBatchAttr(
                keys=_addr(keys), values=_addr(values), count=len(entries), map_fd=self.fd
            )
            ret, err = bpf(BPF_MAP_UPDATE_BATCH, attr)
            if ret == 0:
                self.batch_update_supported = True
                return len(entries)
            if not (self.batch_update_supported is None and _no_batch(err, attr.count, entries)):
                raise _error(
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
            attr = _MapBatchAttr(keys=_addr(kbuf), count=len(rest), map_fd=self.fd)
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
            if self.batch_delete_supported is None and _no_batch(err, done, rest):
                self.batch_delete_supported = False
                return removed + sum(self.delete(k) for k in rest)
            raise _error(
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
        attr = _MapElemAttr(map_fd=self.fd, key=_addr(kbuf), value=_addr(vbuf), flags=flags)
        ret, err = bpf(BPF_MAP_UPDATE_ELEM, attr)
        if ret < 0:
            raise _error(BPF_MAP_UPDATE_ELEM, err, f"on map {self._name}")

    # -- internals -------------------------------------------------------------------

    def _lookup_raw(self, key: bytes) -> bytes | None:
        self._check_key(key)
        kbuf = ctypes.create_string_buffer(key, len(key))
        vbuf = ctypes.create_string_buffer(self._buf_size)
        attr = _MapElemAttr(map_fd=self.fd, key=_addr(kbuf), value=_addr(vbuf))
        ret, err = bpf(BPF_MAP_LOOKUP_ELEM, attr)
        if ret < 0:
            if err == errno.ENOENT:
                return None
            raise _error(BPF_MAP_LOOKUP_ELEM, err, f"on map {self._name}")
        return vbuf.raw

    def _next_key(self, key: bytes | None) -> bytes | None:
        kbuf = ctypes.create_string_buffer(key, len(key)) if key is not None else None
        nbuf = ctypes.create_string_buffer(self._key_size)
        attr = _MapElemAttr(map_fd=self.fd, key=_addr(kbuf), value=_addr(nbuf))
        ret, err = bpf(BPF_MAP_GET_NEXT_KEY, attr)
        if ret < 0:
            if err == errno.ENOENT:
                return None
            raise _error(BPF_MAP_GET_NEXT_KEY, err, f"on map {self._name}")
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


def _no_batch(err: int, count: int, elements: Sequence[object]) -> bool:
    """Whether a failed batch call means "no batch op for this map type": ``ENOTSUPP``
    (no handler: the count is left as passed), or ``EINVAL`` before any element."""
    if err in (ENOTSUPP, errno.EOPNOTSUPP):
        return True
    return err == errno.EINVAL and count in (0, len(elements))


def _map_info(fd: int) -> _MapInfo:
    info = _MapInfo()
    attr = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    ret, err = bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    if ret < 0:
        raise _error(BPF_OBJ_GET_INFO_BY_FD, err, f"on fd {fd}")
    return info


# -- bpffs ----------------------------------------------------------------------------


def bpffs_mounted(path: str = BPFFS_ROOT) -> bool:
    """Whether a bpf filesystem is mounted exactly at ``path``."""
    want = os.path.realpath(path)
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        fstype = line.split(" - ", 1)[1].split()[0]
        mountpoint = fields[4].replace("\\040", " ")
        if fstype == "bpf" and mountpoint == want:
            return True
    return False


def ensure_bpffs(path: str = BPFFS_ROOT) -> None:
    """Mount a bpf filesystem at ``path`` unless one is mounted there already."""
    if bpffs_mounted(path):
        return
    os.makedirs(path, exist_ok=True)
    libc = _get_libc()
    ctypes.set_errno(0)
    if libc.mount(b"bpf", os.fsencode(path), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        msg = f"mount -t bpf bpf {path}: {errno_name(err)} ({_strerror(err)})"
        raise _error_class(err)(msg, err)


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
