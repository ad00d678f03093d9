"""The heartbeat record the operator leader writes on every shard."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from controlplane import codec
from controlplane.kvstore.backend import EtcdBackend
from controlplane.kvstore.keys import KeyLayout
from controlplane.kvstore.types import Compare, EventType, Put
from controlplane.kvstore.watch import ListWatcher

log = logging.getLogger(__name__)

KIND = "heartbeat"


@dataclass(frozen=True, slots=True)
class Heartbeat:
    ts: float
    """Writer's wall-clock time (informational: monitors judge age by local receive time)."""
    seq: int
    """Increases with every beat of one writer."""
    writer: str
    """Identity of the operator replica that wrote it."""
    interval: float
    """Seconds between beats; stale after twice this."""

    def encode(self) -> bytes:
        return codec.encode(
            KIND, {"ts": self.ts, "seq": self.seq, "writer": self.writer, "interval": self.interval}
        )

    @classmethod
    def decode(cls, raw: bytes) -> Heartbeat:
        data: Any = codec.decode(KIND, raw)
        try:
            ts, seq, writer, interval = data["ts"], data["seq"], data["writer"], data["interval"]
        except (TypeError, KeyError) as exc:
            raise codec.DecodeError(f"heartbeat: missing field {exc}") from exc
        if (
            not isinstance(ts, int | float)
            or not isinstance(interval, int | float)
            or interval <= 0
        ):
            raise codec.DecodeError("heartbeat: ts and interval must be positive numbers")
        if not isinstance(seq, int) or not isinstance(writer, str):
            raise codec.DecodeError("heartbeat: seq must be an int and writer a string")
        return cls(float(ts), seq, writer, float(interval))


async def write_heartbeat(
    backend: EtcdBackend, layout: KeyLayout, beat: Heartbeat, fence: Sequence[Compare] = ()
) -> bool:
    """Put the heartbeat, guarded by ``fence`` (the leader's key); False when fenced off."""
    result = await backend.txn(list(fence), [Put(layout.heartbeat, beat.encode())])
    return result.succeeded


class HeartbeatMonitor:
    """Follows one shard's heartbeat and judges its age by our own monotonic clock.

    No wall clocks are compared: the age is the time since *we* received the last update.
    Before the first update the age counts from when the monitor started, so a fresh agent
    gives the operator one full staleness window before it complains. A monitor that
    replaces another (an agent's restarted session) carries its evidence over.
    """

    def __init__(
        self,
        backend: EtcdBackend,
        layout: KeyLayout,
        *,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
        metrics_malformed: Callable[[], None] | None = None,
        previous: HeartbeatMonitor | None = None,
    ) -> None:
        self.backend = backend
        self.layout = layout
        self.interval = interval
        """Expected interval; the writer's own ``interval`` field overrides it once seen."""
        self.clock = clock
        self.last: Heartbeat | None = None
        self.received_at: float | None = None
        self.started_at = clock()
        self.updates = 0
        self.malformed = 0
        self._on_malformed = metrics_malformed
        self.grace_from = float("-inf")
        """When etcd was last seen disturbed (see :meth:`disturbed`)."""
        self.revision = 0
        """The etcd revision that wrote :attr:`last`."""
        self._seen = 0
        """The newest revision of the key seen, valid or not."""
        if previous is not None:
            # A restarted session keeps what the last one knew: re-listing the same old
            # record is no news, so its age goes on from when it really arrived.
            self.last, self.received_at = previous.last, previous.received_at
            self.started_at, self.grace_from = previous.started_at, previous.grace_from
            self.revision, self._seen = previous.revision, previous._seen

    @property
    def threshold(self) -> float:
        return 2 * (self.last.interval if self.last is not None else self.interval)

    def age(self) -> float:
        """Seconds since the last update arrived (or since the monitor started), counted
        from etcd's last disturbance if that came later."""
        since = self.received_at if self.received_at is not None else self.started_at
        return self.clock() - max(since, self.grace_from)

    def stale(self) -> bool:
        return self.age() > self.threshold

    async def run(self) -> None:
        key = self.layout.heartbeat
        async for event in ListWatcher(self.backend, key).events():
            if event.key == key and event.type is EventType.PUT:
                self.note(event.value, event.revision)

    def note(self, raw: bytes, revision: int) -> None:
        """The heartbeat record written at ``revision``, seen by the watch or by a read: a
        new beat when written later than the last one (the same record again, re-listed or
        read, is no news, and an older one arriving late is ignored)."""
        if revision <= self._seen:
            return
        self._seen = revision
        try:
            beat = Heartbeat.decode(raw)
        except codec.DecodeError as exc:
            self.malformed += 1  # once per write, whether the watch or a read saw it
            if self._on_malformed is not None:
                self._on_malformed()
            log.warning("malformed heartbeat on %s skipped: %s", self.backend.name, exc)
            return
        self.revision = revision
        if beat == self.last:
            return
        self.last = beat
        self.received_at = self.clock()
        self.updates += 1

    def disturbed(self) -> None:
        """etcd itself was disturbed just now (a failed quorum read, a leader election):
        the operator's writes were disturbed too, so its heartbeat gets a full window from
        now before it counts as stale. A stale heartbeat is evidence against the operator
        only while etcd is well."""
        self.grace_from = self.clock()
