"""Operator leader election over etcd, with a fencing epoch on every cluster.

Each candidate grants a lease (TTL ``lease_duration``) on the *primary* cluster (the first
one configured) and creates ``<prefix>.operator/leader/<lease hex>`` (value: its id),
create-only. The key with the lowest create revision leads; the others wait for the keys
before theirs to go (the etcd ``concurrency`` recipe). Candidates follow the whole (small)
prefix with one list-watch, which also tells every replica who leads.

Fencing: a compare can only name keys of its own cluster, so the leader first writes its
epoch (its leader key's create revision) as ``<prefix>.operator/epoch`` =
``b"%020d:%s" % (epoch, id)`` on *every* cluster, guarded by "stored value < ours" (etcd
compares values bytewise, hence the zero padding). Every leader write on a cluster then
compares that key with our value (and, on the primary, our leader key's create revision),
so a deposed leader, however long it was paused, can never write after a newer leader
bumped the epoch.

Re-election after an etcd outage is as fast as the lease rules allow: a leader that
stepped down because it could not renew revokes its lease as soon as etcd answers again
(before it campaigns anew), so its key does not block the next leader for a whole TTL.

Timing is judged by our own monotonic clock: the lease is kept alive every
``retry_period``; the leader stops its work when no keepalive succeeded for
``renew_deadline`` (shorter than the lease), i.e. before etcd can expire the lease, and
:meth:`Term.fence` refuses locally past that deadline. A clean shutdown revokes the lease
(resigns), so a follower takes over at once.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import grpc
from aetcd import rpc

from controlplane.kvstore.backend import EtcdBackend
from controlplane.kvstore.errors import KvstoreError, NoLeader, Timeout, Unreachable, translate
from controlplane.kvstore.ipam import Fenced
from controlplane.kvstore.keys import KeyLayout
from controlplane.kvstore.shards import ShardMap
from controlplane.kvstore.types import (
    Compare,
    EventType,
    Get,
    Put,
    absent,
    create_revision_is,
    mod_revision_is,
    value_is,
)
from controlplane.kvstore.watch import ListWatcher

__all__ = [
    "Election",
    "ElectionSettings",
    "NotLeader",
    "Term",
    "encode_epoch",
    "parse_epoch",
]

log = logging.getLogger(__name__)

_EPOCH_RE = re.compile(rb"(\d{20}):(.*)", re.DOTALL)
_EPOCH_ATTEMPTS = 8
_GUARD_POLL_S = 0.05

Clock = Callable[[], float]


class NotLeader(Fenced):
    """Leader work was attempted without leadership (or past the renew deadline)."""


@dataclass(frozen=True, slots=True)
class ElectionSettings:
    """Timing of the election (Cilium's Kubernetes Lease defaults)."""

    lease_duration: int = 15
    """TTL of each candidate's etcd lease, seconds: how long a dead leader blocks the next."""
    renew_deadline: float = 10.0
    """The leader steps down when no keepalive succeeded for this long (local monotonic
    clock); must be shorter than ``lease_duration``."""
    retry_period: float = 2.0
    """Seconds between keepalives, and between retries after a failed candidacy."""

    def validate(self) -> None:
        """Raise ``ValueError`` (one line) when the timings cannot work together."""
        if self.lease_duration < 2:
            raise ValueError(f"lease duration must be at least 2 s, got {self.lease_duration}")
        if not 0 < self.renew_deadline < self.lease_duration:
            raise ValueError(
                f"renew deadline ({self.renew_deadline:g} s) must be positive and shorter "
                f"than the lease duration ({self.lease_duration} s)"
            )
        if not 0 < self.retry_period < self.renew_deadline:
            raise ValueError(
                f"retry period ({self.retry_period:g} s) must be positive and shorter than "
                f"the renew deadline ({self.renew_deadline:g} s)"
            )


def encode_epoch(epoch: int, candidate_id: str) -> bytes:
    """The epoch key's value: zero-padded so that bytewise order is numeric order."""
    return b"%020d:%s" % (epoch, candidate_id.encode())


def parse_epoch(value: bytes) -> tuple[int, str] | None:
    """(epoch, leader id) of an epoch key's value, or None when it is not one."""
    match = _EPOCH_RE.fullmatch(value)
    if match is None:
        return None
    return int(match.group(1)), match.group(2).decode("utf-8", errors="replace")


class Term:
    """One leadership term: its epoch and the compares that fence every leader write."""

    def __init__(
        self,
        election: Election,
        *,
        epoch: int,
        leader_key: bytes,
        primary: EtcdBackend,
    ) -> None:
        self.election = election
        self.epoch = epoch
        """The fencing token: our leader key's create revision on the primary cluster."""
        self.leader_key = leader_key
        self.primary = primary
        self.value = encode_epoch(epoch, election.candidate_id)
        self.lost_reason: str | None = None

    @property
    def active(self) -> bool:
        return self.lost_reason is None and self.election.term is self

    def fence(self, backend: EtcdBackend) -> list[Compare]:
        """Compares that hold only while this term leads, for a write on ``backend``.

        Raises :class:`NotLeader` when the term is over or no keepalive succeeded within
        the renew deadline (judged locally, so a paused process refuses as it wakes up).
        """
        if not self.active:
            raise NotLeader(f"term {self.epoch} is over ({self.lost_reason or 'stepped down'})")
        if self.election.overdue():
            raise NotLeader(f"term {self.epoch}: no lease renewal within the renew deadline")
        compares = [value_is(self.election.layout.operator_epoch, self.value)]
        if backend is self.primary:
            compares.append(create_revision_is(self.leader_key, self.epoch))
        return compares

    def lose(self, reason: str) -> None:
        """Leader work found it is fenced off: end the term (the election steps down)."""
        if self.lost_reason is None:
            self.lost_reason = reason


LeaderWork = Callable[[Term], Coroutine[Any, Any, None]]


class _CandidacyOver(Exception):
    """The lease or our key is gone, or we stepped down: start a fresh candidacy."""


class Election:
    """One candidate. ``await run(lead)`` campaigns forever; ``lead(term)`` runs while
    this candidate leads and is cancelled (and awaited) before leadership can be lost."""

    def __init__(
        self,
        shards: ShardMap,
        layout: KeyLayout,
        candidate_id: str,
        settings: ElectionSettings | None = None,
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        self.settings = settings or ElectionSettings()
        self.settings.validate()
        if not candidate_id:
            raise ValueError("candidate id must not be empty")
        self.shards = shards
        self.layout = layout
        self.candidate_id = candidate_id
        self.clock = clock
        self.primary = shards.all()[0]
        self.term: Term | None = None
        """The current term while leading, else None."""
        self.leader_id: str | None = None
        """The leader as last observed (our own id while we lead)."""
        self.terms = 0
        """Terms won by this candidate."""
        self._candidates: dict[bytes, tuple[int, str]] = {}
        self._synced = False
        self._key: bytes | None = None
        self._revision = 0
        self._unrevoked: list[int] = []
        """Leases of ended candidacies whose revocation failed (etcd was down)."""
        self._renewed_at = 0.0
        self._changed = asyncio.Event()
        self._over = asyncio.Event()
        self._over_reason = ""

    # -- public view -----------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        return self.term is not None and self.term.active

    @property
    def epoch(self) -> int | None:
        return self.term.epoch if self.term is not None else None

    def fence(self, backend: EtcdBackend) -> list[Compare]:
        """The current term's fence for ``backend``; :class:`NotLeader` when not leading."""
        term = self.term
        if term is None:
            raise NotLeader(f"{self.candidate_id} is not the leader")
        return term.fence(backend)

    def overdue(self) -> bool:
        """No keepalive succeeded within the renew deadline (by our monotonic clock)."""
        return self.clock() - self._renewed_at > self.settings.renew_deadline

    # -- the loop --------------------------------------------------------------------

    async def run(self, lead: LeaderWork) -> None:
        """Campaign until cancelled; cancelling resigns (the lease is revoked)."""
        while True:
            try:
                await self._candidacy(lead)
            except KvstoreError as exc:
                log.warning("election: candidacy of %s failed: %s", self.candidate_id, exc)
            except Exception:
                log.exception("election: candidacy of %s crashed", self.candidate_id)
            await asyncio.sleep(self.settings.retry_period)

    async def _candidacy(self, lead: LeaderWork) -> None:
        settings = self.settings
        await self._revoke_ended()
        asked = self.clock()
        lease = await self.primary.grant(settings.lease_duration)
        self._renewed_at = asked
        key = self.layout.leader_prefix + f"{lease.id:x}".encode()
        try:
            created = await self.primary.txn(
                [absent(key)], [Put(key, self.candidate_id.encode(), lease.id)]
            )
            if not created.succeeded:
                raise KvstoreError(f"leader key {key!r} exists already")
            self._key, self._revision = key, created.revision
            self._synced = False
            self._candidates = {}
            self._over = asyncio.Event()
            self._over_reason = ""
            log.info(
                "election: %s is a candidate (key %s, revision %d)",
                self.candidate_id,
                key.decode(errors="replace"),
                created.revision,
            )
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(self._keepalive(lease.id), name="election:keepalive"),
                    group.create_task(self._observe(), name="election:observe"),
                    group.create_task(self._campaign(lead), name="election:campaign"),
                ]
                await self._over.wait()
                term = self.term
                if term is not None:
                    term.lose(self._over_reason)  # fence() refuses from here on
                for task in tasks:
                    task.cancel()  # leader work first stops, with the campaign task
            if term is not None:
                log.warning(
                    "election: %s stepped down (epoch %d): %s",
                    self.candidate_id,
                    term.epoch,
                    self._over_reason,
                )
            log.info("election: candidacy of %s ended: %s", self.candidate_id, self._over_reason)
        finally:
            self._key = None
            # Resign: the key goes with the lease, so the next candidate leads at once.
            self._unrevoked.append(lease.id)
            await self._revoke_ended()

    async def _revoke_ended(self) -> None:
        """Revoke the leases of ended candidacies. One that could not be revoked when it
        ended (etcd down: the usual reason to step down) is revoked as soon as etcd
        answers again, so its key does not hold off the next leader for a whole TTL."""
        for lease_id in list(self._unrevoked):
            try:
                async with asyncio.timeout(self.primary.settings.request_timeout):
                    await self.primary.revoke(lease_id)
            except (Unreachable, NoLeader, Timeout, TimeoutError):
                return  # etcd still down: try again before the next candidacy
            except KvstoreError:
                pass  # not found: expired meanwhile
            self._unrevoked.remove(lease_id)

    def _end(self, reason: str) -> None:
        if not self._over.is_set():
            self._over_reason = reason
            self._over.set()

    # -- candidacy tasks -------------------------------------------------------------

    async def _keepalive(self, lease_id: int) -> None:
        period = self.settings.retry_period
        while True:
            call = self.primary.keepalive_stream()
            try:
                while True:
                    sent = self.clock()
                    await call.write(rpc.LeaseKeepAliveRequest(ID=lease_id))
                    # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel.
                    async with asyncio.timeout(max(1.0, period)):
                        response = await call.read()
                    if response is grpc.aio.EOF:
                        raise KvstoreError("lease keepalive stream ended")
                    if response.TTL <= 0:
                        self._end(f"lease {lease_id:x} expired")
                        return
                    self._renewed_at = max(self._renewed_at, sent)
                    await asyncio.sleep(period)
            except grpc.aio.AioRpcError as exc:
                log.info("election: keepalive failed: %s", translate(exc, self.primary.name))
            except (KvstoreError, TimeoutError, asyncio.InvalidStateError) as exc:
                log.info("election: keepalive failed: %s", exc or type(exc).__name__)
            finally:
                call.cancel()
            if self.clock() - self._renewed_at > self.settings.lease_duration:
                self._end(f"lease {lease_id:x} not renewed for its whole TTL")
                return
            await asyncio.sleep(period / 2)

    async def _observe(self) -> None:
        prefix = self.layout.leader_prefix
        async for event in ListWatcher(self.primary, prefix).events():
            if event.type is EventType.LIST_DONE:
                self._synced = True
            elif event.type is EventType.PUT:
                value = event.value.decode("utf-8", errors="replace")
                self._candidates[event.key] = (event.create_revision, value)
            else:
                self._candidates.pop(event.key, None)
            if not self._synced:
                continue
            self._changed.set()
            self._refresh_leader()
            if self._key is not None and self._key not in self._candidates:
                self._end("our leader key is gone (lease expired or deleted)")
                return

    def _refresh_leader(self) -> None:
        if not self._candidates:
            self.leader_id = None
            return
        _, leader = min(self._candidates.values())
        if leader != self.leader_id:
            log.info("election: leader is now %s", leader)
        self.leader_id = leader

    def _leads(self) -> bool:
        if not self._synced or self._key not in self._candidates:
            return False
        return min(self._candidates.values())[0] == self._revision

    async def _campaign(self, lead: LeaderWork) -> None:
        while True:
            self._changed.clear()
            if self._leads():
                break
            await self._changed.wait()  # re-check when a key before ours goes
        key = self._key
        assert key is not None
        term = Term(self, epoch=self._revision, leader_key=key, primary=self.primary)
        try:
            established = await self._establish(term)
        except KvstoreError as exc:
            self._end(f"could not write the epoch: {exc}")
            return
        if not established:
            self._end("a newer epoch exists on some cluster")
            return
        if self.overdue():
            self._end("lease renewal overdue before leading")
            return
        self.term = term
        self.terms += 1
        self.leader_id = self.candidate_id
        log.info("election: %s is the leader (epoch %d)", self.candidate_id, term.epoch)
        reason = "leader work returned"
        try:
            async with asyncio.TaskGroup() as group:
                work = group.create_task(lead(term), name="election:leader-work")
                while True:
                    why = self._lost(term)
                    if why is not None:
                        reason = why
                        break
                    if work.done():
                        break
                    await asyncio.sleep(_GUARD_POLL_S)
                term.lose(reason)  # fence() refuses from here on
                work.cancel()
        finally:
            term.lose("stepped down")
            self.term = None
        log.warning(
            "election: %s stepped down (epoch %d): %s", self.candidate_id, term.epoch, reason
        )
        self._end(f"stepped down: {reason}")

    def _lost(self, term: Term) -> str | None:
        if term.lost_reason is not None:
            return term.lost_reason
        if self.overdue():
            return f"no lease renewal for {self.settings.renew_deadline:g} s"
        if self._over.is_set():
            return self._over_reason
        if self._synced and term.leader_key not in self._candidates:
            return "our leader key is gone"
        return None

    # -- the epoch -------------------------------------------------------------------

    async def _establish(self, term: Term) -> bool:
        """Write our epoch on every cluster; False when a newer epoch exists anywhere."""
        results = await asyncio.gather(
            *(self._establish_on(b, term) for b in self.shards.all()), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return all(results)

    async def _establish_on(self, backend: EtcdBackend, term: Term) -> bool:
        key = self.layout.operator_epoch
        primary = backend is self.primary
        guard = [create_revision_is(term.leader_key, term.epoch)] if primary else []
        reads = [Get(key), Get(term.leader_key)] if primary else [Get(key)]
        for _ in range(_EPOCH_ATTEMPTS):
            result = await backend.txn(
                [value_is(key, term.value, "<"), *guard], [Put(key, term.value)], reads
            )
            if result.succeeded:
                return True
            if primary and not result.results[1].kvs:
                return False  # our leader key is gone: we do not lead
            kvs = result.results[0].kvs
            if not kvs:
                created = await backend.txn([absent(key), *guard], [Put(key, term.value)])
                if created.succeeded:
                    return True
                continue
            current = kvs[0]
            if current.value == term.value:
                return True
            parsed = parse_epoch(current.value)
            if parsed is None:
                log.warning(
                    "election: malformed epoch %r on %s; overwriting it",
                    current.value[:64],
                    backend.name,
                )
                replaced = await backend.txn(
                    [mod_revision_is(key, current.mod_revision), *guard], [Put(key, term.value)]
                )
                if replaced.succeeded:
                    return True
                continue
            if parsed[0] >= term.epoch:
                log.warning(
                    "election: %s holds epoch %d of %s, not below ours (%d)",
                    backend.name,
                    parsed[0],
                    parsed[1],
                    term.epoch,
                )
                return False
        raise KvstoreError(f"epoch key on {backend.name} kept changing", endpoint=backend.name)
