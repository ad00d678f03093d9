"""Endpoint IPs from the node's pod CIDR (the agent's side, store-agnostic).

Candidates are :func:`~controlplane.model.usable_ips` of the CIDR (no network, broadcast or
router address). The allocator goes round-robin from the last IP it handed out, so an IP
that was just freed is not reused at once (a peer may still have it cached). Each IP is
claimed create-only in the store; a lost claim (a key left by someone else) marks the IP
taken and the next candidate is tried. One lock guards pick and claim, so concurrent
``allocate`` calls in one process never pick the same IP.
"""

from __future__ import annotations

import asyncio
import logging

from controlplane.model import (
    EndpointID,
    IPAddress,
    IPLease,
    IPNetwork,
    NodeName,
    is_usable_ip,
    usable_ip_count,
    usable_ips,
)
from controlplane.store import IPLeaseStore

log = logging.getLogger(__name__)


class CIDRExhausted(RuntimeError):
    """Every usable IP of the node's CIDR is leased."""


class NodeIPAllocator:
    """The IPs of one node's endpoints; run :meth:`restore` once before allocating."""

    def __init__(self, store: IPLeaseStore, cidr: IPNetwork, node: NodeName) -> None:
        self.store = store
        self.cidr = cidr
        self.node = node
        self._count = usable_ip_count(cidr)
        self._first: IPAddress | None = next(usable_ips(cidr), None)
        self._leases: dict[IPAddress, EndpointID] = {}
        self._by_owner: dict[EndpointID, IPAddress] = {}
        self._lost: set[IPAddress] = set()
        """IPs whose claim lost (a key we did not write): not tried again until restore."""
        self._cursor = -1
        """Offset (among the usable IPs) of the last IP handed out."""
        self._lock = asyncio.Lock()

    @property
    def capacity(self) -> int:
        return self._count

    def leases(self) -> dict[IPAddress, EndpointID]:
        """IP -> endpoint id of every lease this node holds."""
        return dict(self._leases)

    def ip_of(self, owner: EndpointID) -> IPAddress | None:
        return self._by_owner.get(owner)

    async def restore(self) -> None:
        """Take over this node's leases after a (re)start: keep and re-attach those inside
        the CIDR, release the others."""
        async with self._lock:
            listed = await self.store.list()
            keep = [v for v in listed if is_usable_ip(self.cidr, v.value.ip)]
            for versioned in listed:
                lease = versioned.value
                if not is_usable_ip(self.cidr, lease.ip):
                    log.warning(
                        "releasing lease %s of %s on %s: not a usable IP of %s",
                        lease.ip,
                        lease.owner,
                        self.node,
                        self.cidr,
                    )
                    await self.store.release(lease.ip)
            await self.store.adopt([v.value for v in keep])
            self._leases.clear()
            self._by_owner.clear()
            self._lost.clear()
            for versioned in sorted(keep, key=lambda v: v.version):
                self._add(versioned.value.ip, versioned.value.owner)
            if keep:
                # Continue after the most recently written lease.
                latest = max(keep, key=lambda v: v.version).value.ip
                self._cursor = self._offset(latest)

    async def allocate(self, owner: EndpointID) -> IPAddress:
        """An IP for ``owner``: the one it holds already, else the next free one, claimed."""
        async with self._lock:
            held = self._by_owner.get(owner)
            if held is not None:
                return held
            while True:
                if self._first is None or len(self._leases) + len(self._lost) >= self._count:
                    raise CIDRExhausted(
                        f"no free IP in {self.cidr} on {self.node}: "
                        f"{len(self._leases)} leased, {len(self._lost)} taken by others, "
                        f"{self._count} usable"
                    )
                offset = self._next_free()
                ip = self._first + offset
                self._cursor = offset
                if await self.store.claim(IPLease(node=self.node, ip=ip, owner=owner)):
                    self._add(ip, owner)
                    return ip
                log.warning("IP %s on %s is leased by someone else; skipping it", ip, self.node)
                self._lost.add(ip)

    async def release(self, ip: IPAddress) -> None:
        """Give ``ip`` back (its lease is deleted from the store first)."""
        async with self._lock:
            await self.store.release(ip)
            self._lost.discard(ip)
            owner = self._leases.pop(ip, None)
            if owner is not None and self._by_owner.get(owner) == ip:
                del self._by_owner[owner]
                other = next((i for i, o in self._leases.items() if o == owner), None)
                if other is not None:
                    self._by_owner[owner] = other

    # -- state -----------------------------------------------------------------------

    def _add(self, ip: IPAddress, owner: EndpointID) -> None:
        self._leases[ip] = owner
        held = self._by_owner.setdefault(owner, ip)
        if held != ip:
            log.warning("endpoint %s holds two IPs on %s: %s and %s", owner, self.node, held, ip)

    def _offset(self, ip: IPAddress) -> int:
        assert self._first is not None
        return int(ip) - int(self._first)

    def _next_free(self) -> int:
        """The first free offset after the cursor, wrapping (some offset must be free)."""
        assert self._first is not None
        offset = self._cursor
        while True:
            offset = (offset + 1) % self._count
            ip = self._first + offset
            if ip not in self._leases and ip not in self._lost:
                return offset
