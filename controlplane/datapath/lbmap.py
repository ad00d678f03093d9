"""The socket load balancer's maps (``bpf/cp_lb.h``): layouts and :class:`LbMaps`.

:class:`LbMaps` takes the whole desired state (frontend ``(vip, port, proto)`` -> ordered
backends ``(ip, port)``) and makes ``cp_lb_services`` and ``cp_lb_slots`` equal to it by
mark-and-sweep against what the maps hold: nothing is ever flushed, unchanged frontends
are not rewritten, and every change is ordered so that the program never sees a
half-written backend set:

1. the new backend sets, each under its frontend's next revision (new slots, batched);
2. the frontends' entries, each flipped to its new revision and count in one update
   (batched; a new frontend appears only once its slots are in);
3. the stale frontends, then every slot no current revision uses (batched deletes).

Frontend ids (the program's counter index) are kept while a frontend lives; a new one
gets the lowest id no entry uses, with its counters zeroed. A new process adopts the ids
and revisions it finds in pinned maps, so a restart rewrites nothing that is still right.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Final, NamedTuple

from controlplane.datapath.bpf_syscall import (
    BPF_F_NO_PREALLOC,
    BPF_MAP_TYPE_HASH,
    BPF_MAP_TYPE_PERCPU_ARRAY,
    ensure_bpffs,
)
from controlplane.datapath.kernel import KernelMap, pinned_map
from controlplane.datapath.maps import (
    Map,
    MapError,
    UserspaceMap,
    delete_in_batches,
    update_in_batches,
)

log = logging.getLogger(__name__)

__all__ = [
    "LB_METRICS_MAP_NAME",
    "LB_REVNAT_MAP_NAME",
    "LB_SERVICES_MAP_NAME",
    "LB_SLOTS_MAP_NAME",
    "BackendAddr",
    "FrontendAddr",
    "LbBackend",
    "LbCounters",
    "LbEntry",
    "LbMaps",
    "LbMetricsValue",
    "LbRevnatKey",
    "LbRevnatValue",
    "LbServiceKey",
    "LbServiceValue",
    "LbSlotKey",
    "close_lb_maps",
    "lb_entries",
    "pinned_lb_maps",
    "read_counters",
    "unpin_lb_maps",
    "userspace_lb_maps",
]

LB_SERVICES_MAP_NAME: Final = "cp_lb_services"
LB_SLOTS_MAP_NAME: Final = "cp_lb_slots"
LB_REVNAT_MAP_NAME: Final = "cp_lb_revnat"
LB_METRICS_MAP_NAME: Final = "cp_lb_metrics"
LB_SERVICES_MAX_ENTRIES: Final = 16 * 1024
LB_SLOTS_MAX_ENTRIES: Final = 256 * 1024
LB_METRICS_MAX_ENTRIES: Final = 16 * 1024
"""Also the frontend id limit: ids are 1..LB_METRICS_MAX_ENTRIES-1."""


class LbServiceKey(ctypes.Structure):
    _fields_ = (
        ("vip", ctypes.c_uint8 * 4),
        ("dport", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
    )


class LbServiceValue(ctypes.Structure):
    _fields_ = (
        ("frontend_id", ctypes.c_uint32),
        ("revision", ctypes.c_uint32),
        ("count", ctypes.c_uint16),
        ("flags", ctypes.c_uint16),
    )


class LbSlotKey(ctypes.Structure):
    _fields_ = (
        ("frontend_id", ctypes.c_uint32),
        ("revision", ctypes.c_uint32),
        ("slot", ctypes.c_uint32),
    )


class LbBackend(ctypes.Structure):
    _fields_ = (
        ("addr", ctypes.c_uint8 * 4),
        ("port", ctypes.c_uint16),
        ("pad", ctypes.c_uint8 * 2),
    )


class LbRevnatKey(ctypes.Structure):
    _fields_ = (
        ("cookie", ctypes.c_uint64),
        ("addr", ctypes.c_uint8 * 4),
        ("port", ctypes.c_uint16),
        ("pad", ctypes.c_uint8 * 2),
    )


class LbRevnatValue(ctypes.Structure):
    _fields_ = (("vip", ctypes.c_uint8 * 4), ("port", ctypes.c_uint16), ("pad", ctypes.c_uint8 * 2))


class LbMetricsValue(ctypes.Structure):
    _fields_ = (
        ("connects", ctypes.c_uint64),
        ("datagrams", ctypes.c_uint64),
        ("refused", ctypes.c_uint64),
        ("slot_misses", ctypes.c_uint64),
    )


_SERVICE_SIZES: Final = (ctypes.sizeof(LbServiceKey), ctypes.sizeof(LbServiceValue))
_SLOT_SIZES: Final = (ctypes.sizeof(LbSlotKey), ctypes.sizeof(LbBackend))
assert _SERVICE_SIZES == (8, 12) and _SLOT_SIZES == (12, 8)
assert ctypes.sizeof(LbRevnatKey) == 16 and ctypes.sizeof(LbRevnatValue) == 8
assert ctypes.sizeof(LbMetricsValue) == 32


class FrontendAddr(NamedTuple):
    """A service frontend as the datapath sees it: VIP, port, IP protocol number."""

    vip: IPv4Address
    port: int
    proto: int


class BackendAddr(NamedTuple):
    ip: IPv4Address
    port: int


def _service_key(fe: FrontendAddr) -> bytes:
    return bytes(LbServiceKey((ctypes.c_uint8 * 4)(*fe.vip.packed), fe.port, fe.proto, 0))


def _slot_key(frontend_id: int, revision: int, slot: int) -> bytes:
    return bytes(LbSlotKey(frontend_id, revision, slot))


def _backend(be: BackendAddr) -> bytes:
    return bytes(LbBackend((ctypes.c_uint8 * 4)(*be.ip.packed), be.port))


def _decode_frontend(key: bytes) -> FrontendAddr:
    k = LbServiceKey.from_buffer_copy(key)
    return FrontendAddr(IPv4Address(bytes(k.vip)), k.dport, k.proto)


def _decode_backend(value: bytes) -> BackendAddr:
    v = LbBackend.from_buffer_copy(value)
    return BackendAddr(IPv4Address(bytes(v.addr)), v.port)


@dataclass(slots=True)
class LbMapStats:
    syncs: int = 0
    updates: int = 0
    deletes: int = 0
    unchanged: int = 0
    """Frontends whose entry and backend set were already right (not rewritten)."""
    flips: int = 0
    """Frontends switched to a new backend set (or created)."""
    errors: int = 0


@dataclass(frozen=True, slots=True)
class LbCounters:
    connects: int
    datagrams: int
    refused: int
    slot_misses: int


@dataclass(frozen=True, slots=True)
class LbEntry:
    """One frontend as the maps hold it (``cpctl bpf lb list``)."""

    frontend: FrontendAddr
    frontend_id: int
    revision: int
    backends: tuple[BackendAddr | None, ...]
    """The current set's slots in order (None: a slot missing from the map)."""


class _Entry(NamedTuple):
    """A ``cp_lb_services`` value, decoded."""

    frontend_id: int
    revision: int
    backends: int
    """How many slots the current set has (the map's ``count``)."""
    flags: int

    @classmethod
    def decode(cls, raw: bytes) -> _Entry:
        v = LbServiceValue.from_buffer_copy(raw)
        return cls(v.frontend_id, v.revision, v.count, v.flags)

    def encode(self) -> bytes:
        return bytes(LbServiceValue(*self))


class LbMaps:
    """The node's service and backend-slot maps (see the module docstring); ``metrics``
    is the program's per-CPU counter array (kernel mode only).

    :meth:`sync` takes the whole desired state (a mark-and-sweep: what is not in it goes);
    :meth:`update` only the frontends that changed. Both compare with a shadow of the
    maps, read from the kernel by the first call (adoption) and kept by our own writes
    (the agent is the maps' only writer); a failed write drops it, so the next call reads
    the maps again."""

    def __init__(
        self, services: Map, slots: Map, metrics: KernelMap | None = None, *, batch_size: int = 1024
    ) -> None:
        if (services.key_size, services.value_size) != _SERVICE_SIZES:
            raise ValueError(f"map {services.name}: want key/value sizes {_SERVICE_SIZES}")
        if (slots.key_size, slots.value_size) != _SLOT_SIZES:
            raise ValueError(f"map {slots.name}: want key/value sizes {_SLOT_SIZES}")
        self.services = services
        self.slots = slots
        self.metrics = metrics
        self.batch_size = batch_size
        self.stats = LbMapStats()
        self.frontend_ids: dict[FrontendAddr, int] = {}
        """Each frontend's id as of the last successful write."""
        self.last_flipped: list[FrontendAddr] = []
        """The frontends the last successful write created or switched to a new set."""
        self._shadow: tuple[dict[bytes, _Entry], dict[bytes, bytes]] | None = None
        """(frontend entries, slots) as the maps hold them, or None: read them first."""

    def sync(self, desired: Mapping[FrontendAddr, Sequence[BackendAddr]]) -> bool:
        """Make both maps equal ``desired`` (see the module docstring); False when a write
        failed (the maps still hold a consistent older or newer state: retry later)."""
        return self._apply(desired, full=True)

    def update(self, changes: Mapping[FrontendAddr, Sequence[BackendAddr] | None]) -> bool:
        """Set (or, for None, remove) only these frontends, in the same order as
        :meth:`sync`; False when a write failed."""
        return self._apply(changes, full=False)

    def _apply(
        self, desired: Mapping[FrontendAddr, Sequence[BackendAddr] | None], *, full: bool
    ) -> bool:
        self.stats.syncs += 1
        if self._shadow is None:
            entries = {k: _Entry.decode(v) for k, v in self.services.items()}
            self._shadow = (entries, dict(self.slots.items()))
        have, have_slots = self._shadow
        used: set[int] | None = None  # frontend ids in use: computed when one is needed
        next_id = 1
        new_slots: list[tuple[bytes, bytes]] = []
        flips: list[tuple[bytes, _Entry]] = []
        flipped: list[FrontendAddr] = []
        fresh_ids: list[int] = []
        keep: set[bytes] = set()
        """Slots the maps keep (full) / keep among the changed frontends' old ones."""
        touched: set[bytes] = set()
        """Frontend keys this call decides about."""
        ids = dict(self.frontend_ids) if not full else {}
        removed: list[FrontendAddr] = []
        for fe, backends in desired.items():
            key = _service_key(fe)
            touched.add(key)
            cur = have.get(key)
            if backends is None:
                removed.append(fe)
                continue
            want = [_backend(be) for be in backends]
            if cur is not None:
                cur_keys = [
                    _slot_key(cur.frontend_id, cur.revision, i) for i in range(cur.backends)
                ]
                if [have_slots.get(k) for k in cur_keys] == want and cur.flags == 0:
                    self.stats.unchanged += 1
                    keep.update(cur_keys)
                    ids[fe] = cur.frontend_id
                    continue
                fid, revision = cur.frontend_id, (cur.revision + 1) & 0xFFFFFFFF or 1
            else:
                if used is None:
                    used = {entry.frontend_id for entry in have.values()}
                while next_id in used:
                    next_id += 1
                if next_id >= LB_METRICS_MAX_ENTRIES:
                    log.error("no free load-balancer frontend id for %s (too many)", fe)
                    self.stats.errors += 1
                    touched.discard(key)
                    continue
                fid, revision = next_id, 1
                used.add(fid)
                fresh_ids.append(fid)
            for slot, value in enumerate(want):
                skey = _slot_key(fid, revision, slot)
                keep.add(skey)
                new_slots.append((skey, value))
            flips.append((key, _Entry(fid, revision, len(want), 0)))
            flipped.append(fe)
            ids[fe] = fid
        if full:
            stale = [k for k in have if k not in touched]
            stale_slots = [k for k in have_slots if k not in keep]
            for key in stale:
                ids.pop(_decode_frontend(key), None)
        else:
            stale = [_service_key(fe) for fe in removed if _service_key(fe) in have]
            # the old sets of the frontends changed or removed here
            stale_slots = [
                k
                for key in touched
                if (cur := have.get(key)) is not None
                for k in (_slot_key(cur.frontend_id, cur.revision, i) for i in range(cur.backends))
                if k not in keep and k in have_slots
            ]
            for fe in removed:
                ids.pop(fe, None)
        try:
            for fid in fresh_ids:
                self._zero_counters(fid)
            self._update(self.slots, new_slots)
            self._update(self.services, [(key, entry.encode()) for key, entry in flips])
            self._delete(self.services, stale)
            self._delete(self.slots, stale_slots)
        except MapError as exc:
            self.stats.errors += 1
            self._shadow = None  # read the maps again next time
            log.warning("load-balancer map write failed: %s", exc)
            return False
        have_slots.update(new_slots)
        have.update(flips)
        for key in stale:
            del have[key]
        for key in stale_slots:
            del have_slots[key]
        self.stats.flips += len(flips)
        self.frontend_ids = ids
        self.last_flipped = flipped
        return True

    def entries(self) -> list[LbEntry]:
        return lb_entries(self.services, self.slots)

    def counters(self, frontend_id: int) -> LbCounters | None:
        """The program's counters of one frontend id, summed over CPUs (kernel mode)."""
        if self.metrics is None:
            return None
        return read_counters(self.metrics, frontend_id)

    def _zero_counters(self, frontend_id: int) -> None:
        if self.metrics is not None:
            zero = bytes(ctypes.sizeof(LbMetricsValue))
            self.metrics.update_percpu(
                frontend_id.to_bytes(4, "little"), [zero] * self.metrics.ncpus
            )

    def _update(self, map_: Map, entries: list[tuple[bytes, bytes]]) -> None:
        self.stats.updates += update_in_batches(map_, entries, self.batch_size)

    def _delete(self, map_: Map, keys: list[bytes]) -> None:
        self.stats.deletes += delete_in_batches(map_, keys, self.batch_size)


def read_counters(metrics: KernelMap, frontend_id: int) -> LbCounters | None:
    values = metrics.lookup_percpu(frontend_id.to_bytes(4, "little"))
    if values is None:
        return None
    total = [0, 0, 0, 0]
    for raw in values:
        v = LbMetricsValue.from_buffer_copy(raw)
        for i, n in enumerate((v.connects, v.datagrams, v.refused, v.slot_misses)):
            total[i] += n
    return LbCounters(*total)


def lb_entries(services: Map, slots: Map) -> list[LbEntry]:
    """Every frontend the maps hold with its current backend set, sorted."""
    slot_values = dict(slots.items())
    out = []
    for key, value in services.items():
        v = LbServiceValue.from_buffer_copy(value)
        backends = tuple(
            None if raw is None else _decode_backend(raw)
            for raw in (
                slot_values.get(_slot_key(v.frontend_id, v.revision, i)) for i in range(v.count)
            )
        )
        out.append(LbEntry(_decode_frontend(key), v.frontend_id, v.revision, backends))
    out.sort(key=lambda e: e.frontend)
    return out


def userspace_lb_maps() -> LbMaps:
    return LbMaps(
        UserspaceMap(LB_SERVICES_MAP_NAME, *_SERVICE_SIZES, LB_SERVICES_MAX_ENTRIES),
        UserspaceMap(LB_SLOTS_MAP_NAME, *_SLOT_SIZES, LB_SLOTS_MAX_ENTRIES),
    )


def pinned_lb_maps(pin_dir: Path) -> LbMaps:
    """``cp_lb_services``, ``cp_lb_slots`` and ``cp_lb_metrics`` pinned under ``pin_dir``."""
    ensure_bpffs()
    directory = pin_dir.absolute()
    os.makedirs(directory, exist_ok=True)
    specs = (
        (LB_SERVICES_MAP_NAME, BPF_MAP_TYPE_HASH, _SERVICE_SIZES, LB_SERVICES_MAX_ENTRIES,
         BPF_F_NO_PREALLOC),
        (LB_SLOTS_MAP_NAME, BPF_MAP_TYPE_HASH, _SLOT_SIZES, LB_SLOTS_MAX_ENTRIES, 0),
        (LB_METRICS_MAP_NAME, BPF_MAP_TYPE_PERCPU_ARRAY, (4, ctypes.sizeof(LbMetricsValue)),
         LB_METRICS_MAX_ENTRIES, 0),
    )  # fmt: skip
    opened: list[KernelMap] = []
    try:
        for name, map_type, sizes, max_entries, flags in specs:
            opened.append(pinned_map(directory, name, map_type, sizes, max_entries, flags))
    except BaseException:
        for kmap in opened:
            kmap.close()
        raise
    return LbMaps(opened[0], opened[1], opened[2])


def close_lb_maps(maps: LbMaps) -> None:
    for map_ in (maps.services, maps.slots, maps.metrics):
        if isinstance(map_, KernelMap):
            map_.close()


def unpin_lb_maps(pin_dir: Path) -> int:
    """``--cleanup-on-exit``: remove the load balancer's map pins; how many were removed."""
    removed = 0
    for name in (LB_SERVICES_MAP_NAME, LB_SLOTS_MAP_NAME, LB_METRICS_MAP_NAME, LB_REVNAT_MAP_NAME):
        try:
            (pin_dir / name).unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed
