"""The raw ``bpf()`` syscall through ctypes: command and map-type numbers, the ``union
bpf_attr`` layouts of the commands we use, errors by errno, and the bpf filesystem.

Only the layouts of the commands used by :mod:`controlplane.datapath.kernel` are mirrored
(the kernel zero-fills the rest of the union). Errors are :class:`KernelMapError`
subclasses chosen by errno, with the command and the kernel's answer in the message.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from controlplane.datapath.maps import MapError

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

SYSCALL_NR: Final = {"x86_64": 321, "aarch64": 280, "arm64": 280}
PERCPU_TYPES: Final = frozenset({BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY})
ARRAY_TYPES: Final = frozenset({BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_PERCPU_ARRAY})
NO_BATCH_ERRNOS: Final = frozenset({errno.EINVAL, errno.EOPNOTSUPP, ENOTSUPP})
NAME_RE: Final = re.compile(r"^[A-Za-z0-9_.]{0,15}$")
DUMP_CHUNK: Final = 4096
"""Entries per ``BPF_MAP_LOOKUP_BATCH`` call when reading a whole map."""

CMD_NAMES: Final = {
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


class MapCreateAttr(ctypes.Structure):
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


class MapElemAttr(ctypes.Structure):
    _fields_ = (
        ("map_fd", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),  # also next_key
        ("flags", ctypes.c_uint64),
    )


class MapBatchAttr(ctypes.Structure):
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


class ObjAttr(ctypes.Structure):
    _fields_ = (
        ("pathname", ctypes.c_uint64),
        ("bpf_fd", ctypes.c_uint32),
        ("file_flags", ctypes.c_uint32),
    )


class InfoAttr(ctypes.Structure):
    _fields_ = (
        ("bpf_fd", ctypes.c_uint32),
        ("info_len", ctypes.c_uint32),
        ("info", ctypes.c_uint64),
    )


class MapInfo(ctypes.Structure):
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


def strerror(err: int) -> str:
    return "Operation not supported" if err == ENOTSUPP else os.strerror(err)


def errno_name(err: int) -> str:
    if err == ENOTSUPP:
        return "ENOTSUPP"
    return errno.errorcode.get(err, f"errno {err}")


def error_class(err: int) -> type[KernelMapError]:
    if err in (errno.E2BIG, errno.ENOSPC, errno.ENOMEM):
        return MapFullError
    if err in (errno.EPERM, errno.EACCES):
        return MapPermissionError
    if err in NO_BATCH_ERRNOS:
        return MapUnsupportedError
    if err == errno.ENOENT:
        return MapNotFoundError
    return KernelMapError


def bpf_error(cmd: int, err: int, what: str) -> KernelMapError:
    msg = f"bpf({CMD_NAMES.get(cmd, str(cmd))}) {what}: {errno_name(err)} ({strerror(err)})"
    return error_class(err)(msg, err)


# -- the syscall ----------------------------------------------------------------------

_libc: ctypes.CDLL | None = None


def syscall_nr() -> int:
    machine = platform.machine()
    nr = SYSCALL_NR.get(machine)
    if nr is None:
        raise MapUnsupportedError(f"bpf(): no syscall number known for {machine}")
    return nr


def get_libc() -> ctypes.CDLL:
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
    libc = get_libc()
    ctypes.set_errno(0)
    ret = int(
        libc.syscall(
            ctypes.c_long(syscall_nr()),
            ctypes.c_int(cmd),
            ctypes.byref(attr),
            ctypes.c_uint(ctypes.sizeof(attr)),
        )
    )
    return ret, (ctypes.get_errno() if ret < 0 else 0)


def addr(buf: ctypes.Array[ctypes.c_char] | None) -> int:
    return ctypes.addressof(buf) if buf is not None else 0


def possible_cpus() -> int:
    """CPUs the kernel may bring up (``/sys/devices/system/cpu/possible``: "0-3,5")."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += (int(hi) - int(lo) + 1) if hi else 1
    return count


def round8(n: int) -> int:
    return (n + 7) & ~7


def no_batch(err: int, count: int, elements: Sequence[object]) -> bool:
    """Whether a failed batch call means "no batch op for this map type": ``ENOTSUPP``
    (no handler: the count is left as passed), or ``EINVAL`` before any element."""
    if err in (ENOTSUPP, errno.EOPNOTSUPP):
        return True
    return err == errno.EINVAL and count in (0, len(elements))


def map_info(fd: int) -> MapInfo:
    info = MapInfo()
    attr = InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    ret, err = bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    if ret < 0:
        raise bpf_error(BPF_OBJ_GET_INFO_BY_FD, err, f"on fd {fd}")
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
    libc = get_libc()
    ctypes.set_errno(0)
    if libc.mount(b"bpf", os.fsencode(path), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        msg = f"mount -t bpf bpf {path}: {errno_name(err)} ({strerror(err)})"
        raise error_class(err)(msg, err)
