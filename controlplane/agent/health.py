"""Per-shard kvstore health and the restart decision (pure logic, no I/O).

Each status check gives one :class:`Observation` per shard: did a quorum read succeed,
and is the operator's heartbeat fresh. :class:`ShardHealth` counts consecutive failed
checks within one session; after ``max_errors`` the shard is unhealthy. Whether that
unhealthy state *restarts* the agent's control-plane side is decided by
:class:`RestartArm`, which outlives sessions, so that one outage costs one restart:

* a connection or quorum failure restarts only while the arm is set; any restart (for
  whatever reason) disarms it and a successful quorum read *once the new session is
  ready* (listed, restored) re-arms it. While etcd stays down the fresh session just
  reports "unhealthy" and waits; and while hundreds of agents re-list after an outage,
  an etcd too busy to answer a quorum read in time is the same outage, not a new one
  (no restart storm). A process starts disarmed: restarting a session that never got
  ready mends nothing;
* a stale heartbeat restarts only if a heartbeat *written after* the last restart (an etcd
  revision above the first quorum read of a ready session after it) was seen, whatever that
  restart's reason: a dead operator is not a reason to restart again and again, and
  neither is an operator still re-electing after the etcd outage that caused the last
  restart. A beat that the new session merely re-lists, or that a lagging watch delivers
  late, is not an advance.

A new session carries the last one's error count and heartbeat evidence (the same old
heartbeat record re-listed is no news), so a restart never makes an outage look healthy;
the disarmed trigger is what keeps it from restarting again.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass


class Failure(enum.Enum):
    UNREACHABLE = "unreachable"
    NO_QUORUM = "no-quorum"
    HEARTBEAT_STALE = "heartbeat-stale"

    @property
    def is_connection(self) -> bool:
        return self is not Failure.HEARTBEAT_STALE


@dataclass(frozen=True, slots=True)
class Observation:
    """One status check of one shard."""

    quorum_error: Failure | None
    """UNREACHABLE or NO_QUORUM when the quorum read failed, else None."""
    error_detail: str
    heartbeat_age: float
    heartbeat_threshold: float
    heartbeat_stale: bool
    read_revision: int | None
    """The store's revision at the quorum read (None when it failed)."""
    beat_revision: int | None
    """The etcd revision that wrote the newest heartbeat the session has seen."""


@dataclass(slots=True)
class RestartArm:
    """What may trigger a restart for one shard; kept across sessions."""

    connection: bool = False
    heartbeat: bool = False
    floor: int | None = None
    """A heartbeat written after this store revision proves the operator alive since the
    last restart (None: not known yet; the first successful quorum read sets it)."""
    recoveries: int = 0
    """Restarts of this shard alone (its connection), the others carrying on."""

    def restarted(self) -> None:
        """The control plane restarted (for whatever reason): a stale heartbeat restarts
        it again only once a beat *written after* this restart was seen. After an etcd
        outage the operator re-elects, so its heartbeat is late for a while: that is the
        same outage, which has had its restart. (A beat written before the outage but
        seen late, as a lagging watch delivers it, proves nothing: hence revisions, not
        arrival.)

        The same goes for the connection trigger: a restart for a stale heartbeat makes
        the new session re-list like any other, and when every agent does so at once an
        etcd too busy to answer a quorum read in time is the outage that already had its
        restart (standard scale run: 200 agents, 10,000 endpoints, operators paused: each
        agent restarted for the heartbeat, then again for "no quorum" while re-listing).
        A ready session's quorum read re-arms it."""
        self.connection = False
        self.heartbeat = False
        self.floor = None

    def note(
        self, read_revision: int | None, beat_revision: int | None, stale: bool, ready: bool
    ) -> None:
        if read_revision is not None and ready:
            self.connection = True
        if self.floor is None:
            if ready:
                self.floor = read_revision  # beats written later than this read are news
        elif beat_revision is not None and beat_revision > self.floor and not stale:
            self.heartbeat = True


@dataclass(slots=True)
class ShardHealth:
    """One shard's health within one session."""

    name: str
    max_errors: int
    arm: RestartArm
    consecutive_errors: int = 0
    failure: Failure | None = None
    reason: str = ""
    checks: int = 0
    last: Observation | None = None
    failing: bool = False
    """This session's last quorum read failed: requests that need the shard fail fast.
    (Not carried to the next session, which starts from what it sees itself.)"""

    @property
    def healthy(self) -> bool:
        return self.consecutive_errors < self.max_errors

    def carry(self, previous: ShardHealth | None) -> ShardHealth:
        """Start from the last session's count: a restart does not make a failure healthy.

        (The restart decision is the arm's, which the restart has disarmed, so carrying
        the count never causes a second restart.)
        """
        if previous is not None:
            self.consecutive_errors = previous.consecutive_errors
            self.failure, self.reason, self.last = previous.failure, previous.reason, previous.last
        return self

    @property
    def reachable(self) -> bool | None:
        if self.last is None:
            return None
        return self.last.quorum_error is None

    def record(self, obs: Observation, *, ready: bool) -> Failure | None:
        """Count one check (``ready``: the session finished its startup); returns the
        failure that should restart the agent, if any."""
        self.checks += 1
        self.last = obs
        self.failing = obs.quorum_error is not None
        self.arm.note(obs.read_revision, obs.beat_revision, obs.heartbeat_stale, ready)
        if obs.quorum_error is not None:
            self.failure = obs.quorum_error
            label = "unreachable" if obs.quorum_error is Failure.UNREACHABLE else "no quorum"
            self.reason = f"{label}: {obs.error_detail}"
        elif obs.heartbeat_stale:
            self.failure = Failure.HEARTBEAT_STALE
            self.reason = (
                f"heartbeat stale (age {obs.heartbeat_age:.1f}s > "
                f"threshold {obs.heartbeat_threshold:.1f}s)"
            )
        else:
            self.consecutive_errors = 0
            self.failure = None
            self.reason = ""
            return None
        self.consecutive_errors += 1
        if self.healthy:
            return None
        if self.failure.is_connection and self.arm.connection:
            self.arm.connection = False
            return self.failure
        if self.failure is Failure.HEARTBEAT_STALE and self.arm.heartbeat:
            self.arm.heartbeat = False
            return self.failure
        return None

    def to_json(self) -> dict[str, object]:
        last = self.last
        if last is not None and math.isinf(last.heartbeat_threshold):
            last = None  # no heartbeat here (CRD mode): nothing to report, and JSON has no inf
        return {
            "name": self.name,
            "healthy": self.healthy,
            "state": "healthy" if self.healthy else f"unhealthy: {self.reason}",
            "reason": self.reason,
            "reachable": self.reachable,
            "consecutive_errors": self.consecutive_errors,
            "max_errors": self.max_errors,
            "heartbeat_age": None if last is None else round(last.heartbeat_age, 3),
            "heartbeat_threshold": None if last is None else last.heartbeat_threshold,
            "heartbeat_stale": None if last is None else last.heartbeat_stale,
            "restart_armed": {"connection": self.arm.connection, "heartbeat": self.arm.heartbeat},
            "recoveries": self.arm.recoveries,
            "checks": self.checks,
        }
