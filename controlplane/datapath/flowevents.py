"""The datapath's flow events (issue 14): the maps of ``bpf/cp_maps.h``'s flow section, and
a reader of the ring buffer that needs no thread.

The tc programs write one 64-byte :class:`FlowEvent` per reported packet into the
``cp_flow_events`` ring buffer, aggregated and rate limited as ``cp_flow_config`` says
(:class:`FlowConfig`; all zero = off, the state before an agent configured it). What the
kernel could not deliver is counted in ``cp_flow_lost`` per CPU and reason
(:class:`LostReason`): a loss is never silent.

:class:`RingBufferReader` maps the ring buffer as libbpf does (the consumer page read-write
at offset 0; the producer page and the data area, mapped twice so that a record that wraps
is contiguous, read-only after it) and consumes records in the caller's thread. Its
:meth:`~RingBufferReader.fileno` is the map's fd, which polls readable while records wait:
an asyncio loop watches it with ``add_reader`` (level-triggered epoll), so nothing spins.

:func:`pinned_flow_maps` opens the maps an agent uses (or creates and pins them exactly as
the object declares them, so a program loaded later reuses them).
"""

from __future__ import annotations

import ctypes
import enum
import mmap
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from controlplane.datapath.bpf_syscall import (
    BPF_MAP_TYPE_ARRAY,
    BPF_MAP_TYPE_PERCPU_ARRAY,
    MapMismatchError,
    ensure_bpffs,
)
from controlplane.datapath.kernel import KernelMap

__all__ = [
    "BPF_MAP_TYPE_RINGBUF",
    "FLOW_CONFIG_MAP_NAME",
    "FLOW_EVENTS_BYTES",
    "FLOW_EVENTS_MAP_NAME",
    "FLOW_LOST_MAP_NAME",
    "FLOW_LOST_MAX_ENTRIES",
    "FLOW_RATE_MAP_NAME",
    "FLOW_STATE_MAP_NAME",
    "FLOW_STATE_MAX_ENTRIES",
    "Aggregation",
    "FlowConfig",
    "FlowEvent",
    "FlowFlag",
    "FlowKind",
    "FlowMaps",
    "FlowRate",
    "FlowState",
    "FlowType",
    "LostReason",
    "RingBufferReader",
    "decode_event",
    "pinned_flow_maps",
]

BPF_MAP_TYPE_RINGBUF: Final = 27

FLOW_EVENTS_MAP_NAME: Final = "cp_flow_events"
FLOW_CONFIG_MAP_NAME: Final = "cp_flow_config"
FLOW_LOST_MAP_NAME: Final = "cp_flow_lost"
FLOW_STATE_MAP_NAME: Final = "cp_flow_state"
FLOW_RATE_MAP_NAME: Final = "cp_flow_rate"
FLOW_EVENTS_BYTES: Final = 4 * 1024 * 1024
FLOW_STATE_MAX_ENTRIES: Final = 64 * 1024
FLOW_LOST_MAX_ENTRIES: Final = 4


class Aggregation(enum.IntEnum):
    """``enum cp_flow_aggregation``."""

    OFF = 0
    NONE = 1
    MEDIUM = 2


class FlowType(enum.IntEnum):
    """``enum cp_flow_type``: Cilium's monitor message types."""

    DROP = 1
    TRACE = 4
    POLICY_VERDICT = 5


class FlowFlag(enum.IntFlag):
    """``CP_FLOW_F_*``."""

    TO_ENDPOINT = 0x01
    REPLY = 0x02
    NEW = 0x04
    CLOSE = 0x08
    IDENTITY = 0x10


class FlowKind(enum.IntEnum):
    """``CP_FLOW_KIND_*`` (the program's ``enum flow_kind``)."""

    OTHER = 0
    PORTS = 1
    ECHO_REQUEST = 2
    ECHO_REPLY = 3
    ND = 4


class LostReason(enum.IntEnum):
    """``enum cp_flow_lost_reason``: the index into ``cp_flow_lost``."""

    RINGBUF_FULL = 0
    RATE_LIMIT = 1


class FlowConfig(ctypes.Structure):
    _fields_ = (
        ("aggregation", ctypes.c_uint32),
        ("rate_per_sec", ctypes.c_uint32),
        ("burst", ctypes.c_uint32),
        ("report_interval_s", ctypes.c_uint32),
    )


class FlowEvent(ctypes.Structure):
    _fields_ = (
        ("ktime_ns", ctypes.c_uint64),
        ("src", ctypes.c_uint8 * 16),
        ("dst", ctypes.c_uint8 * 16),
        ("endpoint_id", ctypes.c_uint32),
        ("identity", ctypes.c_uint32),
        ("len", ctypes.c_uint32),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("type", ctypes.c_uint8),
        ("reason", ctypes.c_uint8),
        ("tcp_flags", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("kind", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 2),
    )


class FlowState(ctypes.Structure):
    _fields_ = (
        ("last_report_ns", ctypes.c_uint64),
        ("flags_to", ctypes.c_uint8),
        ("flags_from", ctypes.c_uint8),
        ("origin", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 5),
    )


class FlowRate(ctypes.Structure):
    _fields_ = (("tokens", ctypes.c_uint64), ("last_ns", ctypes.c_uint64))


assert ctypes.sizeof(FlowEvent) == 64 and ctypes.sizeof(FlowConfig) == 16
assert ctypes.sizeof(FlowState) == 16 and ctypes.sizeof(FlowRate) == 16

# The same record as one struct.unpack_from (faster than ctypes per event).
_EVENT: Final = struct.Struct("<Q16s16sIIIHHBBBBBB2x")
assert _EVENT.size == ctypes.sizeof(FlowEvent)


@dataclass(frozen=True, slots=True)
class RawFlow:
    """One decoded :class:`FlowEvent`; addresses as 16 bytes (IPv4-mapped for IPv4)."""

    ktime_ns: int
    src: bytes
    dst: bytes
    endpoint_id: int
    identity: int
    length: int
    sport: int
    dport: int
    proto: int
    type: int
    reason: int
    tcp_flags: int
    flags: int
    kind: int


def decode_event(buf: bytes | memoryview | mmap.mmap, offset: int = 0) -> RawFlow:
    """The :class:`FlowEvent` at ``offset`` of ``buf``."""
    return RawFlow(*_EVENT.unpack_from(buf, offset))


# -- the ring buffer --------------------------------------------------------------------

_BUSY: Final = 1 << 31
_DISCARD: Final = 1 << 30
_HDR: Final = 8
_U32: Final = struct.Struct("<I")
_U64: Final = struct.Struct("<Q")


class RingBufferReader:
    """Consumes a ``BPF_MAP_TYPE_RINGBUF`` map: ``drain`` hands each record to a callback.

    Not thread-safe (one consumer). Records are read in place from the shared mapping,
    and the consumer position is published after each batch, as libbpf does.
    """

    def __init__(self, kmap: KernelMap) -> None:
        if kmap.map_type != BPF_MAP_TYPE_RINGBUF:
            raise MapMismatchError(f"{kmap.name}: type {kmap.map_type}, not a ring buffer")
        self.map = kmap
        self.size = kmap.max_entries
        self._mask = self.size - 1
        page = mmap.PAGESIZE
        self._page = page
        self._consumer = mmap.mmap(kmap.fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            self._producer = mmap.mmap(
                kmap.fd, page + 2 * self.size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page
            )
        except BaseException:
            self._consumer.close()
            raise

    def fileno(self) -> int:
        """The map's fd: readable (epoll/poll) while records wait."""
        return self.map.fd

    def pending_bytes(self) -> int:
        """Bytes between the consumer and the producer positions."""
        return int(_U64.unpack_from(self._producer, 0)[0] - _U64.unpack_from(self._consumer, 0)[0])

    def drain(self, handle: Callable[[memoryview], None], limit: int = 1 << 30) -> int:
        """Hand up to ``limit`` records to ``handle`` (a view valid only during the call);
        returns how many. Stops early at a record still being written."""
        prod_map, cons_map = self._producer, self._consumer
        cons = _U64.unpack_from(cons_map, 0)[0]
        prod = _U64.unpack_from(prod_map, 0)[0]
        data = memoryview(prod_map)
        base, mask = self._page, self._mask
        count = 0
        try:
            while cons < prod and count < limit:
                off = base + (cons & mask)
                header = _U32.unpack_from(prod_map, off)[0]
                if header & _BUSY:
                    break
                length = header & ~(_BUSY | _DISCARD)
                if not header & _DISCARD:
                    handle(data[off + _HDR : off + _HDR + length])
                    count += 1
                cons += (length + _HDR + 7) & ~7
                if not count & 255:  # let the producer reuse space during a long batch
                    _U64.pack_into(cons_map, 0, cons)
                if cons >= prod:
                    prod = _U64.unpack_from(prod_map, 0)[0]
        finally:
            data.release()
            _U64.pack_into(cons_map, 0, cons)
        return count

    def close(self) -> None:
        self._producer.close()
        self._consumer.close()


# -- the maps ---------------------------------------------------------------------------


def _pinned(
    directory: Path, name: str, map_type: int, key: int, value: int, max_entries: int
) -> KernelMap:
    path = directory / name
    want = (map_type, key, value, max_entries, 0)
    if path.exists():
        kmap = KernelMap.open_pinned(path)
        got = (kmap.map_type, kmap.key_size, kmap.value_size, kmap.max_entries, kmap.flags)
        if got != want:
            kmap.close()
            raise MapMismatchError(
                f"pinned map {path}: (type, key, value, max, flags) {got}, want {want}"
            )
        return kmap
    kmap = KernelMap.create(name, map_type, key, value, max_entries)
    try:
        kmap.pin(os.fspath(path))
    except BaseException:
        kmap.close()
        raise
    return kmap


@dataclass(slots=True)
class FlowMaps:
    """The flow maps an agent uses: the ring buffer, the configuration, the loss counters."""

    events: KernelMap
    config: KernelMap
    lost: KernelMap

    def configure(
        self, aggregation: Aggregation, rate_per_sec: int, burst: int, report_interval_s: int
    ) -> None:
        value = FlowConfig(int(aggregation), rate_per_sec, burst, report_interval_s)
        self.config.update(_U32.pack(0), bytes(value))

    def configuration(self) -> FlowConfig:
        raw = self.config.lookup(_U32.pack(0))
        return FlowConfig.from_buffer_copy(raw) if raw else FlowConfig()

    def lost_counts(self) -> dict[LostReason, int]:
        """Events the kernel could not deliver, by reason, summed over CPUs."""
        out: dict[LostReason, int] = {}
        for reason in LostReason:
            values = self.lost.lookup_percpu(_U32.pack(int(reason)))
            out[reason] = sum(_U64.unpack_from(v, 0)[0] for v in values) if values else 0
        return out

    def close(self) -> None:
        for kmap in (self.events, self.config, self.lost):
            kmap.close()


def pinned_flow_maps(pin_dir: Path) -> FlowMaps:
    """``cp_flow_events``, ``cp_flow_config`` and ``cp_flow_lost`` pinned under
    ``pin_dir``: opened when pinned (their layout must match ``bpf/cp_maps.h``), else
    created and pinned. Raises ``KernelMapError`` or ``OSError``."""
    ensure_bpffs()
    directory = pin_dir.absolute()
    os.makedirs(directory, exist_ok=True)
    opened: list[KernelMap] = []
    try:
        for name, map_type, key, value, max_entries in (
            (FLOW_EVENTS_MAP_NAME, BPF_MAP_TYPE_RINGBUF, 0, 0, FLOW_EVENTS_BYTES),
            (FLOW_CONFIG_MAP_NAME, BPF_MAP_TYPE_ARRAY, 4, ctypes.sizeof(FlowConfig), 1),
            (FLOW_LOST_MAP_NAME, BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, FLOW_LOST_MAX_ENTRIES),
        ):
            opened.append(_pinned(directory, name, map_type, key, value, max_entries))
    except BaseException:
        for kmap in opened:
            kmap.close()
        raise
    return FlowMaps(*opened)
