"""Copy what one store has and the other lacks (``cpctl migrate``).

The copy is a diff: read both stores whole, plan, check, write. Every conflict is found
before the first write, and a plan with any writes nothing. Writes are create-only or
guarded (see the copiers), so a second run finds everything present and writes nothing,
and a run cut short is finished by the next one. Identities go first (with the nodes
that use them), then CIDR claims, nodes, IP leases, endpoints, policies and services, so
a record never names something the target lacks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from controlplane.migrate.plan import RESOURCES, Plan, Snapshot, make_plan, read_snapshot
from controlplane.migrate.side import Copier

__all__ = ["Conflicts", "Outcome", "copy_missing", "plan_copy"]

Progress = Callable[[str, int, int], None]
"""(resource, records written so far, records to write)"""


class Conflicts(Exception):
    """The target holds records that contradict the source; nothing was written."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        n = len(plan.conflicts)
        super().__init__(
            f"{n} conflicting record{'s' if n != 1 else ''} in {plan.target}; nothing written: "
            + plan.conflicts[0]
        )


@dataclass
class Outcome:
    plan: Plan
    written: dict[str, int] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    """Writes that found the target changed since the plan (one line each)."""

    def to_json(self) -> dict[str, Any]:
        return {**self.plan.to_json(), "written": self.written, "failed": self.failed}


async def plan_copy(
    source: Copier, target: Copier, pools: Iterable[str] = ("default",)
) -> tuple[Plan, Snapshot, Snapshot]:
    src = await read_snapshot(source, pools)
    dst = await read_snapshot(target, pools)
    return make_plan(src, dst, target), src, dst


async def copy_missing(
    source: Copier,
    target: Copier,
    *,
    pools: Iterable[str] = ("default",),
    dry_run: bool = False,
    progress: Progress | None = None,
) -> Outcome:
    """Plan, then (unless ``dry_run``) write the plan; raises :class:`Conflicts` (and
    writes nothing) when the target contradicts the source."""
    plan, _, _ = await plan_copy(source, target, pools)
    if plan.copies.get("cidrs") or plan.copies.get("nodes"):
        leader = await target.operator_leading()
        if leader is not None and leader != await source.operator_leading():
            # its CIDR allocator knows the claims of when its term began: a copied node
            # it sees before (or without) the copied claim would get a second CIDR. (A
            # double-write operator leads both modes' elections under one id; it checks
            # every claim against the other store, so a copy beside it is safe.)
            plan.conflicts.append(
                f"a {target.mode}-mode operator leads ({leader}): stop it before copying "
                f"nodes and CIDR claims into {target.mode}, start it after"
            )
    if plan.conflicts:
        raise Conflicts(plan)
    outcome = Outcome(plan)
    if dry_run:
        return outcome
    for resource in RESOURCES:
        items = plan.copies.get(resource, [])
        done = 0
        for item in items:
            reason = await _write(target, resource, item, plan)
            if reason is not None:
                outcome.failed.append(reason)
            else:
                done += 1
            if progress is not None:
                progress(resource, done, len(items))
        outcome.written[resource] = done
    return outcome


async def _write(target: Copier, resource: str, item: Any, plan: Plan) -> str | None:
    if resource == "identities":
        return await target.write_identity(item, plan.users.get(str(item.id), []))
    if resource == "nodes":
        return await target.write_node(item)
    if resource == "cidrs":
        return await target.write_claim(item)
    if resource == "leases":
        return await target.write_leases(item[0].node, item)
    if resource == "endpoints":
        return await target.write_endpoints(item)
    if resource == "policies":
        return await target.write_policy(item)
    if resource == "services":
        return await target.write_service(item)
    raise AssertionError(resource)
