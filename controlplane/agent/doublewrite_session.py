"""The agent's double-write modes (``--store doublewrite-readcrd`` and
``doublewrite-readkvstore``): a migration step between CRD mode and kvstore mode.

A :class:`DoubleWriteConnector` opens one session of each mode per generation: the
*read* store (the named one) and the *other*. Everything the agent reads (lists,
watches: the ipcache, policies, services, its CIDR) comes from the read store; every
write goes to the read store first, then to the other:

- **Identities keep one number across both stores.** ``acquire`` allocates (or finds) the
  identity in the read store, creates that same number for that label set in the other
  (create-only, through the other session's copier), then takes this node's reference
  there (``acquire`` again, which must find that number). When the other store holds the
  number for other labels, or the labels under another number, the acquire fails with
  :class:`DoubleWriteConflict` (the read store's reference is released), is counted in
  ``cp_doublewrite_conflicts_total{resource="identity"}`` and logged: the endpoint is not
  created (its API call fails), nothing drifts silently.
- **An IP lease** is claimed in both; when the other refuses it or fails, the read
  store's claim is released and the claim fails.
- **An endpoint** is published in both. When the other fails for a *new* endpoint (its
  IP was claimed in this session) the read store's record is withdrawn and the publish
  fails (the agent then releases the IP and identity as for any failed publish); for one
  already live (re-published after a restart, whose lease was adopted; an identity
  change) the read store keeps it and the write to the other is *repaired*: queued and
  retried every second until it lands (``cp_doublewrite_pending``,
  ``cp_doublewrite_repairs_total``), since withdrawing a live endpoint would cut its
  traffic.
- Removals, node registration, lease adoption and release, policies and services: the
  read store, then the other; a failure on the other is queued for repair the same way.

Once the session is ready, this node's IP leases and endpoints that the other store has
and the read store lacks are withdrawn from the other store (a process stopped between
its two writes, or a switch of the read store, leaves such records).

The other mode's session runs its own background work (kvstore: leases and their
keepalives, owned-key repair; CRD: self-repair loops), but it never restarts the agent:
its ``RestartNeeded`` is logged and its health is shown beside the read store's. When the
other store is the kvstore, its heartbeat is not judged (no kvstore-mode operator need
run in this step; its quorum checks still are); new endpoints fail fast (503) while
either store's check fails.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from functools import partial
from typing import Any, Protocol, cast

from controlplane.agent.health import ShardHealth
from controlplane.agent.metrics import AgentMetrics
from controlplane.agent.store_session import (
    RestartNeeded,
    StoreConnector,
    Stores,
    StoreSession,
)
from controlplane.metrics import DoubleWriteMetrics
from controlplane.model import (
    Endpoint,
    Identity,
    IPAddress,
    IPIdentity,
    IPLease,
    Labels,
    Node,
    NodeName,
    NumericIdentity,
)
from controlplane.store import (
    EndpointStore,
    IdentityStore,
    IPLeaseStore,
    NodeStore,
    PolicyStore,
    ServiceStore,
)
from controlplane.store_types import DoubleWriteConflict, StoreError, StoreEvent, Versioned

__all__ = ["DoubleWriteConflict", "DoubleWriteConnector", "DoubleWriteSession"]

log = logging.getLogger(__name__)

REPAIR_INTERVAL = 1.0


class IdentityCopier(Protocol):
    """What a session offers to create an identity under a given number (``copier``)."""

    async def write_identity(self, identity: Identity, users: Sequence[NodeName]) -> str | None: ...


class _Repairs:
    """Writes to the other store that failed: retried until they land (latest per key)."""

    def __init__(self, node: str, metrics: DoubleWriteMetrics) -> None:
        self.node = node
        self.metrics = metrics
        self._jobs: dict[tuple[str, str], Callable[[], Awaitable[object]]] = {}

    def queue(self, resource: str, key: str, job: Callable[[], Awaitable[object]]) -> None:
        self._jobs[(resource, key)] = job
        self.metrics.pending.set(len(self._jobs))

    def drop(self, resource: str, key: str) -> None:
        self._jobs.pop((resource, key), None)
        self.metrics.pending.set(len(self._jobs))

    def __len__(self) -> int:
        return len(self._jobs)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(REPAIR_INTERVAL)
            for (resource, key), job in list(self._jobs.items()):
                try:
                    await job()
                except (StoreError, TimeoutError) as exc:
                    log.debug("%s: repair of %s %s failed again: %s", self.node, resource, key, exc)
                    continue
                if self._jobs.get((resource, key)) is job:
                    del self._jobs[(resource, key)]
                self.metrics.repairs.labels(resource).inc()
                log.info("%s: %s %s repaired in the other store", self.node, resource, key)
            self.metrics.pending.set(len(self._jobs))

    async def attempt(self, resource: str, key: str, job: Callable[[], Awaitable[object]]) -> None:
        """Run ``job`` now; on a store error, queue it (and log) instead of raising."""
        self.drop(resource, key)
        try:
            await job()
        except (StoreError, TimeoutError) as exc:
            log.warning(
                "%s: writing %s %s to the other store failed (%s); will repair",
                self.node,
                resource,
                key,
                exc,
            )
            self.queue(resource, key, job)


class DoubleWriteConnector:
    """Opens a double-write session per generation: one session of each store."""

    def __init__(
        self,
        read: StoreConnector,
        other: StoreConnector,
        metrics: AgentMetrics,
        node: NodeName,
    ) -> None:
        self.read = read
        self.other = other
        self.node = node
        self.metrics = DoubleWriteMetrics(metrics.registry)

    @property
    def describe(self) -> str:
        return f"double-write: read {self.read.describe}; also write {self.other.describe}"

    def open(self, generation: int) -> DoubleWriteSession:
        return DoubleWriteSession(self, self.read.open(generation), self.other.open(generation))


class DoubleWriteSession:
    """One generation: the read store's session and the other's, their stores combined."""

    def __init__(
        self, connector: DoubleWriteConnector, read: StoreSession, other: StoreSession
    ) -> None:
        self.connector = connector
        self.read = read
        self.other = other
        node = connector.node
        self.repairs = _Repairs(node, connector.metrics)
        self._ready = asyncio.Event()
        copier = cast(IdentityCopier, getattr(other, "copier"))  # noqa: B009 (see module doc)
        r, o = read.stores, other.stores
        m = connector.metrics
        endpoints = _Endpoints(r.endpoints, o.endpoints, self.repairs, m)
        self._stores = Stores(
            identities=_Identities(r.identities, o.identities, copier, node, m),
            endpoints=endpoints,
            nodes=_Nodes(r.nodes, o.nodes, self.repairs),
            cidrs=r.cidrs,  # the operator's: read only (the read store's)
            leases=_Leases(r.leases, o.leases, self.repairs, m, endpoints.fresh),
            policies=_Configs(r.policies, o.policies, self.repairs, "policy"),
            services=(
                _Configs(r.services, o.services, self.repairs, "service")
                if r.services is not None and o.services is not None
                else r.services
            ),
        )

    @property
    def stores(self) -> Stores:
        return self._stores

    async def connect(self) -> None:
        await self.read.connect()
        await self.other.connect()

    def tasks(self) -> Mapping[str, Callable[[], Awaitable[None]]]:
        tasks: dict[str, Callable[[], Awaitable[None]]] = dict(self.read.tasks())
        for name, job in self.other.tasks().items():
            tasks[f"other:{name}"] = self._never_restarts(name, job)
        tasks["doublewrite-repairs"] = self.repairs.run
        tasks["doublewrite-reconcile"] = self._reconcile
        return tasks

    async def _reconcile(self) -> None:
        """Once the session is ready (restored from the read store): withdraw from the
        other store this node's IP leases and endpoints that the read store does not have
        (left by a process stopped between its two writes, or by the previous read mode).
        The other store is listed first, so a write racing with this (read store first)
        is always seen in the read store's list."""
        await self._ready.wait()
        while True:
            try:
                await self._withdraw_stale()
                break
            except (StoreError, TimeoutError) as exc:
                log.warning("%s: reconciling the other store: %s", self.connector.node, exc)
                await asyncio.sleep(REPAIR_INTERVAL)
        await asyncio.Event().wait()  # a session task runs until the session ends

    async def _withdraw_stale(self) -> None:
        node = self.connector.node
        r, o = self.read.stores, self.other.stores
        other_leases = [v.value.ip for v in await o.leases.list()]
        other_eps = [v.value.ip for v in await o.endpoints.list() if v.value.node == node]
        read_leases = {v.value.ip for v in await r.leases.list()}
        read_eps = {v.value.ip for v in await r.endpoints.list() if v.value.node == node}
        stale_eps = [ip for ip in other_eps if ip not in read_eps]
        stale_leases = [ip for ip in other_leases if ip not in read_leases]
        for ip in stale_eps:
            await self.repairs.attempt("endpoint", str(ip), partial(o.endpoints.remove, ip))
        for ip in stale_leases:
            await self.repairs.attempt("ip-lease", str(ip), partial(o.leases.release, ip))
        if stale_eps or stale_leases:
            log.info(
                "%s: withdrew %d endpoint(s) and %d IP lease(s) from the other store that "
                "the read store does not have",
                node,
                len(stale_eps),
                len(stale_leases),
            )

    def _never_restarts(
        self, name: str, job: Callable[[], Awaitable[None]]
    ) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            while True:
                try:
                    await job()
                    return
                except RestartNeeded as exc:
                    log.warning(
                        "%s: the other store is unhealthy (%s: %s); reads are unaffected, "
                        "its writes are repaired when it is back",
                        self.connector.node,
                        name,
                        exc.reason,
                    )

        return run

    def health(self) -> list[ShardHealth]:
        return [*self.read.health(), *self.other.health()]

    def started(self) -> None:
        self.read.started()
        self.other.started()
        self._ready.set()

    def unavailable(self, labels: Labels) -> str | None:
        reason = self.read.unavailable(labels)
        if reason is not None:
            return reason
        # the other store's connection, not its heartbeat (its operator may be stopped)
        if any(
            h.failing and h.failure is not None and h.failure.is_connection
            for h in self.other.health()
        ):
            return self.other.unavailable(labels)
        return None

    def on_identity_changed(self, callback: Callable[[Identity, Identity], None]) -> None:
        self.read.on_identity_changed(callback)

    async def release_all(self) -> None:
        await self.read.release_all()
        with contextlib.suppress(StoreError):
            await self.other.release_all()

    async def close(self) -> None:
        try:
            await self.read.close()
        finally:
            await self.other.close()


# -- the stores ------------------------------------------------------------------------


class _Identities:
    def __init__(
        self,
        read: IdentityStore,
        other: IdentityStore,
        copier: IdentityCopier,
        node: NodeName,
        metrics: DoubleWriteMetrics,
    ) -> None:
        self.read = read
        self.other = other
        self.copier = copier
        self.node = node
        self.metrics = metrics

    async def acquire(self, labels: Labels) -> Identity:
        identity = await self.read.acquire(labels)
        if identity.is_reserved:
            return identity
        try:
            reason = await self.copier.write_identity(identity, [])
            if reason is None:
                there = await self.other.acquire(labels)
                if there.id != identity.id:
                    with contextlib.suppress(StoreError):
                        await self.other.release(there)
                    reason = f"the other store has labels {labels} as identity {there.id}"
        except BaseException:
            with contextlib.suppress(StoreError):
                await self.read.release(identity)
            raise
        if reason is not None:
            self.metrics.conflicts.labels("identity").inc()
            with contextlib.suppress(StoreError):
                await self.read.release(identity)
            message = f"identity {identity.id} ({labels}) not double-written: {reason}"
            log.error("%s: %s", self.node, message)
            raise DoubleWriteConflict(message)
        return identity

    async def release(self, identity: Identity) -> None:
        await self.read.release(identity)
        with contextlib.suppress(StoreError):
            await self.other.release(identity)  # local in CRD mode; kvstore: the ref key

    async def get(self, ident: NumericIdentity) -> Versioned[Identity] | None:
        return await self.read.get(ident)

    async def lookup(self, labels: Labels) -> Versioned[Identity] | None:
        return await self.read.lookup(labels)

    async def list(self) -> builtins.list[Versioned[Identity]]:
        return await self.read.list()

    def watch(self) -> AsyncIterator[StoreEvent[Identity]]:
        return self.read.watch()


class _Endpoints:
    def __init__(
        self,
        read: EndpointStore,
        other: EndpointStore,
        repairs: _Repairs,
        metrics: DoubleWriteMetrics,
    ) -> None:
        self.read = read
        self.other = other
        self.repairs = repairs
        self.metrics = metrics
        self.fresh: set[IPAddress] = set()
        """IPs leased by a claim of this session and not yet published: a new endpoint
        (a restored one's lease is adopted, never claimed)."""

    async def upsert(self, endpoint: Endpoint) -> float:
        """The read store's write's issue time (propagation starts in the read store)."""
        issued = await self.read.upsert(endpoint)
        key = str(endpoint.ip)
        if endpoint.ip in self.fresh:
            # a new endpoint: both or neither (the agent then releases its IP and identity)
            try:
                await self.other.upsert(endpoint)
            except BaseException as exc:
                if isinstance(exc, StoreError):
                    self.metrics.undone.labels("endpoint").inc()
                with contextlib.suppress(StoreError):
                    await self.read.remove(endpoint.ip)
                raise
            self.fresh.discard(endpoint.ip)
            self.repairs.drop("endpoint", key)
            return issued
        # a live endpoint (re-published): never withdrawn; the other store is repaired
        await self.repairs.attempt("endpoint", key, lambda: self.other.upsert(endpoint))
        return issued

    async def remove(self, ip: IPAddress) -> None:
        await self.read.remove(ip)
        self.fresh.discard(ip)
        await self.repairs.attempt("endpoint", str(ip), lambda: self.other.remove(ip))

    async def list(self) -> builtins.list[Versioned[Endpoint]]:
        return await self.read.list()

    def watch(self) -> AsyncIterator[StoreEvent[Endpoint]]:
        return self.read.watch()

    def watch_ip_identities(self) -> AsyncIterator[builtins.list[StoreEvent[IPIdentity]]]:
        return self.read.watch_ip_identities()


class _Nodes:
    def __init__(self, read: NodeStore, other: NodeStore, repairs: _Repairs) -> None:
        self.read = read
        self.other = other
        self.repairs = repairs

    async def register(self, node: Node) -> None:
        await self.read.register(node)
        await self.repairs.attempt("node", str(node.name), lambda: self.other.register(node))

    async def deregister(self) -> None:
        await self.read.deregister()
        await self.repairs.attempt("node", "-", self.other.deregister)

    async def get(self, name: NodeName) -> Versioned[Node] | None:
        return await self.read.get(name)

    async def list(self) -> builtins.list[Versioned[Node]]:
        return await self.read.list()

    def watch(self) -> AsyncIterator[StoreEvent[Node]]:
        return self.read.watch()


class _Leases:
    def __init__(
        self,
        read: IPLeaseStore,
        other: IPLeaseStore,
        repairs: _Repairs,
        metrics: DoubleWriteMetrics,
        fresh: set[IPAddress],
    ) -> None:
        self.read = read
        self.other = other
        self.repairs = repairs
        self.metrics = metrics
        self.fresh = fresh

    async def list(self) -> builtins.list[Versioned[IPLease]]:
        return await self.read.list()

    async def claim(self, lease: IPLease) -> bool:
        if not await self.read.claim(lease):
            return False
        try:
            taken = bool(await self.other.claim(lease))
        except BaseException:
            self.metrics.undone.labels("ip-lease").inc()
            with contextlib.suppress(StoreError):
                await self.read.release(lease.ip)
            raise
        if not taken:
            self.metrics.conflicts.labels("ip-lease").inc()
            self.metrics.undone.labels("ip-lease").inc()
            log.error("IP %s is leased in the other store; not taken", lease.ip)
            await self.read.release(lease.ip)
        else:
            self.fresh.add(lease.ip)
        return taken

    async def adopt(self, leases: Sequence[IPLease]) -> None:
        await self.read.adopt(leases)
        await self.repairs.attempt("ip-lease", "adopt", lambda: self.other.adopt(leases))

    async def release(self, ip: IPAddress) -> None:
        self.fresh.discard(ip)
        await self.read.release(ip)
        await self.repairs.attempt("ip-lease", str(ip), lambda: self.other.release(ip))


class _Configs:
    """Policies and services: cluster-wide configuration, written by tools."""

    def __init__(
        self,
        read: PolicyStore | ServiceStore,
        other: PolicyStore | ServiceStore,
        repairs: _Repairs,
        resource: str,
    ) -> None:
        self.read = read
        self.other = other
        self.repairs = repairs
        self.resource = resource

    async def put(self, obj: Any) -> None:
        await self.read.put(obj)
        await self.repairs.attempt(self.resource, obj.id, lambda: self.other.put(obj))

    async def delete(self, namespace: str, name: str) -> bool:
        found = bool(await self.read.delete(namespace, name))
        await self.repairs.attempt(
            self.resource, f"{namespace}/{name}", lambda: self.other.delete(namespace, name)
        )
        return found

    async def list(self) -> builtins.list[Versioned[Any]]:
        return await self.read.list()

    def watch(self) -> AsyncIterator[StoreEvent[Any]]:
        return self.read.watch()
