"""CIDR claims in a double-write mode: allocated in the read store, written under the same
CIDR to the other.

:class:`DoubleWriteCIDRs` is the :class:`~controlplane.store.CIDRStore` the read store's
allocator uses. A claim lands in the read store first (the arbiter, as in one mode), then
in the other:

- the other already holds that claim (a copy by ``cpctl migrate``): nothing to write;
- the other holds the CIDR for another node: a **conflict**; the read store's claim is
  undone and the claim lost (the allocator moves on to the next CIDR, free in both);
- the other holds the node under another CIDR: a **conflict**; the read store's claim is
  undone and the allocation refused
  (:class:`~controlplane.store_types.DoubleWriteConflict`: the node gets no CIDR until
  the drift is resolved, e.g. by ``cpctl migrate``);

both counted in ``cp_doublewrite_conflicts_total{resource="cidr"}`` and logged;
- the other's write fails (an outage): the read store's claim is undone
  (``cp_doublewrite_undone_total{resource="cidr"}``) and the error raised: the
  allocation job restarts, as for any store error. An undo that fails too leaves a claim
  the other lacks: :meth:`reconcile`, run at the start of every allocation job, writes
  it there.

Reads (list, watch) are the read store's. A free frees the read store's claim, then the
other's; a free the other refuses or fails is left to the node GC, which collects a gone
node's claims in the other store too.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from controlplane.metrics import DoubleWriteMetrics
from controlplane.model import IPNetwork
from controlplane.store import CIDRClaim, CIDRStore
from controlplane.store_types import DoubleWriteConflict, StoreError, StoreEvent, Versioned

__all__ = ["DoubleWriteCIDRs"]

log = logging.getLogger("cp-operator")

RESOURCE = "cidr"


class DoubleWriteCIDRs:
    """The read store's claims, each written to the other store too."""

    def __init__(self, read: CIDRStore, other: CIDRStore, metrics: DoubleWriteMetrics) -> None:
        self.read = read
        self.other = other
        self.metrics = metrics

    async def list(self, pool: str) -> list[Versioned[CIDRClaim]]:
        return await self.read.list(pool)

    def watch(self, pool: str) -> AsyncIterator[StoreEvent[CIDRClaim]]:
        return self.read.watch(pool)

    async def claim(self, claim: CIDRClaim) -> bool:
        if not await self.read.claim(claim):
            return False
        try:
            conflict = await self._write_other(claim)
        except BaseException as exc:
            if isinstance(exc, StoreError):
                self.metrics.undone.labels(RESOURCE).inc()
            await self._undo(claim)
            raise
        if conflict is None:
            return True
        reason, node_elsewhere = conflict
        self.metrics.conflicts.labels(RESOURCE).inc()
        await self._undo(claim)
        message = f"CIDR {claim.cidr} for node {claim.node} not double-written: {reason}"
        log.error("%s", message)
        if node_elsewhere:
            raise DoubleWriteConflict(message)
        return False  # the CIDR is taken there: the allocator tries the next one

    async def free(self, claim: Versioned[CIDRClaim]) -> bool:
        if not await self.read.free(claim):
            return False
        try:
            there = _by_cidr(await self.other.list(claim.value.pool)).get(claim.value.cidr)
            if there is not None and there.value.node == claim.value.node:
                await self.other.free(there)
        except StoreError as exc:  # the node GC collects it there
            log.warning("freeing CIDR %s in the other store: %s", claim.value.cidr, exc)
        return True

    async def reconcile(self, pool: str) -> int:
        """Write to the other store the read store's claims it lacks (conflicts counted
        and logged, never overwritten); the number written."""
        other = await self.other.list(pool)
        written = 0
        for claim in await self.read.list(pool):
            if _holds(other, claim.value):
                continue
            conflict = await self._write_other(claim.value)
            if conflict is not None:
                self.metrics.conflicts.labels(RESOURCE).inc()
                log.error(
                    "CIDR %s of node %s is not in the other store: %s",
                    claim.value.cidr,
                    claim.value.node,
                    conflict[0],
                )
                continue
            written += 1
            self.metrics.repairs.labels(RESOURCE).inc()
        if written:
            log.info("wrote %d CIDR claim(s) of the read store to the other store", written)
        return written

    async def _write_other(self, claim: CIDRClaim) -> tuple[str, bool] | None:
        """Claim in the other store; None when it holds the claim now, else the conflict
        and whether it is the node's (held there under another CIDR)."""
        listed = await self.other.list(claim.pool)
        if _holds(listed, claim):
            return None
        conflict = _conflict(listed, claim)
        if conflict is not None:
            return conflict
        if await self.other.claim(claim):
            return None
        return _conflict(await self.other.list(claim.pool), claim) or (
            "its claim was refused",
            False,
        )

    async def _undo(self, claim: CIDRClaim) -> None:
        try:
            for mine in await self.read.list(claim.pool):
                if mine.value == claim:
                    await self.read.free(mine)
        except StoreError as exc:
            log.warning("undoing the claim of CIDR %s: %s", claim.cidr, exc)


def _by_cidr(claims: list[Versioned[CIDRClaim]]) -> dict[IPNetwork, Versioned[CIDRClaim]]:
    return {c.value.cidr: c for c in claims}


def _holds(claims: list[Versioned[CIDRClaim]], claim: CIDRClaim) -> bool:
    found = _by_cidr(claims).get(claim.cidr)
    return found is not None and found.value.node == claim.node


def _conflict(claims: list[Versioned[CIDRClaim]], claim: CIDRClaim) -> tuple[str, bool] | None:
    found = _by_cidr(claims).get(claim.cidr)
    if found is not None and found.value.node != claim.node:
        return f"the other store has it for node {found.value.node}", False
    theirs = [c.value.cidr for c in claims if c.value.node == claim.node]
    if theirs:
        return f"the other store has node {claim.node} under {', '.join(map(str, theirs))}", True
    return None
