"""Each local endpoint's ingress policy: enforced or not, and its allowed set (pure).

Store-agnostic: it takes the local endpoints (namespace and labels), every known identity
(numeric ID -> labels) and the policies, and returns, per endpoint, what the datapath's
``cp_endpoints`` flag and ``cp_policy`` entries must say:

- A policy selects the endpoints **of its own namespace** whose labels match its
  ``endpoint_selector`` (:func:`~controlplane.model.selector_matches`: labels ⊇ selector,
  ``any:`` matching any source).
- An endpoint no policy selects is not enforced (default allow). Once one does, it is
  enforced (default deny) and allowed exactly the union of the selecting policies' rules.
- A rule allows every identity whose labels match its ``from_selector`` (identities are
  cluster-wide, so the namespace does not restrict the source side; add a namespace label
  to the selector for that), on each of its ports; a rule without ports allows every port
  and protocol.
- An entry is ``(identity, port, proto)``; port 0 is any port of the protocol and
  ``(identity, 0, 0)`` any port and protocol, matching the wildcard lookups of
  ``bpf/cp_datapath.c``. Entries covered by a wider one of the same identity are dropped.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from controlplane.model import Labels, NetworkPolicy, selector_matches

K = TypeVar("K", bound=Hashable)

PolicyEntry = tuple[int, int, int]
"""``(identity, port, proto)``; 0 is a wildcard for port and proto."""


@dataclass(frozen=True, slots=True)
class Subject:
    """A local endpoint, as policy sees it."""

    namespace: str
    labels: Labels


@dataclass(frozen=True, slots=True)
class EndpointPolicy:
    """What one endpoint's datapath entries must say."""

    enforced: bool
    allowed: frozenset[PolicyEntry]
    selected_by: tuple[str, ...] = ()
    """The ``namespace/name`` of every policy that selects the endpoint, sorted."""


NOT_ENFORCED = EndpointPolicy(False, frozenset())


def compute(
    endpoints: Mapping[K, Subject],
    identities: Mapping[int, Labels],
    policies: Iterable[NetworkPolicy],
) -> dict[K, EndpointPolicy]:
    """Every endpoint's :class:`EndpointPolicy` (see the module docstring)."""
    by_namespace: dict[str, list[NetworkPolicy]] = {}
    for policy in policies:
        by_namespace.setdefault(policy.namespace, []).append(policy)
    sources: dict[Labels, frozenset[int]] = {}

    def matching(selector: Labels) -> frozenset[int]:
        found = sources.get(selector)
        if found is None:
            found = frozenset(
                i for i, lbls in identities.items() if selector_matches(selector, lbls)
            )
            sources[selector] = found
        return found

    out: dict[K, EndpointPolicy] = {}
    for key, subject in endpoints.items():
        selecting = [
            p
            for p in by_namespace.get(subject.namespace, ())
            if selector_matches(p.endpoint_selector, subject.labels)
        ]
        if not selecting:
            out[key] = NOT_ENFORCED
            continue
        allowed: set[PolicyEntry] = set()
        for policy in selecting:
            for rule in policy.ingress:
                ids = matching(rule.from_selector)
                ports = [(p.port, p.proto) for p in rule.ports] or [(0, 0)]
                allowed.update((ident, port, proto) for ident in ids for port, proto in ports)
        out[key] = EndpointPolicy(True, _collapse(allowed), tuple(sorted(p.id for p in selecting)))
    return out


def _collapse(entries: set[PolicyEntry]) -> frozenset[PolicyEntry]:
    """Drop entries a wider entry of the same identity covers."""
    out: set[PolicyEntry] = set()
    for ident, port, proto in entries:
        if (port or proto) and (ident, 0, 0) in entries:
            continue
        if port and (ident, 0, proto) in entries:
            continue
        out.add((ident, port, proto))
    return frozenset(out)
