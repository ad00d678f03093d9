"""Leader election on a ``coordination.k8s.io/v1`` Lease, with client-go's semantics.

The Lease (``<namespace>/<name>``, by default ``kube-system/cp-operator``) holds
``holderIdentity``, ``leaseDurationSeconds``, ``acquireTime``, ``renewTime`` and
``leaseTransitions``. Every candidate reads it every ``retry_period`` (jittered). Expiry
is judged as client-go judges it: by the *observer's* monotonic clock, from the moment the
observer last saw the record change, never from the timestamps in it (no two clocks are
compared). A candidate takes the Lease when its holder is empty, is itself, or has not
changed for ``leaseDurationSeconds`` of the candidate's clock; every write is an update
guarded by the resourceVersion it read (409: another candidate won the race) or a create
(AlreadyExists: ditto).

The leader renews every ``retry_period`` and is the leader only while its last successful
renewal, timed from *before the request was sent*, is younger than ``renew_deadline`` on
its own monotonic clock. Any observer waits at least ``lease_duration`` after it saw that
renewal land, which was after we sent it, so our term ends (``renew_deadline <
lease_duration``) before anyone else may take the Lease, as long as the two clocks run at
about the same rate. A guard task ends the term the moment the deadline passes, and
:meth:`LeaseTerm.check` refuses locally past it too: a process that was paused (SIGSTOP, a
VM freeze, a long GC) finds, as soon as it runs again, that the monotonic clock moved on,
and refuses before sending anything. A write that already passed the check when the pause
hit is the one thing a local check cannot stop; the leader's writes are therefore built so
that the API server refuses them if anything changed meanwhile (see
``docs/architecture.md``, "Fencing in CRD mode").

A clean shutdown releases the Lease (empty holder, ``leaseDurationSeconds`` 1), so a
follower takes over at its next retry instead of after a whole lease duration.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from controlplane.crd.client import JSON, KubeClient
from controlplane.crd.errors import AlreadyExists, Conflict, CrdError
from controlplane.crd.resources import LEASES

__all__ = [
    "LeaseElection",
    "LeaseRecord",
    "LeaseSettings",
    "LeaseTerm",
    "NotLeader",
    "micro_time",
]

log = logging.getLogger(__name__)

Clock = Callable[[], float]
_GUARD_POLL_S = 0.05
_JITTER = 1.2
"""client-go's JitterFactor: a follower retries after retry_period * (1 + up to 1.2)."""


class NotLeader(CrdError):
    """A leader write was refused locally: the term is over or its last renewal is older
    than the renew deadline. Nothing was sent."""


@dataclass(frozen=True, slots=True)
class LeaseSettings:
    """Where the Lease is and the election's timing (Cilium's defaults)."""

    namespace: str = "kube-system"
    name: str = "cp-operator"
    lease_duration: float = 15.0
    """How long a follower waits, after it last saw the record change, before taking it."""
    renew_deadline: float = 10.0
    """The leader steps down when no renewal succeeded for this long (< lease_duration)."""
    retry_period: float = 2.0
    """Seconds between renewals, and between a follower's attempts."""

    def validate(self) -> None:
        """Raise ``ValueError`` (one line) when the timings cannot work together."""
        if not self.namespace or not self.name:
            raise ValueError("the Lease needs a namespace and a name")
        if self.lease_duration < 1:
            raise ValueError(f"lease duration must be at least 1 s, got {self.lease_duration:g}")
        if not 0 < self.renew_deadline < self.lease_duration:
            raise ValueError(
                f"renew deadline ({self.renew_deadline:g} s) must be positive and shorter "
                f"than the lease duration ({self.lease_duration:g} s)"
            )
        if not 0 < self.retry_period < self.renew_deadline:
            raise ValueError(
                f"retry period ({self.retry_period:g} s) must be positive and shorter than "
                f"the renew deadline ({self.renew_deadline:g} s)"
            )


def _spec(obj: JSON) -> JSON:
    spec = obj.get("spec")
    return spec if isinstance(spec, dict) else {}


def micro_time(now: datetime | None = None) -> str:
    """A Kubernetes MicroTime (RFC 3339 with microseconds, UTC)."""
    return (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """The election fields of a Lease's spec (what client-go calls LeaderElectionRecord)."""

    holder: str = ""
    duration: int = 0
    acquire_time: str = ""
    renew_time: str = ""
    transitions: int = 0

    @classmethod
    def from_object(cls, obj: JSON) -> LeaseRecord:
        """The record of a Lease object; fields of the wrong type read as unset (a garbled
        Lease is then simply expired or free, never a crash)."""
        spec = obj.get("spec")
        if not isinstance(spec, dict):
            spec = {}

        def text(key: str) -> str:
            value = spec.get(key)
            return value if isinstance(value, str) else ""

        def number(key: str) -> int:
            value = spec.get(key)
            return value if isinstance(value, int) and not isinstance(value, bool) else 0

        return cls(
            holder=text("holderIdentity"),
            duration=number("leaseDurationSeconds"),
            acquire_time=text("acquireTime"),
            renew_time=text("renewTime"),
            transitions=number("leaseTransitions"),
        )

    def spec(self) -> JSON:
        return {
            "holderIdentity": self.holder,
            "leaseDurationSeconds": self.duration,
            "acquireTime": self.acquire_time,
            "renewTime": self.renew_time,
            "leaseTransitions": self.transitions,
        }


class LeaseTerm:
    """One leadership term. Every leader write calls :meth:`check` right before it."""

    def __init__(self, election: LeaseElection, *, epoch: int, number: int) -> None:
        self.election = election
        self.epoch = epoch
        """The Lease's ``leaseTransitions`` when this term began (a fencing token for logs
        and metrics; the API server's preconditions do the fencing)."""
        self.number = number
        """Terms this candidate has won, this one included."""
        self.lost_reason: str | None = None

    @property
    def active(self) -> bool:
        return self.lost_reason is None and self.election.term is self

    def check(self) -> None:
        """Raise :class:`NotLeader` unless this term leads and its last renewal is younger
        than the renew deadline by our monotonic clock (a process that was paused refuses
        the moment it runs again)."""
        if not self.active:
            raise NotLeader(f"term {self.epoch} is over ({self.lost_reason or 'stepped down'})")
        if self.election.overdue():
            raise NotLeader(f"term {self.epoch}: no Lease renewal within the renew deadline")

    def lose(self, reason: str) -> None:
        """End the term (checks refuse from now on); the election steps down."""
        if self.lost_reason is None:
            self.lost_reason = reason


LeaderWork = Callable[[LeaseTerm], Coroutine[Any, Any, None]]


class LeaseElection:
    """One candidate. ``await run(lead)`` campaigns until cancelled; ``lead(term)`` runs
    while this candidate leads and is cancelled (and awaited) before its renewal can be
    overdue. Cancelling ``run`` stops the work first, then releases the Lease."""

    def __init__(
        self,
        client: KubeClient,
        identity: str,
        settings: LeaseSettings | None = None,
        *,
        clock: Clock = time.monotonic,
        on_renewal: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings or LeaseSettings()
        self.settings.validate()
        if not identity:
            raise ValueError("candidate identity must not be empty")
        self.client = client
        self.identity = identity
        self.clock = clock
        self.on_renewal = on_renewal
        """Called with ``ok``, ``conflict`` or ``error`` after each attempt of a leader to
        renew (metrics)."""
        self.term: LeaseTerm | None = None
        self.terms = 0
        self.observed: LeaseRecord | None = None
        """The record as last read or written."""
        self.observed_at = 0.0
        """Our monotonic time when the record last changed (as we saw it)."""
        self.reachable: str | None = None
        """None until the first request; "" after one that succeeded, else the error."""
        self._object: JSON | None = None
        """The Lease as last read or written (its resourceVersion guards the next write)."""
        self._renewed_at = -float("inf")

    # -- public view -----------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        return self.term is not None and self.term.active

    @property
    def leader_id(self) -> str | None:
        """The holder as observed, while its lease has not expired by our clock."""
        record = self.observed
        if record is None or not record.holder:
            return None
        if record.holder != self.identity and self._expired(record):
            return None
        return record.holder

    def overdue(self) -> bool:
        """No renewal succeeded within the renew deadline (by our monotonic clock)."""
        return self.clock() - self._renewed_at > self.settings.renew_deadline

    def _expired(self, record: LeaseRecord) -> bool:
        return self.clock() - self.observed_at > max(record.duration, 0)

    # -- the loop --------------------------------------------------------------------

    async def run(self, lead: LeaderWork) -> None:
        """Campaign until cancelled; cancelling resigns (releases the Lease)."""
        try:
            while True:
                if await self._attempt("acquire"):
                    try:
                        await self._lead(lead)
                    except Exception:
                        log.exception("election: the term of %s ended in a crash", self.identity)
                period = self.settings.retry_period
                await asyncio.sleep(period * (1 + random.uniform(0, _JITTER)))
        finally:
            await self._release()

    async def try_acquire_or_renew(self) -> bool:
        """One attempt, as client-go's tryAcquireOrRenew: True when we hold the Lease."""
        now = datetime.now(UTC)
        sent = self.clock()
        obj = self._object
        record = self.observed
        if obj is None or record is None or record.holder != self.identity:
            obj = await self.client.get_or_none(LEASES, self.settings.name, self.settings.namespace)
            if obj is None:
                return await self._create(now, sent)
            record = self._observe(obj)
            if record.holder and record.holder != self.identity and not self._expired(record):
                return False
        ours = LeaseRecord(
            holder=self.identity,
            duration=max(1, round(self.settings.lease_duration)),
            acquire_time=record.acquire_time if record.holder == self.identity else micro_time(now),
            renew_time=micro_time(now),
            transitions=record.transitions
            if record.holder == self.identity
            else record.transitions + 1,
        )
        body = dict(obj)
        body["spec"] = {**_spec(obj), **ours.spec()}
        try:
            written = await self.client.replace(LEASES, body)
        except Conflict:
            self._object = None  # re-read on the next attempt
            raise
        self._written(written, ours, sent)
        return True

    async def _create(self, now: datetime, sent: float) -> bool:
        ours = LeaseRecord(
            holder=self.identity,
            duration=max(1, round(self.settings.lease_duration)),
            acquire_time=micro_time(now),
            renew_time=micro_time(now),
            transitions=0,
        )
        body: JSON = {
            "apiVersion": LEASES.api_version,
            "kind": LEASES.kind,
            "metadata": {"name": self.settings.name, "namespace": self.settings.namespace},
            "spec": ours.spec(),
        }
        try:
            written = await self.client.create(LEASES, body)
        except AlreadyExists:
            return False  # another candidate created it first
        self._written(written, ours, sent)
        return True

    def _observe(self, obj: JSON) -> LeaseRecord:
        record = LeaseRecord.from_object(obj)
        if record != self.observed:
            if self.observed is not None and record.holder != self.observed.holder:
                log.info(
                    "election: Lease %s/%s is now held by %r",
                    self.settings.namespace,
                    self.settings.name,
                    record.holder,
                )
            self.observed = record
            self.observed_at = self.clock()
        self._object = obj
        return record

    def _written(self, obj: JSON, record: LeaseRecord, sent: float) -> None:
        self._object = obj
        self.observed = record
        self.observed_at = sent
        self._renewed_at = max(self._renewed_at, sent)

    async def _attempt(self, what: str) -> bool:
        """One bounded attempt; errors are logged and count as "not acquired"."""
        timeout = self.settings.renew_deadline if self.term is None else self._remaining()
        try:
            async with asyncio.timeout(max(0.05, timeout)):
                ok = await self.try_acquire_or_renew()
        except Conflict:
            self.reachable = ""
            log.debug("election: %s lost a race (409)", what)
            self._renewal("conflict")
            return False
        except (CrdError, TimeoutError) as exc:
            self.reachable = str(exc) or "timed out"
            log.info("election: %s failed: %s", what, self.reachable)
            self._renewal("error")
            return False
        except Exception:
            log.exception("election: %s crashed", what)
            self._object = None  # re-read on the next attempt
            self._renewal("error")
            return False
        self.reachable = ""
        self._renewal("ok" if ok else "conflict")
        return ok

    def _renewal(self, result: str) -> None:
        if self.term is not None and self.on_renewal is not None:
            self.on_renewal(result)

    def _remaining(self) -> float:
        return self.settings.renew_deadline - (self.clock() - self._renewed_at)

    async def _lead(self, lead: LeaderWork) -> None:
        if self.overdue():
            return
        record = self.observed
        assert record is not None
        self.terms += 1
        term = LeaseTerm(self, epoch=record.transitions, number=self.terms)
        self.term = term
        log.info(
            "election: %s is the leader (Lease %s/%s, transitions %d)",
            self.identity,
            self.settings.namespace,
            self.settings.name,
            term.epoch,
        )
        reason = "leader work returned"
        try:
            async with asyncio.TaskGroup() as group:
                work = group.create_task(lead(term), name="election:leader-work")
                renew = group.create_task(self._renew(term), name="election:renew")
                while True:
                    why = self._lost(term)
                    if why is not None:
                        reason = why
                        break
                    if work.done():
                        break
                    await asyncio.sleep(_GUARD_POLL_S)
                term.lose(reason)  # check() refuses from here on
                work.cancel()
                renew.cancel()
        finally:
            term.lose("stepped down")
            self.term = None
        log.warning("election: %s stepped down (term %d): %s", self.identity, term.epoch, reason)

    def _lost(self, term: LeaseTerm) -> str | None:
        if term.lost_reason is not None:
            return term.lost_reason
        if self.overdue():
            return f"no Lease renewal for {self.settings.renew_deadline:g} s"
        return None

    async def _renew(self, term: LeaseTerm) -> None:
        while True:
            await asyncio.sleep(self.settings.retry_period)
            if await self._attempt("renew"):
                continue
            holder = self.observed.holder if self.observed is not None else ""
            if holder and holder != self.identity:
                term.lose(f"the Lease is held by {holder}")
                return

    async def _release(self) -> None:
        """Give the Lease up (empty holder, duration 1 s) if our last write holds it. A
        renewal cancelled in flight may have landed unseen (409): read it again, once."""
        obj, record = self._object, self.observed
        if obj is None or record is None or record.holder != self.identity:
            return
        now = micro_time()
        released = LeaseRecord("", 1, now, now, record.transitions)
        try:
            async with asyncio.timeout(self.client.request_timeout):
                try:
                    written = await self.client.replace(LEASES, _with_spec(obj, released))
                except Conflict:
                    fresh = await self.client.get_or_none(
                        LEASES, self.settings.name, self.settings.namespace
                    )
                    if fresh is None or LeaseRecord.from_object(fresh).holder != self.identity:
                        return
                    written = await self.client.replace(LEASES, _with_spec(fresh, released))
        except (CrdError, TimeoutError) as exc:
            log.info("election: could not release the Lease: %s", exc or "timed out")
            return
        self._object = written
        self.observed = released
        self.observed_at = self.clock()
        self._renewed_at = -float("inf")
        log.info("election: %s released the Lease", self.identity)


def _with_spec(obj: JSON, record: LeaseRecord) -> JSON:
    body = dict(obj)
    body["spec"] = {**_spec(obj), **record.spec()}
    return body
