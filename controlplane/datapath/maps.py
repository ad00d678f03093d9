"""The map seam: a BPF-map-shaped Protocol and its dict-backed userspace implementation.

A :class:`Map` holds fixed-size byte keys and values, exactly as a kernel BPF map does, so
the kernel implementation (``bpf()`` syscalls through ctypes, ``BPF_MAP_*_BATCH``) can
slot in behind the same interface later. The userspace map is what the agent uses without
root or eBPF; it counts every write so tests can tell an untouched entry from a rewritten
one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol


class MapError(ValueError):
    """A key or value of the wrong size, or a full map."""


class Map(Protocol):
    """A BPF map: fixed-size byte keys and values."""

    @property
    def name(self) -> str: ...

    @property
    def key_size(self) -> int: ...

    @property
    def value_size(self) -> int: ...

    @property
    def thread_safe(self) -> bool:
        """Whether a worker thread may write the map while the event loop reads it (a
        kernel map: every access is a syscall)."""
        ...

    def lookup(self, key: bytes) -> bytes | None:
        """The value stored under exactly ``key`` (no longest-prefix match), or None."""
        ...

    def update(self, key: bytes, value: bytes) -> None: ...

    def delete(self, key: bytes) -> bool:
        """Remove ``key``; False when it was absent."""
        ...

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Every entry (a snapshot: safe to modify the map while iterating)."""
        ...

    def batch_update(self, entries: Sequence[tuple[bytes, bytes]]) -> int:
        """Write every entry in one call; returns how many were written."""
        ...

    def batch_delete(self, keys: Sequence[bytes]) -> int:
        """Remove every key in one call; returns how many were present."""
        ...

    def __len__(self) -> int: ...


@dataclass(slots=True)
class MapStats:
    """Write counters of one map (what the tests and metrics read)."""

    updates: int = 0
    """Entries written (single or batched)."""
    deletes: int = 0
    """Entries removed."""
    batch_calls: int = 0
    """Batch operations (each counts once however many entries it carried)."""
    single_calls: int = 0
    """Single-entry update or delete calls."""


class SizedMap:
    """A map's name, fixed key and value sizes, and the size checks of every access (the
    userspace and the kernel map share them; ``_error`` is the exception they raise)."""

    _error: type[MapError] = MapError
    thread_safe: bool = False

    def __init__(self, name: str, key_size: int, value_size: int) -> None:
        self._name = name
        self._key_size = key_size
        self._value_size = value_size

    @property
    def name(self) -> str:
        return self._name

    @property
    def key_size(self) -> int:
        return self._key_size

    @property
    def value_size(self) -> int:
        return self._value_size

    def _check_key(self, key: bytes) -> None:
        if len(key) != self._key_size:
            raise self._error(f"map {self._name}: key of {len(key)} bytes, want {self._key_size}")

    def _check_value(self, value: bytes) -> None:
        if len(value) != self._value_size:
            raise self._error(
                f"map {self._name}: value of {len(value)} bytes, want {self._value_size}"
            )


class UserspaceMap(SizedMap):
    """A dict-backed :class:`Map` with the kernel map's size checks and entry limit."""

    def __init__(self, name: str, key_size: int, value_size: int, max_entries: int) -> None:
        super().__init__(name, key_size, value_size)
        self.max_entries = max_entries
        self.stats = MapStats()
        self._data: dict[bytes, bytes] = {}

    def lookup(self, key: bytes) -> bytes | None:
        self._check_key(key)
        return self._data.get(key)

    def update(self, key: bytes, value: bytes) -> None:
        self.stats.single_calls += 1
        self._put(key, value)

    def delete(self, key: bytes) -> bool:
        self._check_key(key)
        self.stats.single_calls += 1
        if self._data.pop(key, None) is None:
            return False
        self.stats.deletes += 1
        return True

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        return iter(list(self._data.items()))

    def batch_update(self, entries: Sequence[tuple[bytes, bytes]]) -> int:
        # Check everything first: like the kernel, a bad element fails before any write
        # of this call (the kernel stops at the bad element; all-or-nothing is stricter).
        new = {k for k, _ in entries if k not in self._data}
        for key, value in entries:
            self._check_key(key)
            self._check_value(value)
        if len(self._data) + len(new) > self.max_entries:
            raise MapError(f"map {self._name}: full ({self.max_entries} entries)")
        self.stats.batch_calls += 1
        for key, value in entries:
            self._data[key] = value
        self.stats.updates += len(entries)
        return len(entries)

    def batch_delete(self, keys: Sequence[bytes]) -> int:
        for key in keys:
            self._check_key(key)
        self.stats.batch_calls += 1
        removed = 0
        for key in keys:
            if self._data.pop(key, None) is not None:
                removed += 1
        self.stats.deletes += removed
        return removed

    def __len__(self) -> int:
        return len(self._data)

    def _put(self, key: bytes, value: bytes) -> None:
        self._check_key(key)
        self._check_value(value)
        if key not in self._data and len(self._data) >= self.max_entries:
            raise MapError(f"map {self._name}: full ({self.max_entries} entries)")
        self._data[key] = value
        self.stats.updates += 1


def update_in_batches(map_: Map, entries: Sequence[tuple[bytes, bytes]], size: int) -> int:
    """Write ``entries`` in batch calls of at most ``size``, in order; how many were written."""
    return sum(map_.batch_update(entries[i : i + size]) for i in range(0, len(entries), size))


def delete_in_batches(map_: Map, keys: Sequence[bytes], size: int) -> int:
    """Remove ``keys`` in batch calls of at most ``size``; how many were present."""
    return sum(map_.batch_delete(keys[i : i + size]) for i in range(0, len(keys), size))
