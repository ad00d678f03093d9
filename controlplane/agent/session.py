"""One generation of the agent's control-plane side, over any store.

A :class:`Session` runs, in one ``TaskGroup``: the store session's own background work
(leases, heartbeat monitors, health checks: see :mod:`controlplane.agent.store_session`),
the watches into the cache and the ipcache (:mod:`controlplane.agent.watches`), the
startup (register the node with the CIDR it already has, wait for the operator's CIDR,
restore and re-publish what the node owns), a re-publisher for identity changes, and a
waiter for stop and restart requests. Any task that fails or ends ends the session with a
reason; the agent then opens the next one. It knows the store only through its Protocols.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path
from typing import Protocol, TypeVar, cast

from tenacity import AsyncRetrying, retry_if_exception_type, wait_random_exponential

from controlplane.agent.endpoints import EndpointPublisher, OwnedEndpoints
from controlplane.agent.policy import PolicyFlusher
from controlplane.agent.routes import RouteSyncer
from controlplane.agent.services import ServiceFlusher
from controlplane.agent.settings import AgentSettings
from controlplane.agent.store_session import RestartNeeded, StoreSession
from controlplane.agent.watches import AgentCache, CacheWatches
from controlplane.datapath.reconciler import IpcacheReconciler
from controlplane.model import Identity, IPNetwork, Node
from controlplane.store_types import CIDRClaim, EventKind, StoreError, StoreEvent

log = logging.getLogger(__name__)
T = TypeVar("T")


class _Stopped(Exception):
    pass


class SessionHost(Protocol):
    """What a session works on: the agent's state that outlives sessions."""

    settings: AgentSettings
    cache: AgentCache
    reconciler: IpcacheReconciler
    owned: OwnedEndpoints
    policy: PolicyFlusher
    routes: RouteSyncer
    services: ServiceFlusher
    stopping: asyncio.Event

    def session_ready(self) -> None: ...

    def flows_address(self) -> str:
        """HOST:PORT of this node's Observer API over TCP for the node record, or ""."""
        ...


class Session:
    """One generation of a store session, watches, startup and re-publishing."""

    def __init__(self, host: SessionHost, store: StoreSession, generation: int) -> None:
        self.host = host
        self.store = store
        self.stores = store.stores
        self.generation = generation
        self.publisher = EndpointPublisher(host.owned, self.stores, store.unavailable)
        store.on_identity_changed(self._identity_changed)
        self.watches: CacheWatches | None = None
        self.ready = asyncio.Event()
        self.phase = "connecting"
        self._kick = asyncio.Event()
        self._restart_reason = "requested"
        self._republish = asyncio.Event()

    def request_restart(self, reason: str) -> None:
        """End this session now with ``reason`` (the agent opens the next one)."""
        self._restart_reason = reason
        self._kick.set()

    def inputs_listed(self, *streams: str) -> bool:
        """Ready, and each of ``streams`` listed in this session."""
        return (
            self.ready.is_set() and self.watches is not None and set(streams) <= self.watches.synced
        )

    async def run(self) -> str | None:
        """Run until the store is unhealthy or a restart is asked for (returns the reason)
        or the agent stops (returns None)."""
        host = self.host
        node = host.settings.node
        self.watches = CacheWatches(
            host.cache,
            host.reconciler,
            self.stores,
            node,
            policy_changed=host.policy.changed,
            services_changed=host.services.changed,
            routes=host.routes,
        )
        stopped = False
        reason: str | None = None
        try:
            await self.store.connect()
            async with asyncio.TaskGroup() as group:
                tasks: dict[str, Callable[[], Awaitable[None]]] = {
                    **self.store.tasks(),
                    **self.watches.tasks(),
                    "startup": self._startup,
                    "republish": self._republisher,
                    "stop": self._wait_stop,
                }
                for name, fn in tasks.items():
                    group.create_task(self._guard(name, fn), name=f"{node}:{name}")
        except* RestartNeeded as group:
            exc = group.exceptions[0]
            assert isinstance(exc, RestartNeeded)
            reason = exc.reason
        except* _Stopped:
            stopped = True
        finally:
            self.phase = "stopped"
            try:
                if stopped and host.settings.cleanup_on_exit:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._cleanup(), 10)
            finally:
                await self.store.close()
        return None if stopped else reason

    async def _guard(self, name: str, fn: Callable[[], Awaitable[None]]) -> None:
        try:
            await fn()
        except (RestartNeeded, _Stopped):
            raise
        except Exception as exc:
            log.exception("%s: task %s failed", self.host.settings.node, name)
            raise RestartNeeded(f"task-failed:{name}") from exc
        else:
            if name != "startup":
                raise RestartNeeded(f"task-ended:{name}")

    async def _wait_stop(self) -> None:
        stop = asyncio.create_task(self.host.stopping.wait())
        kick = asyncio.create_task(self._kick.wait())
        try:
            await asyncio.wait({stop, kick}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            kick.cancel()
        if self.host.stopping.is_set():
            raise _Stopped()
        raise RestartNeeded(self._restart_reason)

    # -- startup: register, CIDR, restore -------------------------------------------

    async def _startup(self) -> None:
        host = self.host
        owned = host.owned
        s = host.settings
        boot_id = _boot_id()
        if owned.cidr is None:
            # A restarted process must not publish its node without the CIDR it already
            # has: other nodes would withdraw their route to it until the claim is seen.
            owned.cidr = await _retrying(self._claimed_cidr)
        flows = host.flows_address()
        node = Node(
            name=s.node,
            ips=s.node_ips,
            pod_cidrs=(owned.cidr,) if owned.cidr is not None else (),
            boot_id=boot_id,
            flows_address=flows,
        )
        self.phase = "registering the node"
        await _retrying(lambda: self.stores.nodes.register(node))
        self.phase = f"waiting for a pod CIDR from pool {s.pool!r} (the operator allocates it)"
        cidr = await self._wait_cidr()
        if owned.cidr is not None and owned.cidr != cidr:
            log.warning("%s: pod CIDR changed from %s to %s", s.node, owned.cidr, cidr)
        owned.cidr = cidr
        if node.pod_cidrs != (cidr,):
            await _retrying(
                lambda: self.stores.nodes.register(
                    Node(
                        name=s.node,
                        ips=s.node_ips,
                        pod_cidrs=(cidr,),
                        boot_id=boot_id,
                        flows_address=flows,
                    )
                )
            )
        self.publisher.use_cidr(cidr)
        self.phase = "restoring endpoints"
        await _retrying(self.publisher.restore)
        self.phase = "ready"
        self.store.started()
        self.ready.set()
        host.session_ready()
        host.policy.changed()
        host.services.changed()
        log.info(
            "%s: ready (generation %d, CIDR %s, %d endpoints)",
            s.node,
            self.generation,
            cidr,
            len(owned.items),
        )

    async def _claimed_cidr(self) -> IPNetwork | None:
        """The CIDR the operator already gave this node, if any."""
        node = self.host.settings.node
        for claim in await self.stores.cidrs.list(self.host.settings.pool):
            if claim.value.node == node:
                return claim.value.cidr
        return None

    async def _wait_cidr(self) -> IPNetwork:
        node = self.host.settings.node
        watch = cast(
            AsyncGenerator[StoreEvent[CIDRClaim], None],
            self.stores.cidrs.watch(self.host.settings.pool),
        )
        async with contextlib.aclosing(watch) as events:
            async for event in events:
                if event.kind is EventKind.SYNCED:
                    log.info("%s: no pod CIDR yet; waiting for the operator", node)
                elif (
                    event.kind is EventKind.UPSERT
                    and event.value is not None
                    and event.value.node == node
                ):
                    return event.value.cidr
        raise StoreError("the CIDR watch ended")

    def _identity_changed(self, old: Identity, new: Identity) -> None:
        self.publisher.identity_changed(old, new)
        self._republish.set()  # re-publish the endpoints with their new identity

    async def _republisher(self) -> None:
        await self.ready.wait()
        while True:
            await self._republish.wait()
            self._republish.clear()
            await _retrying(self.publisher.restore)

    async def _cleanup(self) -> None:
        """--cleanup-on-exit: withdraw everything and give up what the node holds."""
        await self.publisher.withdraw_all()
        with contextlib.suppress(StoreError):
            await self.stores.nodes.deregister()
        await self.store.release_all()


async def _retrying(call: Callable[[], Awaitable[T]]) -> T:
    """Repeat ``call`` on store errors (backoff with jitter) until it succeeds; the store
    session's health checks restart the session if the store stays broken."""
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type(StoreError),
        wait=wait_random_exponential(multiplier=0.1, max=2.0),
        reraise=True,
    ):
        with attempt:
            return await call()
    raise AssertionError("unreachable")


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:128]
    except OSError:
        return ""
