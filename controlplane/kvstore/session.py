"""Leases of one owner on one etcd cluster: grant, keep alive, spread keys, report loss.

An owner (an agent's node, endpoints and identity references) attaches its keys to leases
from here. Each lease carries at most ``max_keys_per_lease`` keys, so losing one lease
costs at most that many re-creations, and etcd never has to expire a huge lease at once.
A lease is lost when etcd says its TTL is gone, or when no keepalive succeeded for a whole
TTL of our monotonic clock; then every ``on_lost`` callback gets the keys that were on it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from aetcd import rpc

from controlplane.kvstore.backend import EtcdBackend
from controlplane.kvstore.errors import KvstoreError, channel_closed, translate

log = logging.getLogger(__name__)

LostCallback = Callable[[int, frozenset[bytes]], Awaitable[None]]


@dataclass(slots=True)
class _Lease:
    id: int
    ttl: int
    expires: float
    """Local monotonic time by which etcd will have expired it without a keepalive."""
    keys: set[bytes] = field(default_factory=set)


class LeaseManager:
    """Owns a pool of leases on one cluster; run :meth:`run` in the owner's TaskGroup."""

    def __init__(
        self,
        backend: EtcdBackend,
        *,
        ttl: int = 900,
        max_keys_per_lease: int = 1000,
        keepalive_interval: float | None = None,
    ) -> None:
        if ttl < 2:
            raise ValueError("lease ttl must be at least 2 seconds")
        self.backend = backend
        self.ttl = ttl
        self.max_keys_per_lease = max_keys_per_lease
        # Renew often, not only at ttl/3: a lost lease is noticed at the next renewal.
        self.keepalive_interval = keepalive_interval or max(0.5, min(ttl / 3, 5.0))
        self.lost_total = 0
        self.keepalives_total = 0
        self._leases: dict[int, _Lease] = {}
        self._key_lease: dict[bytes, int] = {}
        self._grant_lock = asyncio.Lock()
        self._callbacks: list[LostCallback] = []

    def on_lost(self, callback: LostCallback) -> None:
        self._callbacks.append(callback)

    @property
    def leases(self) -> dict[int, int]:
        """Lease id -> number of keys on it."""
        return {lease.id: len(lease.keys) for lease in self._leases.values()}

    async def lease_for(self, key: bytes) -> int:
        """The lease to attach ``key`` to (the same one while it lives)."""
        current = self._key_lease.get(key)
        if current is not None and current in self._leases:
            return current
        async with self._grant_lock:
            lease = next(
                (le for le in self._leases.values() if len(le.keys) < self.max_keys_per_lease), None
            )
            if lease is None:
                granted = await self.backend.grant(self.ttl)
                lease = _Lease(granted.id, granted.ttl, time.monotonic() + granted.ttl)
                self._leases[lease.id] = lease
                log.debug(
                    "granted lease %x (ttl %ds) on %s", lease.id, lease.ttl, self.backend.name
                )
            lease.keys.add(key)
            self._key_lease[key] = lease.id
            return lease.id

    def forget(self, key: bytes) -> None:
        """The owner deleted ``key``; its slot on the lease is free again."""
        lease_id = self._key_lease.pop(key, None)
        if lease_id is not None and lease_id in self._leases:
            self._leases[lease_id].keys.discard(key)

    async def run(self) -> None:
        """Keep every lease alive until cancelled."""
        failures = 0
        while True:
            try:
                await self._keepalive_stream()
            except KvstoreError as exc:
                failures += 1
                log.info("lease keepalive on %s failed (%s); retrying", self.backend.name, exc)
                await self._expire_overdue()
                await asyncio.sleep(min(self.keepalive_interval, 0.1 * 2**failures))

    async def _keepalive_stream(self) -> None:
        call = self.backend.keepalive_stream()
        try:
            while True:
                for lease in list(self._leases.values()):
                    await call.write(rpc.LeaseKeepAliveRequest(ID=lease.id))
                    sent = time.monotonic()
                    # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel.
                    async with asyncio.timeout(self.backend.settings.request_timeout):
                        response = await call.read()
                    if response is grpc.aio.EOF:
                        raise KvstoreError("lease keepalive stream ended")
                    if response.ID not in self._leases:
                        continue
                    if response.TTL <= 0:
                        await self._lost(response.ID, "expired or revoked")
                    else:
                        self._leases[response.ID].expires = sent + response.TTL
                        self.keepalives_total += 1
                await asyncio.sleep(self.keepalive_interval)
        except grpc.aio.AioRpcError as exc:
            raise translate(exc, self.backend.name) from exc
        except TimeoutError as exc:
            raise KvstoreError("lease keepalive timed out") from exc
        except asyncio.InvalidStateError as exc:  # grpc: write after the stream ended
            raise KvstoreError("lease keepalive stream ended") from exc
        except asyncio.CancelledError:
            if (closed := channel_closed(self.backend.name)) is None:
                raise
            raise closed from None
        finally:
            call.cancel()

    async def invalidate(self, lease_id: int) -> None:
        """etcd refused ``lease_id`` on a write: treat it as lost now."""
        await self._lost(lease_id, "refused by etcd")

    async def _expire_overdue(self) -> None:
        now = time.monotonic()
        for lease in list(self._leases.values()):
            if now >= lease.expires:
                await self._lost(lease.id, "no keepalive succeeded within its TTL")

    async def _lost(self, lease_id: int, why: str) -> None:
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return
        self.lost_total += 1
        for key in lease.keys:
            if self._key_lease.get(key) == lease_id:
                del self._key_lease[key]
        log.warning(
            "lease %x on %s lost (%s): %d keys to re-create",
            lease_id,
            self.backend.name,
            why,
            len(lease.keys),
        )
        keys = frozenset(lease.keys)
        for callback in self._callbacks:
            await callback(lease_id, keys)

    async def revoke_all(self) -> None:
        """Revoke every lease (clean shutdown of a short-lived owner); keys go with them."""
        for lease_id in list(self._leases):
            self._leases.pop(lease_id)
            try:
                await self.backend.revoke(lease_id)
            except KvstoreError as exc:
                log.info("revoking lease %x failed: %s", lease_id, exc)
        self._key_lease.clear()
