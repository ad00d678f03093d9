"""One leader term's work, the same in both store modes: the leader tasks in one
TaskGroup, each restarted after ``retry_period`` when the store fails or it crashes, and
the whole term ended (the election then steps down) when a write is fenced off."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from controlplane.operator.metrics import OperatorMetrics
from controlplane.store_types import StoreError

log = logging.getLogger("cp-operator")

Job = Callable[[], Awaitable[None]]


class Term(Protocol):
    """What the term's runner needs of an election's term (etcd epoch or Lease term)."""

    @property
    def epoch(self) -> int: ...

    def lose(self, reason: str) -> None: ...


async def run_term(
    term: Term,
    jobs: Mapping[str, Job],
    *,
    metrics: OperatorMetrics,
    retry_period: float,
    fenced: type[Exception],
) -> None:
    """Run ``jobs`` until the term ends (the election cancels this) or one is fenced."""
    metrics.leader.set(1)
    metrics.epoch.set(term.epoch)
    metrics.leader_transitions.labels("elected").inc()
    log.info("leading (term %d): starting leader tasks", term.epoch)
    try:
        async with asyncio.TaskGroup() as group:
            for name, job in jobs.items():
                group.create_task(_leader_task(name, term, job, retry_period, fenced), name=name)
    finally:
        metrics.leader.set(0)
        metrics.epoch.set(0)
        metrics.leader_transitions.labels("lost").inc()
        log.info("leader tasks of term %d stopped", term.epoch)


async def _leader_task(
    name: str, term: Term, body: Job, retry_period: float, fenced: type[Exception]
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
