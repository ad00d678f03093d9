"""Security identities: numeric identities and their parser, the reserved identities and
their labels, identity ranges and their sharding, and :class:`Identity`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, NewType, Self

from controlplane.model._checks import (
    _build,
    _int_field,
    _is_int,
    _list_field,
    _record,
    _short,
)
from controlplane.model.errors import InvalidRecord, ModelError
from controlplane.model.labels import SOURCE_RESERVED, Label, Labels

__all__ = [
    "IDENTITY_HEALTH",
    "IDENTITY_HOST",
    "IDENTITY_INGRESS",
    "IDENTITY_INIT",
    "IDENTITY_KUBE_APISERVER",
    "IDENTITY_REMOTE_NODE",
    "IDENTITY_UNKNOWN",
    "IDENTITY_UNMANAGED",
    "IDENTITY_WORLD",
    "MAX_NUMERIC_IDENTITY",
    "RESERVED_IDENTITIES",
    "RESERVED_IDENTITY_RANGE",
    "Identity",
    "IdentityRange",
    "NumericIdentity",
    "cluster_identity_range",
    "is_reserved_identity",
    "parse_numeric_identity",
    "reserved_identity_for",
    "reserved_labels",
    "shard_identity_ranges",
]

NumericIdentity = NewType("NumericIdentity", int)

MAX_NUMERIC_IDENTITY: Final = 2**32 - 1  # identities are uint32 in the datapath

_DECIMAL_RE: Final = re.compile(r"0|[1-9][0-9]*")


def _check_numeric_identity(what: str, value: object, *, allow_zero: bool = False) -> int:
    if not _is_int(value):
        raise ModelError(f"{what}: expected int, got {type(value).__name__}")
    low = 0 if allow_zero else 1
    if not low <= value <= MAX_NUMERIC_IDENTITY:
        raise ModelError(f"{what}: {value} outside {low}..{MAX_NUMERIC_IDENTITY}")
    return value


def parse_numeric_identity(text: object) -> NumericIdentity:
    """Parse a canonical decimal identity (as found in keys); raises InvalidRecord."""
    if not isinstance(text, str) or not _DECIMAL_RE.fullmatch(text) or len(text) > 10:
        raise InvalidRecord(f"invalid numeric identity {_short(text)}")
    try:
        return NumericIdentity(_check_numeric_identity("numeric identity", int(text)))
    except ModelError as e:
        raise InvalidRecord(str(e)) from None


IDENTITY_UNKNOWN: Final = NumericIdentity(0)
IDENTITY_HOST: Final = NumericIdentity(1)
IDENTITY_WORLD: Final = NumericIdentity(2)
IDENTITY_UNMANAGED: Final = NumericIdentity(3)
IDENTITY_HEALTH: Final = NumericIdentity(4)
IDENTITY_INIT: Final = NumericIdentity(5)
IDENTITY_REMOTE_NODE: Final = NumericIdentity(6)
IDENTITY_KUBE_APISERVER: Final = NumericIdentity(7)
IDENTITY_INGRESS: Final = NumericIdentity(8)

#: Reserved identity → its single ``reserved:<name>`` label set (read-only).
RESERVED_IDENTITIES: Final[Mapping[NumericIdentity, Labels]] = MappingProxyType(
    {
        ident: Labels.of(Label(SOURCE_RESERVED, name))
        for ident, name in (
            (IDENTITY_HOST, "host"),
            (IDENTITY_WORLD, "world"),
            (IDENTITY_UNMANAGED, "unmanaged"),
            (IDENTITY_HEALTH, "health"),
            (IDENTITY_INIT, "init"),
            (IDENTITY_REMOTE_NODE, "remote-node"),
            (IDENTITY_KUBE_APISERVER, "kube-apiserver"),
            (IDENTITY_INGRESS, "ingress"),
        )
    }
)

_RESERVED_BY_LABEL: Final[Mapping[Label, NumericIdentity]] = MappingProxyType(
    {next(iter(labels)): ident for ident, labels in RESERVED_IDENTITIES.items()}
)
_HOST_LABEL: Final = Label(SOURCE_RESERVED, "host")


def is_reserved_identity(ident: int) -> bool:
    """Whether ``ident`` lies in the reserved range 1..255."""
    return RESERVED_IDENTITY_RANGE.contains(ident)


def reserved_labels(ident: int) -> Labels | None:
    """The label set of a well-known reserved identity, or None."""
    return RESERVED_IDENTITIES.get(NumericIdentity(ident))


def reserved_identity_for(labels: Labels) -> NumericIdentity | None:
    """The reserved identity a label set maps to, or None (allocate a cluster identity).

    As in Cilium: any set containing ``reserved:host`` is the host identity (the host may
    carry extra labels, e.g. its node labels); otherwise a set consisting of exactly one
    known ``reserved:<name>`` label maps to that identity. Anything else gives None.
    """
    if _HOST_LABEL in labels:
        return IDENTITY_HOST
    if len(labels) == 1:
        return _RESERVED_BY_LABEL.get(next(iter(labels)))
    return None


@dataclass(frozen=True, slots=True)
class IdentityRange:
    """An inclusive range ``first..last`` of numeric identities."""

    first: int
    last: int

    def __post_init__(self) -> None:
        first = _check_numeric_identity("identity range first", self.first, allow_zero=True)
        last = _check_numeric_identity("identity range last", self.last, allow_zero=True)
        if first > last:
            raise ModelError(f"identity range: first {first} > last {last}")

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    def contains(self, ident: int) -> bool:
        return self.first <= ident <= self.last

    def overlaps(self, other: IdentityRange) -> bool:
        return self.first <= other.last and other.first <= self.last

    def as_range(self) -> range:
        return range(self.first, self.last + 1)

    def __str__(self) -> str:
        return f"{self.first}..{self.last}"

    def to_dict(self) -> dict[str, Any]:
        return {"first": self.first, "last": self.last}

    @classmethod
    def from_dict(cls, data: object) -> Self:
        d = _record("IdentityRange", data)
        return _build(
            "IdentityRange",
            cls,
            first=_int_field("IdentityRange", d, "first"),
            last=_int_field("IdentityRange", d, "last"),
        )


RESERVED_IDENTITY_RANGE: Final = IdentityRange(1, 255)


def cluster_identity_range() -> IdentityRange:
    """Cilium's cluster-local identity range, 256..65535."""
    return IdentityRange(256, 65535)


def shard_identity_ranges(total: IdentityRange, shards: int) -> list[IdentityRange]:
    """Split ``total`` into ``shards`` disjoint, contiguous slices that cover it, in order.

    Slices differ in size by at most one (the first ``size % shards`` get one more ID).
    Raises :class:`ModelError` when ``shards < 1`` or a slice would be empty.
    """
    if not _is_int(shards) or shards < 1:
        raise ModelError(f"shard count must be a positive int, got {_short(shards)}")
    if shards > total.size:
        raise ModelError(
            f"cannot split identity range {total} ({total.size} IDs) into {shards} shards"
        )
    base, extra = divmod(total.size, shards)
    ranges: list[IdentityRange] = []
    start = total.first
    for index in range(shards):
        count = base + (1 if index < extra else 0)
        ranges.append(IdentityRange(start, start + count - 1))
        start += count
    return ranges


@dataclass(frozen=True, slots=True)
class Identity:
    """A security identity: a numeric ID (1..2**32-1) bound to a label set."""

    id: NumericIdentity
    labels: Labels

    def __post_init__(self) -> None:
        _check_numeric_identity("identity id", self.id)
        if not isinstance(self.labels, Labels):
            raise ModelError(f"identity labels: expected Labels, got {type(self.labels).__name__}")

    @property
    def is_reserved(self) -> bool:
        return is_reserved_identity(self.id)

    def to_dict(self) -> dict[str, Any]:
        return {"id": int(self.id), "labels": self.labels.to_strings()}

    @classmethod
    def from_dict(cls, data: object) -> Self:
        d = _record("Identity", data)
        ident = _int_field("Identity", d, "id")
        labels = Labels._from_list("Identity", _list_field("Identity", d, "labels"))
        return _build("Identity", cls, id=NumericIdentity(ident), labels=labels)
