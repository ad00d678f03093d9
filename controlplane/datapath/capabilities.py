"""Can this process drive kernel eBPF maps, or must the agent use userspace maps?

:func:`detect_datapath` answers with a one-line reason either way. It is cheap and has no
side effect apart from creating and closing one tiny hash map: it does not mount bpffs,
it only checks that one is mounted or that the kernel offers the filesystem type.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from controlplane.datapath.bpf_syscall import (
    BPF_MAP_TYPE_HASH,
    BPFFS_ROOT,
    KernelMapError,
    bpffs_mounted,
    errno_name,
)
from controlplane.datapath.kernel import KernelMap


@dataclass(frozen=True, slots=True)
class DatapathSupport:
    """Whether the kernel datapath is usable, and why (or why not) in one line."""

    kernel: bool
    reason: str

    def __bool__(self) -> bool:
        return self.kernel


def _bpffs_available(path: str) -> bool:
    if bpffs_mounted(path):
        return True
    try:
        filesystems = Path("/proc/filesystems").read_text().split()
    except OSError:
        return False
    return "bpf" in filesystems


def detect_datapath(bpffs: str = BPFFS_ROOT) -> DatapathSupport:
    """Kernel eBPF is usable iff we are root, ``bpf()`` creates and frees a tiny map, and a
    bpffs is mounted at ``bpffs`` (or could be: the kernel knows the filesystem type)."""
    if os.geteuid() != 0:
        return DatapathSupport(False, "not root")
    try:
        probe = KernelMap.create("cp_probe", BPF_MAP_TYPE_HASH, 4, 4, 1)
    except KernelMapError as exc:
        if exc.errno:
            return DatapathSupport(False, f"bpf() refused: {errno_name(exc.errno)}")
        return DatapathSupport(False, f"bpf() unusable: {exc}")
    except OSError as exc:  # e.g. no /sys/devices/system/cpu/possible
        return DatapathSupport(False, f"bpf() unusable: {exc}")
    try:
        probe.update(b"\0" * 4, b"\0" * 4)
        if not probe.delete(b"\0" * 4):
            return DatapathSupport(False, "bpf() map probe: element vanished")
    except KernelMapError as exc:
        return DatapathSupport(False, f"bpf() map probe failed: {errno_name(exc.errno)}")
    finally:
        probe.close()
    if not _bpffs_available(bpffs):
        return DatapathSupport(False, f"no bpffs at {bpffs} and the kernel has no bpf fs type")
    mounted = "mounted" if bpffs_mounted(bpffs) else "mountable"
    return DatapathSupport(True, f"kernel eBPF maps usable (bpffs {mounted} at {bpffs})")
