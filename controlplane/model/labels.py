"""Labels (``source:key=value``) and label sets (:class:`Labels`), with their canonical
form; label problems raise :class:`~controlplane.model.errors.InvalidLabel`.

Label syntax
------------
A label is ``source:key=value``. ``source`` is a lowercase DNS label (``k8s``,
``reserved``, ``cidr``, ``unspec``, ``container`` ...). When a parsed string has no
source (``app=web``), the source is ``unspec``, as in Cilium's ``ParseLabel``.

The key and the value follow the Kubernetes label syntax: the key is an optional DNS
subdomain prefix (≤ 253 characters, lowercase) followed by ``/`` and a name (≤ 63
characters, alphanumeric at both ends, ``-``, ``_`` and ``.`` inside); the value is empty
or ≤ 63 characters of the same alphabet as a name. Keys of the ``cidr`` source are instead
an IP network in canonical form with no host bits set (``cidr:10.0.0.0/8``,
``cidr:2001:db8::/32``).

Canonical form of a label set
-----------------------------
Each label renders as ``source:key=value`` (``source:key`` when the value is empty, as in
Cilium); the entries are sorted by ``(source, key, value)`` and joined by ``;``. The empty
set renders as ``""``. The form is injective: sources contain no ``:``, and keys and values
contain neither ``=`` nor ``;``, so splitting on ``;``, then on the first ``:``, then on the
first ``=`` recovers exactly one label set. A set never holds two labels with the same
``(source, key)``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final, Self

from controlplane.model._checks import _build, _list_field, _record, _set, _short, _str_field
from controlplane.model.errors import InvalidLabel, InvalidRecord
from controlplane.model.names import (
    _DNS_LABEL_MAX,
    _DNS_LABEL_RE,
    _DNS_SUBDOMAIN_MAX,
    _DNS_SUBDOMAIN_RE,
)

__all__ = [
    "KEY_COMPONENT_MAX_BYTES",
    "SOURCE_ANY",
    "SOURCE_CIDR",
    "SOURCE_CONTAINER",
    "SOURCE_K8S",
    "SOURCE_RESERVED",
    "SOURCE_UNSPEC",
    "Label",
    "Labels",
]

SOURCE_K8S: Final = "k8s"
SOURCE_RESERVED: Final = "reserved"
SOURCE_CIDR: Final = "cidr"
SOURCE_UNSPEC: Final = "unspec"
SOURCE_CONTAINER: Final = "container"
SOURCE_ANY: Final = "any"


# The Kubernetes label name/value alphabet.
_LABEL_NAME_RE: Final = re.compile(r"[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?")

_LABEL_NAME_MAX: Final = 63
_LABEL_VALUE_MAX: Final = 63


def _label_error(message: str) -> InvalidLabel:
    return InvalidLabel(message)


def _check_label_source(source: object) -> str:
    if not isinstance(source, str):
        raise _label_error(f"label source: expected str, got {type(source).__name__}")
    if not source:
        raise _label_error("label source must not be empty")
    if len(source) > _DNS_LABEL_MAX or not _DNS_LABEL_RE.fullmatch(source):
        raise _label_error(
            f"label source must be a lowercase DNS label (a-z, 0-9, '-'): {_short(source)}"
        )
    return source


def _check_label_key(source: str, key: object) -> str:
    if not isinstance(key, str):
        raise _label_error(f"label key: expected str, got {type(key).__name__}")
    if not key:
        raise _label_error("label key must not be empty")
    if source == SOURCE_CIDR:
        return _check_cidr_key(key)
    prefix, slash, name = key.rpartition("/")
    if slash:
        if not prefix:
            raise _label_error(f"label key has an empty prefix: {_short(key)}")
        if len(prefix) > _DNS_SUBDOMAIN_MAX:
            raise _label_error(
                f"label key prefix longer than {_DNS_SUBDOMAIN_MAX} characters: {_short(key)}"
            )
        if not _DNS_SUBDOMAIN_RE.fullmatch(prefix):
            raise _label_error(f"label key prefix is not a lowercase DNS subdomain: {_short(key)}")
    if not name:
        raise _label_error(f"label key has an empty name: {_short(key)}")
    if len(name) > _LABEL_NAME_MAX:
        raise _label_error(
            f"label key name longer than {_LABEL_NAME_MAX} characters: {_short(key)}"
        )
    if not _LABEL_NAME_RE.fullmatch(name):
        raise _label_error(
            "label key name must be alphanumeric at both ends with only '-', '_', '.' inside: "
            + _short(key)
        )
    return key


def _check_cidr_key(key: str) -> str:
    if "/" not in key or "%" in key:
        raise _label_error(f"cidr label key must be an unscoped IP network: {_short(key)}")
    try:
        network = ipaddress.ip_network(key, strict=False)
        address = ipaddress.ip_address(key.partition("/")[0])
    except ValueError:
        raise _label_error(f"cidr label key is not an IP network: {_short(key)}") from None
    if network.network_address != address:
        raise _label_error(f"cidr label key has host bits set: {_short(key)}")
    if str(network) != key:
        raise _label_error(
            f"cidr label key is not in canonical form (expected {str(network)!r}): {_short(key)}"
        )
    return key


def _check_label_value(value: object) -> str:
    if not isinstance(value, str):
        raise _label_error(f"label value: expected str, got {type(value).__name__}")
    if len(value) > _LABEL_VALUE_MAX:
        raise _label_error(
            f"label value longer than {_LABEL_VALUE_MAX} characters: {_short(value)}"
        )
    if value and not _LABEL_NAME_RE.fullmatch(value):
        raise _label_error(
            "label value must be empty or alphanumeric at both ends with only '-', '_', '.' "
            "inside: " + _short(value)
        )
    return value


@dataclass(frozen=True, slots=True, order=True)
class Label:
    """One label: ``source:key=value``. See the module docstring for the syntax."""

    source: str
    key: str
    value: str = ""

    def __post_init__(self) -> None:
        source = _check_label_source(self.source)
        _check_label_key(source, self.key)
        _check_label_value(self.value)

    @classmethod
    def parse(cls, text: str) -> Self:
        """Parse ``[source:]key[=value]``; a missing source means ``unspec`` (as Cilium).

        The source is the text before the first ``:`` when that ``:`` comes before any
        ``=``. Raises :class:`InvalidLabel`.
        """
        if not isinstance(text, str):
            raise _label_error(f"label: expected str, got {type(text).__name__}")
        if not text:
            raise _label_error("label must not be empty")
        colon = text.find(":")
        equals = text.find("=")
        if colon >= 0 and (equals < 0 or colon < equals):
            source, rest = text[:colon], text[colon + 1 :]
        else:
            source, rest = SOURCE_UNSPEC, text
        key, _, value = rest.partition("=")
        return cls(source, key, value)

    def canonical(self) -> str:
        """``source:key=value``, or ``source:key`` when the value is empty."""
        if self.value:
            return f"{self.source}:{self.key}={self.value}"
        return f"{self.source}:{self.key}"

    def __str__(self) -> str:
        return self.canonical()

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "key": self.key, "value": self.value}

    @classmethod
    def from_dict(cls, data: object) -> Self:
        d = _record("Label", data)
        return _build(
            "Label",
            cls,
            source=_str_field("Label", d, "source"),
            key=_str_field("Label", d, "key"),
            value=_str_field("Label", d, "value"),
        )


KEY_COMPONENT_MAX_BYTES: Final = 200
_HASH_PREFIX: Final = "sha256:"


@dataclass(frozen=True, slots=True)
class Labels:
    """An immutable, hashable set of labels, kept sorted by ``(source, key, value)``.

    At most one label per ``(source, key)``; exact duplicates collapse. Build one with
    ``Labels.of(...)``, ``Labels.parse("k8s:app=web;k8s:tier=db")`` or
    ``Labels.from_strings([...])``.
    """

    labels: tuple[Label, ...] = ()

    def __post_init__(self) -> None:
        items = self.labels
        if isinstance(items, str | bytes) or not isinstance(items, Iterable):
            raise _label_error(f"labels: expected an iterable of Label, got {_short(items)}")
        unique: set[Label] = set()
        for item in items:
            if not isinstance(item, Label):
                raise _label_error(f"labels: expected Label, got {type(item).__name__}")
            unique.add(item)
        ordered = tuple(sorted(unique))
        for prev, cur in itertools.pairwise(ordered):
            if prev.source == cur.source and prev.key == cur.key:
                raise _label_error(
                    f"labels: conflicting values for {prev.source}:{prev.key}: "
                    f"{prev.value!r} and {cur.value!r}"
                )
        _set(self, "labels", ordered)

    @classmethod
    def of(cls, *labels: Label) -> Self:
        return cls(labels)

    @classmethod
    def from_strings(cls, texts: Iterable[str]) -> Self:
        """Parse each string with :meth:`Label.parse`. Raises :class:`InvalidLabel`."""
        if isinstance(texts, str | bytes):
            raise _label_error("labels: expected an iterable of strings, got a single string")
        return cls(tuple(Label.parse(t) for t in texts))

    @classmethod
    def parse(cls, text: str) -> Self:
        """Parse a ``;``-separated list (the canonical form, in any order); ``""`` is empty."""
        if not isinstance(text, str):
            raise _label_error(f"labels: expected str, got {type(text).__name__}")
        if not text:
            return cls()
        return cls.from_strings(text.split(";"))

    def canonical(self) -> str:
        """The injective canonical form (see the module docstring)."""
        return ";".join(label.canonical() for label in self.labels)

    def __str__(self) -> str:
        return self.canonical()

    def key_component(self) -> str:
        """A form safe as one etcd key segment.

        The canonical string when it is non-empty, at most ``KEY_COMPONENT_MAX_BYTES`` bytes,
        contains no ``/`` and does not start with ``sha256:``; otherwise ``sha256:`` + the
        hex SHA-256 of the canonical string (callers store the full labels in the value).
        The result is never empty and never contains ``/``, and distinct label sets give
        distinct results (barring a SHA-256 collision).
        """
        canonical = self.canonical()
        encoded = canonical.encode()
        if (
            canonical
            and len(encoded) <= KEY_COMPONENT_MAX_BYTES
            and "/" not in canonical
            and not canonical.startswith(_HASH_PREFIX)
        ):
            return canonical
        return _HASH_PREFIX + hashlib.sha256(encoded).hexdigest()

    def to_strings(self) -> list[str]:
        return [label.canonical() for label in self.labels]

    def __iter__(self) -> Iterator[Label]:
        return iter(self.labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __contains__(self, item: object) -> bool:
        return item in self.labels

    def issuperset(self, other: Labels) -> bool:
        """Whether every label of ``other`` is in this set (selector matching)."""
        return all(label in self.labels for label in other.labels)

    def union(self, other: Labels) -> Labels:
        """Both sets' labels; raises :class:`InvalidLabel` on a ``(source, key)`` conflict."""
        return Labels(self.labels + other.labels)

    def with_source(self, source: str) -> Labels:
        """The labels of one source."""
        return Labels(tuple(label for label in self.labels if label.source == source))

    def to_dict(self) -> dict[str, Any]:
        return {"labels": self.to_strings()}

    @classmethod
    def from_dict(cls, data: object) -> Self:
        d = _record("Labels", data)
        return cls._from_list("Labels", _list_field("Labels", d, "labels"))

    @classmethod
    def _from_list(cls, kind: str, items: list[object]) -> Self:
        texts: list[str] = []
        for item in items:
            if not isinstance(item, str):
                raise InvalidRecord(f"{kind}: labels: expected str, got {type(item).__name__}")
            texts.append(item)
        try:
            return cls.from_strings(texts)
        except InvalidLabel as e:
            raise InvalidRecord(f"{kind}: {e}") from None
