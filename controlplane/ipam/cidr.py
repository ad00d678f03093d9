"""Per-node pod CIDRs from the cluster pool (the operator leader's side, store-agnostic).

The allocator keeps, in memory, which pool slice belongs to which node and hands each node
the lowest free slice. The store's create-only claim is the arbiter: when a claim loses
(another operator, a stale view, an unreadable key), the allocator re-reads the pool and
moves on, so a CIDR is never handed out twice, across restarts and racing allocators.

A node that ended up with several claims (two unfenced allocators raced for it) keeps its
earliest claim (lowest store version), which every racer agrees on; the others stay taken
until :meth:`ClusterPoolAllocator.release` frees all of the node's claims.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from controlplane.model import CIDRPool, IPNetwork, NodeName
from controlplane.store import CIDRClaim, CIDRStore, Versioned

log = logging.getLogger(__name__)

_RELEASE_ATTEMPTS = 8


class PoolExhausted(RuntimeError):
    """Every CIDR of the pool is in use."""


@dataclass(slots=True)
class _State:
    claims: dict[int, Versioned[CIDRClaim]] = field(default_factory=dict)
    """Pool index -> the claim on it (version 0: our own claim, not re-read yet)."""
    nodes: dict[NodeName, list[int]] = field(default_factory=dict)
    """Node -> its pool indices, the node's CIDR first (earliest claim)."""
    blocked: set[int] = field(default_factory=set)
    """Indices taken by something we cannot read (a malformed key, a claim of another mask
    that overlaps the slice): never handed out."""


class ClusterPoolAllocator:
    """Gives each node one CIDR of ``pool``; one instance per operator leader term."""

    def __init__(self, store: CIDRStore, pool: CIDRPool) -> None:
        self.store = store
        self.pool = pool
        self._state = _State()
        self._lost: set[int] = set()
        """Indices whose claim lost while the list did not show them (unreadable keys)."""
        self._low = 0
        """No index below this is free (a search hint)."""
        self._lock = asyncio.Lock()

    @property
    def in_use(self) -> int:
        """CIDRs of the pool that are taken (by nodes or by unreadable keys)."""
        state = self._state
        return len(state.claims.keys() | state.blocked | self._lost)

    def cidr_of(self, node: NodeName) -> IPNetwork | None:
        indices = self._state.nodes.get(node)
        return self.pool.cidr_at(indices[0]) if indices else None

    def allocations(self) -> dict[NodeName, IPNetwork]:
        """Every node's CIDR."""
        return {node: self.pool.cidr_at(idx[0]) for node, idx in self._state.nodes.items()}

    async def restore(self) -> None:
        """Rebuild the state from the store (on start and after becoming leader)."""
        async with self._lock:
            self._lost.clear()
            await self._refresh()

    async def allocate(self, node: NodeName, prefer: IPNetwork | None = None) -> IPNetwork:
        """The node's CIDR: its existing one, else ``prefer`` when it is a free CIDR of the
        pool (the one the node already uses, whose claim was lost), else the lowest free
        one, claimed."""
        async with self._lock:
            existing = self.cidr_of(node)
            if existing is not None:
                return existing
            if prefer is not None and self.pool.contains(prefer):
                preferred = self.pool.index_of(prefer)
                if not self._taken(preferred):
                    claim = CIDRClaim(self.pool.name, prefer, node)
                    if await self.store.claim(claim):
                        self._record(preferred, Versioned(claim, 0))
                        return prefer
                    self._lost.add(preferred)
            refreshed = False
            while True:
                index = self._lowest_free()
                if index is None:
                    if refreshed:
                        raise PoolExhausted(
                            f"pool {self.pool.name} ({self.pool.cidr} in /{self.pool.mask_size}) "
                            f"is exhausted: all {self.pool.size} CIDRs are in use"
                        )
                    # Our view may be stale (another operator freed some): look once more.
                    await self._refresh()
                    refreshed = True
                    existing = self.cidr_of(node)
                    if existing is not None:
                        return existing
                    continue
                cidr = self.pool.cidr_at(index)
                if await self.store.claim(CIDRClaim(self.pool.name, cidr, node)):
                    self._record(index, Versioned(CIDRClaim(self.pool.name, cidr, node), 0))
                    return cidr
                # Lost the race for this CIDR: re-read everything (someone else is writing),
                # and never retry this index while it stays unreadable to us.
                log.info("CIDR %s of pool %s was taken; re-reading the pool", cidr, self.pool.name)
                self._lost.add(index)
                await self._refresh()
                refreshed = True
                existing = self.cidr_of(node)
                if existing is not None:
                    return existing  # another allocator gave this node a CIDR meanwhile

    async def release(self, node: NodeName) -> None:
        """Free every CIDR claimed for ``node`` (each delete guarded by its version)."""
        async with self._lock:
            for _ in range(_RELEASE_ATTEMPTS):
                indices = self._state.nodes.get(node, [])
                claims = [self._state.claims[i] for i in indices]
                if any(c.version == 0 for c in claims):
                    # Our own claim: its version is unknown until the pool is re-read.
                    await self._refresh()
                    continue
                if not claims:
                    return
                freed = [await self.store.free(claim) for claim in claims]
                for index, ok in zip(indices, freed, strict=True):
                    if ok:
                        self._state.claims.pop(index, None)
                        self._low = min(self._low, index)
                remaining = [i for i in indices if i in self._state.claims]
                if not remaining:
                    self._state.nodes.pop(node, None)
                    return
                await self._refresh()  # a claim changed under us: look again
            raise RuntimeError(f"the CIDR claims of {node} kept changing; could not free them")

    # -- state -----------------------------------------------------------------------

    def _taken(self, index: int) -> bool:
        state = self._state
        return index in state.claims or index in state.blocked or index in self._lost

    def _lowest_free(self) -> int | None:
        index = self._low
        while index < self.pool.size and self._taken(index):
            index += 1
        self._low = index
        return index if index < self.pool.size else None

    def _record(self, index: int, claim: Versioned[CIDRClaim]) -> None:
        self._state.claims[index] = claim
        self._state.nodes.setdefault(claim.value.node, []).append(index)

    async def _refresh(self) -> None:
        claims = await self.store.list(self.pool.name)
        state = _State()
        for claim in sorted(claims, key=lambda c: c.version):
            cidr = claim.value.cidr
            if self.pool.contains(cidr):
                index = self.pool.index_of(cidr)
                state.claims[index] = claim
                state.nodes.setdefault(claim.value.node, []).append(index)
                continue
            overlapped = self._overlapped(cidr)
            if overlapped:
                log.warning(
                    "claim %s of %s in pool %s is not a /%d of %s; its %d slice(s) stay unused",
                    cidr,
                    claim.value.node,
                    self.pool.name,
                    self.pool.mask_size,
                    self.pool.cidr,
                    len(overlapped),
                )
                state.blocked |= overlapped
            else:
                log.warning("claim %s of pool %s lies outside %s", cidr, self.pool.name, self.pool)
        for node, indices in state.nodes.items():
            if len(indices) > 1:
                log.warning(
                    "node %s holds %d CIDRs of pool %s; it keeps %s (the earliest claim)",
                    node,
                    len(indices),
                    self.pool.name,
                    self.pool.cidr_at(indices[0]),
                )
        # A lost index that the list shows is marked by its claim; keep only unreadable ones.
        self._lost -= state.claims.keys()
        self._state = state
        self._low = 0

    def _overlapped(self, cidr: IPNetwork) -> set[int]:
        """Pool indices whose slice overlaps ``cidr`` (a claim of another mask size)."""
        pool = self.pool.cidr
        if cidr.version != pool.version or not cidr.overlaps(pool):
            return set()
        base = int(pool.network_address)
        shift = pool.max_prefixlen - self.pool.mask_size
        first = max(int(cidr.network_address), base) - base
        last = min(int(cidr.broadcast_address), int(pool.broadcast_address)) - base
        return set(range(first >> shift, (last >> shift) + 1))
