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
        if previous is not None:
            # A restarted session keeps what the last one knew: re-listing the same old
            # record is no news, so its age goes on from when it really arrived.
            self.last, self.received_at = previous.last, previous.received_at
            self.started_at = previous.started_at

    @property
    def threshold(self) -> float:
        return 2 * (self.last.interval if self.last is not None else self.interval)

    def age(self) -> float:
        """Seconds since the last update arrived (or since the monitor started)."""
        return self.clock() - (
            self.received_at if self.received_at is not None else self.started_at
        )

    def stale(self) -> bool:
        return self.age() > self.threshold

    async def run(self) -> None:
        key = self.layout.heartbeat
        async for event in ListWatcher(self.backend, key).events():
            if event.key != key or event.type is not EventType.PUT:
                continue
            try:
                beat = Heartbeat.decode(event.value)
            except codec.DecodeError as exc:
                self.malformed += 1
                if self._on_malformed is not None:
                    self._on_malformed()
                log.warning("malformed heartbeat on %s skipped: %s", self.backend.name, exc)
                continue
            if beat == self.last:
                continue  # the same record again (a re-list): not a new beat
            self.last = beat
            self.received_at = self.clock()
            self.updates += 1
