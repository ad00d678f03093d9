"""One leader term's work, the same in both store modes: the leader tasks in one
TaskGroup, each restarted after ``retry_period`` when the store fails or it crashes, and
the whole term ended (the election then steps down) when a write is fenced off.

In a double-write mode the read store's daemon leads with an :class:`OtherStore`: the
other mode's daemon bound to its own term, which adds its jobs and takes part in the
CIDR allocation, the identity GC and the node GC (``operator/doublewrite.py``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from controlplane.model import IPNetwork, NodeName
from controlplane.operator.doublewrite_cidrs import DoubleWriteCIDRs
from controlplane.operator.metrics import OperatorMetrics
from controlplane.store import CIDRStore
from controlplane.store_types import StoreError
from controlplane.telemetry import Check, TelemetryServer

log = logging.getLogger("cp-operator")

Job = Callable[[], Awaitable[None]]


class Term(Protocol):
    """What the term's runner needs of an election's term (etcd epoch or Lease term)."""

    @property
    def epoch(self) -> int: ...

    def lose(self, reason: str) -> None: ...


Task = Callable[[], Coroutine[Any, Any, None]]


async def serve_until(
    stop: asyncio.Event,
    tasks: Mapping[str, Task],
    *,
    metrics: OperatorMetrics,
    health: Callable[[], Mapping[str, Check]],
    address: tuple[str, int],
    on_listening: Callable[[TelemetryServer], None],
    farewell: str,
) -> None:
    """A replica's life, the same in every mode: serve /metrics, /healthz and /readyz,
    run ``tasks`` (the election, probes, watches) until ``stop``, then cancel them
    (resigning) and close the server."""
    server = TelemetryServer(metrics.registry, health, host=address[0], port=address[1])
    await server.start()
    on_listening(server)
    try:
        async with asyncio.TaskGroup() as group:
            running = [group.create_task(task(), name=name) for name, task in tasks.items()]
            await stop.wait()
            log.info("shutting down: %s", farewell)
            for task in running:
                task.cancel()
    finally:
        await server.close()
    log.info("stopped")


@dataclass(frozen=True, slots=True)
class ReadSide:
    """What the other store's jobs see of the read store's leader in one term."""

    cidr_of: Callable[[NodeName], IPNetwork | None]
    """A node's CIDR as the read store's allocator holds it (None: none yet)."""
    identities_in_use: Callable[[], Awaitable[set[int]]]
    """The identities the read store's users hold (the other store's GC keeps them)."""
    allocated: asyncio.Event = field(default_factory=asyncio.Event)
    """Set after each allocation (the CRD store then writes ``Node.spec.podCIDRs``)."""


class OtherStore(Protocol):
    """The other store in a double-write mode, fenced by the other store's term."""

    @property
    def term(self) -> Term:
        """The other store's election term (the read store's term runs inside it, or it
        inside the read store's)."""
        ...

    @property
    def fenced(self) -> type[Exception]:
        """What its writes raise when fenced off: the whole term then ends."""
        ...

    def double_write(self, read: CIDRStore) -> DoubleWriteCIDRs:
        """The read store's claims ``read``, each written to this store too (fenced)."""
        ...

    def jobs(self, read: ReadSide) -> Mapping[str, Job]:
        """Its own leader jobs: the kvstore's heartbeat, its identity GC (keeping what the
        read store uses), the CRD store's ``Node.spec.podCIDRs``."""
        ...

    async def identities_in_use(self) -> set[int]: ...

    async def nodes(self) -> set[NodeName]:
        """The nodes it lists now."""
        ...

    async def holders(self) -> set[NodeName]:
        """The nodes holding state in it (CIDR claims, IP leases, endpoints)."""
        ...

    async def collect(self, node: NodeName) -> None:
        """Delete the state of gone ``node`` in it (each delete guarded: kept when the
        node is back there)."""
        ...


@dataclass(frozen=True, slots=True)
class _BothTerms:
    """Double-write: the read store's term and the other's, ended together."""

    read: Term
    other: Term

    @property
    def epoch(self) -> int:
        return self.read.epoch

    def lose(self, reason: str) -> None:
        self.read.lose(reason)
        self.other.lose(reason)


async def run_term(
    term: Term,
    jobs: Mapping[str, Job],
    *,
    metrics: OperatorMetrics,
    retry_period: float,
    fenced: type[Exception],
    other: OtherStore | None = None,
) -> None:
    """Run ``jobs`` until the term ends (the election cancels this) or one is fenced (in a
    double-write mode with ``other``: its term ends with ours, and its fenced writes end
    both)."""
    fences: tuple[type[Exception], ...] = (fenced,)
    if other is not None:
        term = _BothTerms(term, other.term)
        fences = (fenced, other.fenced)
    metrics.leader.set(1)
    metrics.epoch.set(term.epoch)
    metrics.leader_transitions.labels("elected").inc()
    log.info("leading (term %d): starting leader tasks", term.epoch)
    try:
        async with asyncio.TaskGroup() as group:
            for name, job in jobs.items():
                group.create_task(_leader_task(name, term, job, retry_period, fences), name=name)
    finally:
        metrics.leader.set(0)
        metrics.epoch.set(0)
        metrics.leader_transitions.labels("lost").inc()
        log.info("leader tasks of term %d stopped", term.epoch)


async def _leader_task(
    name: str, term: Term, body: Job, retry_period: float, fenced: tuple[type[Exception], ...]
) -> None:
    while True:
        try:
            await body()
            return
        except fenced as exc:
            log.warning("%s: fenced off (%s); ending the term", name, exc)
            term.lose(f"{name}: {exc}")
            return
        except StoreError as exc:
            log.warning("%s: %s; retrying in %gs", name, exc, retry_period)
        except Exception:
            log.exception("%s: crashed; restarting", name)
        await asyncio.sleep(retry_period)
