"""The operator's pod CIDR claims as ``PodCIDR`` objects (the CIDRStore of CRD mode).

One object per claimed CIDR, named ``<pool>.<cidr>`` (``default.10.0.1.0-24``; an IPv6
address is written out in full with ``-`` for ``:``), with spec ``{pool, cidr, node}``.
Because the name is the CIDR, the API server's create is the atomic claim: a second
claimant, whoever it is and however stale its view (a paused ex-leader), gets
AlreadyExists and the claim is refused. So no CIDR can ever be given to two nodes. A claim
is freed only by a delete guarded by the uid and resourceVersion it was read with, so a
claim that changed since (re-created for another node) is never removed by a stale reader.

Every write first calls ``fence()`` (the leader's local check: raises when the term is
over or its renewal is overdue), so a deposed leader does not even send it. Malformed
objects (wrong name, unreadable spec) are logged, counted and skipped: a CIDR whose
object cannot be read is still taken, since its create keeps failing, and the allocator
never retries a CIDR whose claim was refused while the list does not show it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

from controlplane.crd.client import JSON, KubeClient
from controlplane.crd.errors import AlreadyExists, Conflict
from controlplane.crd.listwatch import EventType, KubeListWatcher, object_revision
from controlplane.crd.resources import POD_CIDRS
from controlplane.metrics import StoreMetrics
from controlplane.model import IPNetwork, ModelError, parse_cidr, parse_node_name
from controlplane.store_types import CIDRClaim, EventKind, StoreEvent, Versioned

log = logging.getLogger(__name__)

RESOURCE = "pod-cidr"
CLAIMED_BY = "controlplane.io/claimed-by"
"""Annotation: the operator replica (and its term) that created the claim, for humans."""


def claim_name(pool: str, cidr: IPNetwork) -> str:
    """The PodCIDR object's name for ``cidr`` of ``pool``."""
    if cidr.version == 4:
        address = str(cidr.network_address)
    else:
        address = cidr.network_address.exploded.replace(":", "-")
    return f"{pool}.{address}-{cidr.prefixlen}"


def parse_claim(obj: JSON) -> CIDRClaim:
    """The claim an object holds; ``ValueError`` (or ModelError) when it is malformed."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        raise ValueError("no spec")
    pool = spec.get("pool")
    if not isinstance(pool, str) or not pool:
        raise ValueError(f"bad pool {pool!r}")
    cidr = parse_cidr(str(spec.get("cidr")))
    node = parse_node_name(spec.get("node"))
    name = meta.get("name")
    if name != claim_name(pool, cidr):
        raise ValueError(f"name {name!r} does not match its CIDR {cidr} of pool {pool}")
    return CIDRClaim(pool, cidr, node)


class CrdCIDRStore:
    """Pod CIDR claims over the Kubernetes API (the operator leader writes, agents read)."""

    def __init__(
        self,
        client: KubeClient,
        metrics: StoreMetrics,
        *,
        fence: Callable[[], None] = lambda: None,
        writer: str = "",
    ) -> None:
        self.client = client
        self.metrics = metrics
        self.fence = fence
        self.writer = writer
        """Recorded in the ``claimed-by`` annotation of each claim created."""
        self._uids: dict[str, str] = {}
        """Object name -> uid, as last listed (the delete's second precondition)."""

    def _parse(self, obj: JSON) -> CIDRClaim | None:
        try:
            return parse_claim(obj)
        except (ValueError, ModelError) as exc:
            self.metrics.malformed.labels(RESOURCE).inc()
            name = (obj.get("metadata") or {}).get("name")
            log.warning("skipping malformed PodCIDR %r: %s", name, exc)
            return None

    async def list(self, pool: str) -> list[Versioned[CIDRClaim]]:
        listed = await self.client.list(POD_CIDRS)
        out: list[Versioned[CIDRClaim]] = []
        uids: dict[str, str] = {}
        for obj in listed.items:
            meta = obj.get("metadata") or {}
            claim = self._parse(obj)
            if claim is None or claim.pool != pool:
                continue
            uids[str(meta.get("name"))] = str(meta.get("uid") or "")
            out.append(Versioned(claim, object_revision(obj)))
        self._uids = uids
        return out

    async def claim(self, claim: CIDRClaim) -> bool:
        body: JSON = {
            "apiVersion": POD_CIDRS.api_version,
            "kind": POD_CIDRS.kind,
            "metadata": {
                "name": claim_name(claim.pool, claim.cidr),
                "annotations": {CLAIMED_BY: self.writer} if self.writer else {},
            },
            "spec": {"pool": claim.pool, "cidr": str(claim.cidr), "node": str(claim.node)},
        }
        self.fence()
        try:
            await self.client.create(POD_CIDRS, body)
        except AlreadyExists:
            return False
        return True

    async def free(self, claim: Versioned[CIDRClaim]) -> bool:
        name = claim_name(claim.value.pool, claim.value.cidr)
        self.fence()
        try:
            return await self.client.delete(
                POD_CIDRS,
                name,
                uid=self._uids.get(name) or None,
                resource_version=str(claim.version),
            )
        except Conflict:
            return False

    async def watch(self, pool: str) -> AsyncIterator[StoreEvent[CIDRClaim]]:
        async for event in KubeListWatcher(self.client, POD_CIDRS).events():
            if event.type is EventType.LIST_DONE:
                yield StoreEvent(EventKind.SYNCED, "", None, event.revision)
                continue
            claim = self._parse(event.object) if event.object is not None else None
            if event.type is EventType.DELETE:
                if claim is None or claim.pool == pool:
                    yield StoreEvent(EventKind.DELETE, event.key, claim, event.revision)
                continue
            if claim is not None and claim.pool == pool:
                yield StoreEvent(EventKind.UPSERT, event.key, claim, event.revision)
