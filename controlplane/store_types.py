"""Value types the stores return: versioned objects, watch events, GC and IPAM records.

They sit below every store implementation (kvstore, crd) and the interfaces in
``controlplane.store``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar

import msgspec

from controlplane.model import IPNetwork, NodeName

T = TypeVar("T")


class Versioned(NamedTuple, Generic[T]):
    """An object as read from the store, with the version to hand back for compare-and-set."""

    value: T
    version: int


class StoreError(Exception):
    """Base of the errors every store raises when it cannot do what was asked now (its
    backend is unreachable, times out, has no leader...): the caller may retry later.
    Each store's own errors (``KvstoreError``, the CRD store's) derive from it."""


class AddressConflict(StoreError):
    """An endpoint's address is published by another node; it was not overwritten."""


class EventKind(enum.Enum):
    UPSERT = "upsert"
    DELETE = "delete"
    SYNCED = "synced"
    """Every object that existed when the watch started has been delivered."""


class StoreEvent(msgspec.Struct, Generic[T], frozen=True, gc=False):
    # msgspec Structs (made in C: one per key of a list) rather than NamedTuples (~6x
    # dearer) or frozen dataclasses.
    kind: EventKind
    name: str
    """The object's name within its resource: an identity number, an IP, a node name."""
    value: T | None
    """The object for UPSERT; the last known object (or None) for DELETE; None for SYNCED."""
    version: int


@dataclass(frozen=True, slots=True)
class GCStats:
    """What one garbage-collection round did."""

    candidates: int
    """Identities without references, waiting for their second round."""
    deleted: int
    skipped: int
    """Deletes refused because the identity changed in between (it gained a user)."""
    duration: float


@dataclass(frozen=True, slots=True)
class CIDRClaim:
    """One pod CIDR of a pool, given to one node."""

    pool: str
    cidr: IPNetwork
    node: NodeName


class DoubleWriteConflict(StoreError):
    """Double-write mode: the other store holds a record that contradicts the read
    store's; it is not overwritten (the write is refused, counted and logged)."""
