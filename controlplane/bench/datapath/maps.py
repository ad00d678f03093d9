"""The datapath benchmark's ipcache maps: a fresh kernel LPM trie or userspace map per
measurement, a sync timed into one, and the check of its entry count."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from controlplane.bench.common import BenchError
from controlplane.datapath.bpf_syscall import BPF_MAP_TYPE_LPM_TRIE
from controlplane.datapath.capabilities import detect_datapath
from controlplane.datapath.ipcache import (
    IPCACHE_MAP_NAME,
    IPCACHE_MAX_ENTRIES,
    KEY_SIZE,
    VALUE_SIZE,
    Ipcache,
    userspace_ipcache,
)
from controlplane.datapath.kernel import KernelMap

R = TypeVar("R")


class _Datapath:
    """Fresh ipcache maps of one kind: kernel LPM tries (unpinned) or userspace."""

    def __init__(self, want_kernel: bool | None) -> None:
        support = detect_datapath()
        self.kernel = support.kernel and want_kernel is not False
        self.reason = "--userspace" if want_kernel is False else support.reason

    def new(self) -> Ipcache:
        if not self.kernel:
            return userspace_ipcache()
        kmap = KernelMap.create(
            IPCACHE_MAP_NAME, BPF_MAP_TYPE_LPM_TRIE, KEY_SIZE, VALUE_SIZE, IPCACHE_MAX_ENTRIES
        )
        return Ipcache(kmap)

    @staticmethod
    def close(ipcache: Ipcache) -> None:
        if isinstance(ipcache.map, KernelMap):
            ipcache.map.close()


async def _sync_rate(
    datapath: _Datapath, sync: Callable[[Ipcache], Awaitable[R]], count: int, what: str
) -> tuple[float, R]:
    """Run ``sync`` into a fresh map: (entries per second, what it returned). The clock
    stops before the map is counted (counting reads the whole map back)."""
    ipcache = datapath.new()
    try:
        started = time.perf_counter()
        result = await sync(ipcache)
        seconds = time.perf_counter() - started
        got = len(ipcache)
    finally:
        datapath.close(ipcache)
    _check(got, count, what)
    return got / seconds, result


def _kind(datapath: _Datapath) -> str:
    return "kernel" if datapath.kernel else "userspace"


def _check(got: int, want: int, what: str) -> None:
    if got != want:
        raise BenchError(f"{what}: {got} entries, expected {want}")
