"""Small immutable values of the etcd layer: key-values, compares, operations, results."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
from aetcd import rpc

CompareOp = Literal["==", "!=", "<", ">"]
_RESULTS = {
    "==": rpc.Compare.EQUAL,
    "!=": rpc.Compare.NOT_EQUAL,
    "<": rpc.Compare.LESS,
    ">": rpc.Compare.GREATER,
}


def prefix_range_end(prefix: bytes) -> bytes:
    """The exclusive end of the key range that starts with ``prefix`` (etcd's convention)."""
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"  # every key


class KeyValue(msgspec.Struct, frozen=True, gc=False):
    # A msgspec Struct, like WatchEvent: a list creates one per key, and one is made in C
    # (a NamedTuple costs ~6x more to create, a frozen dataclass ~20x).
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0

    @staticmethod
    def from_pb(kv: Any) -> KeyValue:
        return KeyValue(kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease)


@dataclass(frozen=True, slots=True)
class Compare:
    """One guard of a transaction: ``target(key) op value``."""

    key: bytes
    target: Literal["value", "version", "create", "mod", "lease"]
    op: CompareOp
    value: bytes | int
    range_end: bytes = b""
    """When set, the compare must hold for every key in [key, range_end)."""

    def to_pb(self) -> Any:
        compare = rpc.Compare(key=self.key, result=_RESULTS[self.op], range_end=self.range_end)
        if self.target == "value":
            if not isinstance(self.value, bytes):
                raise TypeError("a value compare takes bytes")
            compare.target = rpc.Compare.VALUE
            compare.value = self.value
            return compare
        if not isinstance(self.value, int):
            raise TypeError(f"a {self.target} compare takes an int")
        if self.target == "version":
            compare.target, compare.version = rpc.Compare.VERSION, self.value
        elif self.target == "create":
            compare.target, compare.create_revision = rpc.Compare.CREATE, self.value
        elif self.target == "mod":
            compare.target, compare.mod_revision = rpc.Compare.MOD, self.value
        else:
            compare.target, compare.lease = rpc.Compare.LEASE, self.value
        return compare


def value_is(key: bytes, value: bytes, op: CompareOp = "==") -> Compare:
    return Compare(key, "value", op, value)


def version_is(key: bytes, version: int, op: CompareOp = "==") -> Compare:
    return Compare(key, "version", op, version)


def create_revision_is(key: bytes, revision: int, op: CompareOp = "==") -> Compare:
    return Compare(key, "create", op, revision)


def mod_revision_is(key: bytes, revision: int, op: CompareOp = "==") -> Compare:
    return Compare(key, "mod", op, revision)


def absent(key: bytes) -> Compare:
    """The key does not exist (its create revision is 0)."""
    return Compare(key, "create", "==", 0)


def none_under(prefix: bytes) -> Compare:
    """No key starts with ``prefix`` (etcd compares every key of the range)."""
    return Compare(prefix, "create", "==", 0, prefix_range_end(prefix))


@dataclass(frozen=True, slots=True)
class Put:
    key: bytes
    value: bytes
    lease: int = 0

    def to_pb(self) -> Any:
        return rpc.RequestOp(
            request_put=rpc.PutRequest(key=self.key, value=self.value, lease=self.lease)
        )


@dataclass(frozen=True, slots=True)
class Delete:
    key: bytes
    prefix: bool = False

    def to_pb(self) -> Any:
        end = prefix_range_end(self.key) if self.prefix else b""
        return rpc.RequestOp(
            request_delete_range=rpc.DeleteRangeRequest(key=self.key, range_end=end)
        )


@dataclass(frozen=True, slots=True)
class Get:
    key: bytes
    prefix: bool = False

    def to_pb(self) -> Any:
        end = prefix_range_end(self.key) if self.prefix else b""
        return rpc.RequestOp(request_range=rpc.RangeRequest(key=self.key, range_end=end))


Op = Put | Delete | Get


@dataclass(frozen=True, slots=True)
class OpResult:
    """What one operation of a transaction returned."""

    kvs: tuple[KeyValue, ...] = ()
    deleted: int = 0


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int
    results: tuple[OpResult, ...]


@dataclass(frozen=True, slots=True)
class ListResult:
    kvs: tuple[KeyValue, ...]
    revision: int
    """The store revision the whole list was read at."""


@dataclass(frozen=True, slots=True)
class Lease:
    id: int
    ttl: int


@dataclass(frozen=True, slots=True)
class MemberStatus:
    """What one member says of itself (Maintenance.Status)."""

    endpoint: str
    member_id: int
    version: str
    db_size: int
    db_size_in_use: int
    leader: int
    raft_term: int
    raft_index: int
    revision: int
    is_learner: bool
    errors: tuple[str, ...]


class QuorumRead(msgspec.Struct, frozen=True):
    """One key read linearizably (a quorum answered), with the raft term it was read in: a
    term that changed between two reads means etcd elected a leader in between."""

    revision: int
    raft_term: int
    kv: KeyValue | None


class EventType(enum.Enum):
    PUT = "put"
    DELETE = "delete"
    LIST_DONE = "list-done"
    """The initial list (or a re-list) is complete; changes follow."""


class WatchEvent(msgspec.Struct, frozen=True, gc=False):
    type: EventType
    key: bytes
    value: bytes
    revision: int
    """mod revision of a put; the deleting revision of a delete; the list's for LIST_DONE."""
    create_revision: int = 0
    lease: int = 0
    synthetic: bool = False
    """A delete produced by a re-list's sweep, not seen as an etcd event."""
