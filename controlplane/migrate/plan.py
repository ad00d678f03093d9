"""What a store holds (a :class:`Snapshot`), what a copy would write (:class:`Plan`), and
how far two stores are apart (:func:`drift`). Pure logic over the snapshots.

Records are keyed as both stores name them: an identity by its number, an endpoint by
its IP, a node by its name, a CIDR claim by ``pool/cidr``, an IP lease by ``node/ip``, a
policy or service by ``namespace/name``. Two records of one key are equal when their
domain values are (the stores' own bookkeeping, versions, leases, marks, is left out).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from controlplane.migrate.side import Copier
from controlplane.model import (
    Endpoint,
    Identity,
    IPLease,
    NetworkPolicy,
    Node,
    NodeName,
    Service,
    is_reserved_identity,
)
from controlplane.store_types import CIDRClaim

__all__ = [
    "RESOURCES",
    "Drift",
    "Plan",
    "Snapshot",
    "drift",
    "make_plan",
    "read_snapshot",
]

RESOURCES = ("identities", "cidrs", "nodes", "leases", "endpoints", "policies", "services")
"""In the order a copy writes them: what an endpoint names exists before it, and a node's
CIDR claim before the node (an operator that sees the node first would give it one)."""


@dataclass(frozen=True)
class Snapshot:
    mode: str
    identities: dict[str, Identity]
    nodes: dict[str, Node]
    cidrs: dict[str, CIDRClaim]
    leases: dict[str, IPLease]
    endpoints: dict[str, Endpoint]
    policies: dict[str, NetworkPolicy]
    services: dict[str, Service] | None
    """None when the mode has no service store."""
    namespaces: set[str] | None = None

    def records(self, resource: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = getattr(self, resource)
        return found


async def read_snapshot(side: Copier, pools: Iterable[str] = ("default",)) -> Snapshot:
    """Every record of ``side`` (the reads run concurrently)."""
    async with asyncio.TaskGroup() as group:
        identities = group.create_task(side.list_identities())
        nodes = group.create_task(side.list_nodes())
        leases = group.create_task(side.list_leases())
        endpoints = group.create_task(side.list_endpoints())
        policies = group.create_task(side.list_policies())
        services = group.create_task(side.list_services())
        namespaces = group.create_task(side.namespaces())
        claims = [group.create_task(side.list_claims(pool)) for pool in sorted(set(pools))]
    found_services = services.result()
    return Snapshot(
        mode=side.mode,
        identities={str(i.id): i for i in identities.result()},
        nodes={str(n.name): n for n in nodes.result()},
        cidrs={f"{c.pool}/{c.cidr}": c for task in claims for c in task.result()},
        leases={f"{x.node}/{x.ip}": x for x in leases.result()},
        endpoints={str(e.ip): e for e in endpoints.result()},
        policies={p.id: p for p in policies.result()},
        services=None if found_services is None else {s.id: s for s in found_services},
        namespaces=namespaces.result(),
    )


# -- drift ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Drift:
    """Per resource: keys only in CRD, only in kvstore, and in both but different."""

    counts: dict[str, dict[str, int]]
    """resource -> {"only_crd", "only_kvstore", "different"} -> count."""
    examples: dict[str, list[str]] = field(default_factory=dict)
    """resource -> a few keys that differ (for humans)."""

    @property
    def total(self) -> int:
        return sum(sum(c.values()) for c in self.counts.values())

    def to_json(self) -> dict[str, Any]:
        return {"total": self.total, "resources": self.counts, "examples": self.examples}


SIDES = ("only_crd", "only_kvstore", "different")


def drift(a: Snapshot, b: Snapshot, *, examples: int = 3) -> Drift:
    """The drift between a CRD snapshot and a kvstore one (either order)."""
    crd, kv = (a, b) if a.mode == "crd" else (b, a)
    counts: dict[str, dict[str, int]] = {}
    shown: dict[str, list[str]] = {}
    for resource in RESOURCES:
        left, right = crd.records(resource), kv.records(resource)
        if left is None or right is None:
            continue  # one mode has no such store: nothing to compare
        only_left = left.keys() - right.keys()
        only_right = right.keys() - left.keys()
        different = sorted(k for k in left.keys() & right.keys() if left[k] != right[k])
        counts[resource] = {
            "only_crd": len(only_left),
            "only_kvstore": len(only_right),
            "different": len(different),
        }
        sample = (
            [f"only in crd: {k}" for k in sorted(only_left)[:examples]]
            + [f"only in kvstore: {k}" for k in sorted(only_right)[:examples]]
            + [f"different: {k}" for k in different[:examples]]
        )
        if sample:
            shown[resource] = sample
    return Drift(counts, shown)


# -- plan ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What copying ``source`` into ``target`` writes, and what stops it."""

    source: str
    target: str
    copies: dict[str, list[Any]]
    """resource -> records to write, in :data:`RESOURCES` order (endpoints: one list of
    addresses per pod; leases: one list per node)."""
    conflicts: list[str]
    """One line each; a plan with any writes nothing."""
    present: dict[str, int]
    """resource -> records the target already has equal."""
    users: dict[str, list[NodeName]] = field(default_factory=dict)
    """identity number -> the nodes whose endpoints use it (for kvstore references)."""
    skipped: list[str] = field(default_factory=list)
    """Resources not copied and why (a side without that store)."""

    @property
    def writes(self) -> int:
        return sum(len(v) for v in self.copies.values())

    def counts(self) -> dict[str, int]:
        return {r: len(v) for r, v in self.copies.items()}

    def to_json(self) -> dict[str, Any]:
        return {
            "from": self.source,
            "to": self.target,
            "writes": self.counts(),
            "present": self.present,
            "conflicts": self.conflicts,
            "skipped": self.skipped,
        }


def make_plan(source: Snapshot, target: Snapshot, target_side: Copier) -> Plan:
    """Every record ``source`` has and ``target`` lacks; a conflict for every record the
    target holds otherwise (the same key with another value, or the same thing under
    another key: a label set under another number, a pod at another IP, a node with
    another CIDR of the pool)."""
    conflicts: list[str] = []
    copies: dict[str, list[Any]] = {}
    present: dict[str, int] = {}
    skipped: list[str] = []

    def missing(resource: str, what: str) -> list[Any]:
        src, dst = source.records(resource), target.records(resource)
        if src is None or dst is None:
            side = source.mode if src is None else target.mode
            skipped.append(f"{resource}: {side} mode has no {resource} store")
            return []
        out: list[Any] = []
        equal = 0
        for key in sorted(src):
            there = dst.get(key)
            if there is None:
                out.append(src[key])
            elif there == src[key]:
                equal += 1
            elif _fills_in(there, src[key]):
                out.append(src[key])  # the target lacks only what its operator writes
            else:
                conflicts.append(
                    f"{what} {key}: {target.mode} has {_show(there)}, not {_show(src[key])}"
                )
        present[resource] = equal
        return out

    # identities: one number per label set, one label set per number, on both sides
    new_ids: list[Identity] = missing("identities", "identity")
    by_labels = {i.labels: i for i in target.identities.values()}
    for identity in new_ids:
        other = by_labels.get(identity.labels)
        if other is not None:
            conflicts.append(
                f"identity {identity.id}: {target.mode} has labels {identity.labels} "
                f"as identity {other.id}"
            )
        reason = target_side.placement_error(identity)
        if reason is not None:
            conflicts.append(reason)
    copies["identities"] = new_ids

    copies["nodes"] = missing("nodes", "node")

    new_claims: list[CIDRClaim] = missing("cidrs", "CIDR")
    held = {(c.pool, c.node): c.cidr for c in target.cidrs.values()}
    for claim in new_claims:
        other_cidr = held.get((claim.pool, claim.node))
        if other_cidr is not None:
            conflicts.append(
                f"CIDR {claim.cidr}: {target.mode} gives node {claim.node} {other_cidr} "
                f"in pool {claim.pool}"
            )
    copies["cidrs"] = new_claims

    new_leases: list[IPLease] = missing("leases", "IP lease")
    leased_by_ip = {x.ip: x for x in target.leases.values()}
    per_node: dict[NodeName, list[IPLease]] = {}
    for lease in new_leases:
        other_lease = leased_by_ip.get(lease.ip)
        if other_lease is not None:
            conflicts.append(
                f"IP lease {lease.ip}: {target.mode} leases it on node {other_lease.node} "
                f"to {other_lease.owner}"
            )
        per_node.setdefault(lease.node, []).append(lease)
    copies["leases"] = [per_node[n] for n in sorted(per_node)]

    new_endpoints: list[Endpoint] = missing("endpoints", "endpoint")
    pod_ips = {(e.endpoint_id, e.ip.version): e for e in target.endpoints.values()}
    per_pod: dict[str, list[Endpoint]] = {}
    for endpoint in new_endpoints:
        other_ep = pod_ips.get((endpoint.endpoint_id, endpoint.ip.version))
        if other_ep is not None:
            conflicts.append(
                f"endpoint {endpoint.ip}: {target.mode} has pod {endpoint.endpoint_id} "
                f"at {other_ep.ip}"
            )
        if str(endpoint.identity) not in source.identities and not is_reserved_identity(
            endpoint.identity
        ):
            conflicts.append(
                f"endpoint {endpoint.ip}: its identity {endpoint.identity} is not in {source.mode}"
            )
        per_pod.setdefault(endpoint.endpoint_id, []).append(endpoint)
    copies["endpoints"] = [per_pod[p] for p in sorted(per_pod)]

    copies["policies"] = missing("policies", "policy")
    copies["services"] = missing("services", "service")

    if target.namespaces is not None:
        needed = (
            {e.namespace for e in new_endpoints}
            | {p.namespace for p in copies["policies"]}
            | {s.namespace for s in copies["services"]}
        )
        for namespace in sorted(needed - target.namespaces):
            conflicts.append(
                f"namespace {namespace!r} does not exist in {target.mode}: create it first"
            )

    users: dict[str, set[NodeName]] = {}
    for endpoint in source.endpoints.values():
        users.setdefault(str(endpoint.identity), set()).add(endpoint.node)
    return Plan(
        source=source.mode,
        target=target.mode,
        copies=copies,
        conflicts=conflicts,
        present=present,
        users={k: sorted(v) for k, v in users.items()},
        skipped=skipped,
    )


def _fills_in(there: object, wanted: object) -> bool:
    """A node record that lacks only the pod CIDRs the source shows: in CRD mode they are
    the operator's field (``spec.podCIDRs``), unwritten while another mode's operator
    allocates; the copy writes them (with the claim)."""
    return (
        isinstance(there, Node)
        and isinstance(wanted, Node)
        and not there.pod_cidrs
        and replace(there, pod_cidrs=wanted.pod_cidrs) == wanted
    )


def _show(value: object) -> str:
    if isinstance(value, Identity):
        return f"labels {value.labels}"
    if isinstance(value, Endpoint):
        return (
            f"pod {value.endpoint_id} on {value.node} (identity {value.identity}, "
            f"host {value.host_ip})"
        )
    if isinstance(value, CIDRClaim):
        return f"node {value.node}"
    if isinstance(value, IPLease):
        return f"owner {value.owner}"
    if isinstance(value, Node):
        cidrs = ",".join(str(c) for c in value.pod_cidrs) or "no CIDR"
        ips = ",".join(str(i) for i in value.ips)
        return f"ips {ips}, {cidrs}, boot {value.boot_id or '-'}"
    return "another spec"
