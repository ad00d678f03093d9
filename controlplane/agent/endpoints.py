"""The node's endpoint lifecycle: what the agent owns, and publishing it to the store.

:class:`OwnedEndpoints` is the desired state, kept in memory across sessions: the endpoints
this node was asked for (namespace, name, labels) with the IP and identity they got, and
the node's pod CIDR. The local API's create and delete go through it.

:class:`EndpointPublisher` does the store work of one session: lease an IP, take the
identity reference, publish the record (and the reverse), and after a (re)start restore
everything: re-attach the IP leases, rebuild the owned endpoints from the node's own
records (a new process), re-publish them, and release what no owned endpoint holds. It
sees only the store Protocols, so it works the same over every store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from controlplane.agent.api import APIError
from controlplane.agent.store_session import Stores
from controlplane.identity.allocator import IdentityAllocator
from controlplane.ipam.node_ips import CIDRExhausted, NodeIPAllocator
from controlplane.model import (
    IDENTITY_HOST,
    Endpoint,
    EndpointID,
    Identity,
    IPAddress,
    IPNetwork,
    Labels,
    ModelError,
    NodeName,
    parse_endpoint_id,
)
from controlplane.policy.endpoint_id import EndpointIDError, endpoint_id
from controlplane.store_types import AddressConflict, StoreError

log = logging.getLogger(__name__)


class NotReady(APIError):
    def __init__(self, why: str) -> None:
        super().__init__(503, f"agent not ready: {why}")


@dataclass(slots=True)
class LocalEndpoint:
    """An endpoint this agent owns: what it was asked for, and what it got."""

    namespace: str
    name: str
    labels: Labels
    ip: IPAddress | None = None
    identity: Identity | None = None

    @property
    def id(self) -> EndpointID:
        return EndpointID(f"{self.namespace}/{self.name}")

    def to_json(self, node: NodeName, cidr: IPNetwork | None = None) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "name": self.name,
            "labels": self.labels.to_strings(),
            "ip": None if self.ip is None else str(self.ip),
            "identity": None if self.identity is None else int(self.identity.id),
            "node": str(node),
            "endpoint_id": self.endpoint_id(cidr),
        }

    def endpoint_id(self, cidr: IPNetwork | None) -> int | None:
        """The u32 id the tc program keys this endpoint's policy by (its IP's offset in the
        node's pod CIDR; see :mod:`controlplane.policy.endpoint_id`), None when unknown."""
        if cidr is None or self.ip is None:
            return None
        try:
            return endpoint_id(cidr, self.ip)
        except EndpointIDError:
            return None


@dataclass(slots=True)
class OwnedEndpoints:
    """The endpoints this node owns (the desired state, kept across sessions)."""

    node: NodeName
    host_ip: IPAddress
    changed: Callable[[], None]
    """Called after the set changed (the policy and the endpoint gauge follow it)."""
    items: dict[EndpointID, LocalEndpoint] = field(default_factory=dict)
    cidr: IPNetwork | None = None
    """The node's pod CIDR (from the operator), once known."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Held by every change of the set and of what the store holds for it."""
    rebuilt: bool = False
    """Rebuilt from the node's records in the store (once per process)."""
    leaving: dict[EndpointID, LocalEndpoint] = field(default_factory=dict)
    """Deleted endpoints whose withdrawal from the store failed in flight: no longer owned
    (what the store holds of them goes: the kvstore owner deletes it once etcd answers, a
    restore removes what no owned endpoint holds); a retried delete finishes them."""

    async def create(
        self,
        namespace: str,
        name: str,
        labels: Sequence[str],
        publisher: Callable[[], EndpointPublisher],
    ) -> tuple[dict[str, Any], bool]:
        """The endpoint as JSON (with ``write_issued_at``) and whether it was created.
        ``publisher`` gives the ready session's publisher or raises :class:`NotReady`."""
        try:
            eid = parse_endpoint_id(f"{namespace}/{name}")
            wanted = Labels.from_strings(labels)
            Endpoint(  # validate names before touching the store
                ip=self.host_ip,
                identity=IDENTITY_HOST,
                node=self.node,
                host_ip=self.host_ip,
                name=name,
                namespace=namespace,
            )
        except ModelError as exc:
            raise APIError(400, str(exc)) from None
        reason = publisher().unavailable(wanted)
        if reason is not None and eid not in self.items:
            raise APIError(503, f"store unavailable: {reason}")
        async with self.lock:
            session = publisher()
            existing = self.items.get(eid)
            if existing is not None:
                if existing.labels != wanted:
                    raise APIError(
                        409, f"endpoint {eid} exists with other labels ({existing.labels})"
                    )
                return existing.to_json(self.node, self.cidr), False
            local = LocalEndpoint(namespace, name, wanted)
            try:
                leaving = self.leaving.pop(eid, None)
                if leaving is not None:  # deleted, not withdrawn yet: finish that first
                    try:
                        await session.withdraw(leaving)
                    except StoreError:
                        self.leaving[eid] = leaving
                        raise
                issued = await session.publish(local)
            except CIDRExhausted as exc:
                raise APIError(503, str(exc)) from None
            except StoreError as exc:
                raise APIError(503, f"store: {exc}") from None
            self.items[eid] = local
            self.changed()
            # When the endpoint's store write was issued, on the host-wide monotonic clock
            # (benchmarks compare it with other agents' map write times).
            return {**local.to_json(self.node, self.cidr), "write_issued_at": issued}, True

    async def delete(
        self, namespace: str, name: str, publisher: Callable[[], EndpointPublisher]
    ) -> bool:
        """Withdraw the endpoint. When the store fails in flight the endpoint is no longer
        owned either way (the store follows, see ``leaving``), and the 503 makes the
        runtime retry, which finishes the withdrawal."""
        eid = EndpointID(f"{namespace}/{name}")
        known = self.items.get(eid) or self.leaving.get(eid)
        if known is None:
            return False
        reason = publisher().unavailable(known.labels)
        if reason is not None:
            raise APIError(503, f"store unavailable: {reason}")
        async with self.lock:
            session = publisher()
            local = self.items.pop(eid, None)
            if local is not None:
                self.changed()
            else:
                local = self.leaving.pop(eid, None)
                if local is None:
                    return False
            try:
                await session.withdraw(local)
            except StoreError as exc:
                self.leaving[eid] = local
                raise APIError(503, f"store: {exc}") from None
            return True

    def to_json(self) -> list[dict[str, Any]]:
        return [e.to_json(self.node, self.cidr) for _, e in sorted(self.items.items())]


class EndpointPublisher:
    """One session's store work for the owned endpoints."""

    def __init__(
        self,
        owned: OwnedEndpoints,
        stores: Stores,
        unavailable: Callable[[Labels], str | None],
    ) -> None:
        self.owned = owned
        self.stores = stores
        self.unavailable = unavailable
        """Why the store cannot take a new endpoint with these labels now (fail fast)."""
        self.identities = IdentityAllocator(stores.identities)
        self._ips: NodeIPAllocator | None = None

    def use_cidr(self, cidr: IPNetwork) -> None:
        """The node's pod CIDR is known: endpoints' IPs are leased from it from now on."""
        self._ips = NodeIPAllocator(self.stores.leases, cidr, self.owned.node)

    @property
    def ips(self) -> NodeIPAllocator:
        if self._ips is None:
            raise RuntimeError("no pod CIDR yet")  # the session publishes only once it has one
        return self._ips

    async def publish(self, local: LocalEndpoint) -> float:
        """Lease the IP, take the identity reference, publish the record (idempotent).

        Returns when the endpoint's write request to the store was issued (host-wide
        monotonic clock; after the reads that guard it: the store stamps it).
        """
        node = self.owned.node
        ip = await self.ips.allocate(local.id)
        try:
            identity = await self.identities.acquire(local.labels)
        except Exception:
            if local.ip is None:
                with contextlib.suppress(StoreError):
                    await self.ips.release(ip)
            raise
        if local.ip is not None and local.ip != ip:
            log.warning("%s: endpoint %s moved from %s to %s", node, local.id, local.ip, ip)
        endpoint = Endpoint(
            ip=ip,
            identity=identity.id,
            node=node,
            host_ip=self.owned.host_ip,
            name=local.name,
            namespace=local.namespace,
        )
        try:
            issued = await self.stores.endpoints.upsert(endpoint)
        except Exception:
            if local.ip is None:
                # A new endpoint's caller is told it failed: nothing of it may stay, not
                # even a record whose write timed out but lands later (the kvstore owner
                # deletes such a record once etcd answers).
                await self._unwind(ip, local.labels)
            raise
        local.ip = ip
        local.identity = identity
        return issued

    async def _unwind(self, ip: IPAddress, labels: Labels) -> None:
        """Undo a new endpoint's publish that failed: its record, identity reference and
        IP lease, each independently and best effort (a failed step is the store's to
        finish: the kvstore owner deletes what it gave up once etcd answers)."""

        async def step(call: Awaitable[object]) -> None:
            with contextlib.suppress(StoreError):
                await call

        # the record first: a record must not outlive the lease of its IP
        await step(self.stores.endpoints.remove(ip))
        await asyncio.gather(step(self.identities.release(labels)), step(self.ips.release(ip)))

    async def withdraw(self, local: LocalEndpoint) -> None:
        if local.ip is not None:
            await self.stores.endpoints.remove(local.ip)
            await self.ips.release(local.ip)
        await self.identities.release(local.labels)

    async def withdraw_all(self) -> None:
        """``--cleanup-on-exit``: withdraw every owned endpoint (best effort)."""
        if self._ips is None:
            return
        for local in list(self.owned.items.values()):
            with contextlib.suppress(StoreError):
                await self.withdraw(local)

    def identity_changed(self, old: Identity, new: Identity) -> None:
        """An identity we reference got another number: follow it (re-publish after)."""
        self.identities.identity_changed(old, new)
        for local in self.owned.items.values():
            if local.identity == old:
                local.identity = new

    async def restore(self) -> None:
        """Re-attach leases, rebuild (new process) and re-publish what the node owns, then
        release what no owned endpoint holds."""
        owned = self.owned
        node = owned.node
        async with owned.lock:
            await self.ips.restore()
            # fresh local counts: every owned endpoint acquires again below (a retried
            # restore must not count the same endpoint twice)
            self.identities = IdentityAllocator(self.stores.identities)
            mine = [v.value for v in await self.stores.endpoints.list() if v.value.node == node]
            if not owned.rebuilt:
                leased = set(self.ips.leases().values())
                for record in mine:
                    eid = record.endpoint_id
                    if eid in owned.items or eid not in leased:
                        continue
                    found = await self.stores.identities.get(record.identity)
                    if found is None:
                        log.warning("%s: identity %d of %s is gone", node, record.identity, eid)
                        continue
                    owned.items[eid] = LocalEndpoint(
                        record.namespace, record.name, found.value.labels, record.ip
                    )
                owned.rebuilt = True
                log.info("%s: rebuilt %d endpoints from the store", node, len(owned.items))
            for _, local in sorted(owned.items.items()):
                try:
                    await self.publish(local)
                except AddressConflict as exc:  # another node publishes the IP: keep going
                    log.error("%s: endpoint %s not re-published: %s", node, local.id, exc)
            for ip, holder in self.ips.leases().items():
                held = owned.items.get(holder)
                if held is None or held.ip != ip:
                    await self.ips.release(ip)
            for record in mine:
                held = owned.items.get(record.endpoint_id)
                if held is None or held.ip != record.ip:
                    await self.stores.endpoints.remove(record.ip)
            owned.leaving.clear()  # their records and IP leases went just above
            owned.changed()
