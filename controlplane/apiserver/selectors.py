"""Label and field selectors of list and watch requests, parsed as kube-apiserver parses them.

Label selectors: ``k=v``, ``k==v``, ``k!=v``, ``k in (a,b)``, ``k notin (a,b)``, ``k``
(exists) and ``!k`` (does not exist), comma-separated and ANDed. Field selectors: only
``metadata.name`` and ``metadata.namespace`` with ``=``, ``==`` or ``!=``; anything else is
a 400, as for a custom resource on a real server. Parsing never touches storage.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from controlplane.apiserver.errors import ApiError, bad_request

Predicate = Callable[[Mapping[str, str]], bool]
_SET_RE = re.compile(r"^\s*(!?)\s*([A-Za-z0-9./_-]+)\s*(?:(notin|in)\s*\(([^)]*)\))?\s*$")
_OP_RE = re.compile(r"^\s*([A-Za-z0-9./_-]+)\s*(==|=|!=)\s*([A-Za-z0-9._-]*)\s*$")
FIELDS = ("metadata.name", "metadata.namespace")
EVENT_FIELDS = (
    *FIELDS,
    "involvedObject.kind",
    "involvedObject.namespace",
    "involvedObject.name",
    "involvedObject.uid",
    "involvedObject.apiVersion",
    "involvedObject.resourceVersion",
    "involvedObject.fieldPath",
    "reason",
    "reportingComponent",
    "source",
    "type",
)
"""The field labels kube-apiserver supports for v1 Events (kubectl describe uses them)."""


def _split_terms(text: str) -> list[str]:
    """Split on commas outside parentheses."""
    terms: list[str] = []
    depth = 0
    current: list[str] = []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            terms.append("".join(current))
            current = []
        else:
            current.append(ch)
    terms.append("".join(current))
    return [t for t in terms if t.strip()]


def _term(term: str) -> Predicate:
    op = _OP_RE.match(term)
    if op:
        key, operator, value = op.groups()
        if operator == "!=":
            return lambda labels: labels.get(key) != value
        return lambda labels: labels.get(key) == value
    match = _SET_RE.match(term)
    if not match:
        raise bad_request(f"unable to parse requirement: invalid label selector: {term!r}")
    negated, key, set_op, values_text = match.groups()
    if set_op is None:
        if negated:
            return lambda labels: key not in labels
        return lambda labels: key in labels
    if negated:
        raise bad_request(f"unable to parse requirement: invalid label selector: {term!r}")
    values = frozenset(v.strip() for v in values_text.split(",") if v.strip())
    if set_op == "in":
        return lambda labels: labels.get(key) in values
    return lambda labels: labels.get(key) not in values


def label_selector(text: str | None) -> Predicate | None:
    """A predicate over an object's labels; None matches everything."""
    if not text or not text.strip():
        return None
    terms = [_term(t) for t in _split_terms(text)]
    return lambda labels: all(t(labels) for t in terms)


def field_selector(text: str | None, supported: tuple[str, ...] = FIELDS) -> Predicate | None:
    """A predicate over ``{"metadata.name": ..., ...}``; 400 for a field not ``supported``."""
    if not text or not text.strip():
        return None
    terms: list[Predicate] = []
    for term in _split_terms(text):
        match = _OP_RE.match(term)
        if not match:
            raise bad_request(f"invalid field selector: {term!r}")
        key, operator, value = match.groups()
        if key not in supported:
            raise ApiError(
                400,
                "BadRequest",
                f'Unable to find "{key}" field label: field label not supported: {key}',
            )
        terms.append(_field_term(key, value, negated=operator == "!="))
    return lambda fields: all(t(fields) for t in terms)


def _field_term(key: str, value: str, *, negated: bool) -> Predicate:
    def matches(fields: Mapping[str, str]) -> bool:
        return (fields.get(key, "") == value) != negated

    return matches


class Selector:
    """A label and a field selector together, applied to whole objects."""

    def __init__(
        self, labels: str | None, fields: str | None, supported: tuple[str, ...] = FIELDS
    ) -> None:
        self._labels = label_selector(labels)
        self._fields = field_selector(fields, supported)
        self._supported = supported

    @property
    def everything(self) -> bool:
        return self._labels is None and self._fields is None

    def matches(self, obj: Mapping[str, Any]) -> bool:
        metadata = obj.get("metadata") or {}
        if self._labels is not None and not self._labels(metadata.get("labels") or {}):
            return False
        if self._fields is not None:
            fields = {name: _field_value(obj, name) for name in self._supported}
            if not self._fields(fields):
                return False
        return True


def _field_value(obj: Mapping[str, Any], name: str) -> str:
    node: Any = obj
    for part in name.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    if name == "source" and isinstance(node, Mapping):
        node = node.get("component")
    return "" if node is None else str(node)
