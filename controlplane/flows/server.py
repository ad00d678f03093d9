"""The agent's flow server: datapath events in, enriched flows kept in a ring, losses told.

:class:`FlowServer` configures the programs (``cp_flow_config``: aggregation, rate limit),
watches the ring buffer's fd with ``loop.add_reader`` (epoll, level-triggered: a batch
left behind wakes the loop again; no thread, no polling of the buffer), decodes each
record, turns it into a ``flow.Flow`` (:class:`~controlplane.flows.convert.FlowConverter`) and
keeps it in a :class:`~controlplane.flows.ring.FlowRing` of ``GetFlowsResponse`` entries.
Every ``lost_poll_interval`` it reads the kernel's loss counters (``cp_flow_lost``) and,
when they grew, puts a lost-event record into the ring, so every reader sees where flows
are missing and how many: losses are never silent.

Without kernel maps (a userspace datapath) it serves an empty ring (``source`` says so).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass
from typing import Final

from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import CollectorRegistry

from controlplane.datapath.flowevents import (
    Aggregation,
    FlowMaps,
    LostReason,
    RawFlow,
    RingBufferReader,
    decode_event,
)
from controlplane.flows.convert import DROP_REASONS, FlowConverter, Resolver
from controlplane.flows.metrics import FlowMetrics
from controlplane.flows.proto import flow_pb2 as pb
from controlplane.flows.proto import observer_pb2 as obs
from controlplane.flows.ring import FlowRing

__all__ = ["DEFAULT_CAPACITY", "FlowServer", "FlowSettings", "Status"]

log = logging.getLogger(__name__)

DEFAULT_CAPACITY: Final = 4095
BATCH: Final = 4096
"""Records taken per wakeup before the loop serves others (the fd stays readable)."""
_T_DROP: Final = 1
_FLAGS: Final = 0x17  # FIN, SYN, RST, ACK: what the TCP flag metric tells apart
_V4: Final = b"\x00" * 10 + b"\xff\xff"
_LOST_SOURCES: Final = {
    LostReason.RINGBUF_FULL: "kernel_ring_buffer",
    LostReason.RATE_LIMIT: "kernel_rate_limit",
}


@dataclass(frozen=True, slots=True)
class FlowSettings:
    capacity: int = DEFAULT_CAPACITY
    """Flows (and lost-event records) the ring keeps."""
    aggregation: Aggregation = Aggregation.MEDIUM
    """What the programs report: medium (drops, new flows, TCP flag changes, one per
    interval), none (every packet) or off."""
    rate_per_sec: int = 100_000
    """The programs' rate limit, events per second per CPU (0: unlimited)."""
    burst: int = 10_000
    """Depth of the rate limit's token bucket (events)."""
    report_interval_s: int = 5
    """medium: a busy flow is reported again at most this often per direction."""
    lost_poll_interval: float = 1.0
    """Seconds between reads of the kernel's loss counters."""


@dataclass(frozen=True, slots=True)
class Status:
    num_flows: int
    max_flows: int
    seen_flows: int
    uptime_ns: int
    flows_rate: float
    lost_ring_buffer: int
    lost_rate_limit: int
    source: str


class FlowServer:
    def __init__(
        self,
        node: str,
        settings: FlowSettings,
        resolver: Resolver,
        registry: CollectorRegistry,
        maps: FlowMaps | None = None,
    ) -> None:
        self.node = node
        self.settings = settings
        self.resolver = resolver
        self.maps = maps
        self.metrics = FlowMetrics(registry)
        self.metrics.ring_capacity.set(settings.capacity)
        self.ring: FlowRing[obs.GetFlowsResponse] = FlowRing(settings.capacity)
        self.seen = 0
        self.readers = 0
        """GetFlows calls being served."""
        self.lost: dict[LostReason, int] = dict.fromkeys(LostReason, 0)
        self.started = time.monotonic_ns()
        self._kernel_lost_base: dict[LostReason, int] | None = None
        self._rate_window: collections.deque[tuple[float, int]] = collections.deque()
        self._reader: RingBufferReader | None = None
        self._clock_offset = time.time_ns() - time.monotonic_ns()
        self._converter = FlowConverter(node, resolver)

    @property
    def source(self) -> str:
        return "kernel ring buffer" if self.maps is not None else "none (userspace datapath)"

    # -- taking events in ---------------------------------------------------------------

    def ingest(self, raw: RawFlow) -> None:
        """One datapath event into the ring (call :meth:`end_batch` after a batch)."""
        response = obs.GetFlowsResponse(node_name=self.node)
        wall_ns = raw.ktime_ns + self._clock_offset
        self._converter.fill(response.flow, raw, wall_ns)
        response.time.CopyFrom(response.flow.time)
        self.ring.push(response)
        self.seen += 1
        drop_reason = DROP_REASONS.get(raw.reason, 0) if raw.type == _T_DROP else 0
        self.metrics.count(
            (raw.type, drop_reason, raw.proto, raw.tcp_flags & _FLAGS, raw.src[:12] != _V4)
        )

    def end_batch(self) -> None:
        """After a batch of :meth:`ingest`: export the metrics, wake the readers."""
        self.metrics.flush()
        self.metrics.ring_flows.set(len(self.ring))
        self._converter.expire()
        self.ring.notify()

    def _record(self, view: memoryview) -> None:
        self.ingest(decode_event(view))

    def _readable(self) -> None:
        reader = self._reader
        if reader is None:
            return
        self._clock_offset = time.time_ns() - time.monotonic_ns()
        try:
            reader.drain(self._record, BATCH)
        except Exception:  # a bug in decoding must not kill the loop's reader
            log.exception("flow server: reading the ring buffer failed")
        self.end_batch()

    def push_lost(self, source: int, count: int, metric_source: str) -> None:
        """A lost-event record into the ring (for every reader) and the metric."""
        now = time.time_ns()
        stamp = Timestamp(seconds=now // 1_000_000_000, nanos=now % 1_000_000_000)
        lost = pb.LostEvent(source=source, num_events_lost=count)  # type: ignore[arg-type]
        self.ring.push(obs.GetFlowsResponse(lost_events=lost, node_name=self.node, time=stamp))
        self.metrics.lost_events(metric_source, count)
        self.ring.notify()

    def poll_kernel_losses(self) -> None:
        """Read ``cp_flow_lost``; a growth since the last read becomes a lost-event record.
        The counters are the pinned map's (they outlive agents): the first read is the base."""
        if self.maps is None:
            return
        counts = self.maps.lost_counts()
        if self._kernel_lost_base is None:
            self._kernel_lost_base = counts
            return
        for reason, total in counts.items():
            grown = total - self._kernel_lost_base.get(reason, 0)
            if grown > 0:
                self._kernel_lost_base[reason] = total
                self.lost[reason] += grown
                self.push_lost(pb.PERF_EVENT_RING_BUFFER, grown, _LOST_SOURCES[reason])

    # -- running ------------------------------------------------------------------------

    async def run(self) -> None:
        """Configure the programs and read their events until cancelled."""
        if self.maps is None:
            await asyncio.Event().wait()  # nothing to read: serve the (empty) ring
            return
        s = self.settings
        self.maps.configure(s.aggregation, s.rate_per_sec, s.burst, s.report_interval_s)
        self.poll_kernel_losses()  # the base
        reader = RingBufferReader(self.maps.events)
        loop = asyncio.get_running_loop()
        self._reader = reader
        loop.add_reader(reader.fileno(), self._readable)
        try:
            self._readable()  # what waited before we watched
            while True:
                await asyncio.sleep(s.lost_poll_interval)
                self._readable()  # (losses after the records that preceded them)
                self.poll_kernel_losses()
                self._sample_rate()
        finally:
            loop.remove_reader(reader.fileno())
            self._reader = None
            reader.close()

    def _sample_rate(self) -> None:
        now = time.monotonic()
        self._rate_window.append((now, self.seen))
        while self._rate_window and now - self._rate_window[0][0] > 60.0:
            self._rate_window.popleft()

    def status(self) -> Status:
        rate = 0.0
        if self._rate_window:
            then, seen_then = self._rate_window[0]
            elapsed = time.monotonic() - then
            if elapsed > 0:
                rate = (self.seen - seen_then) / elapsed
        return Status(
            num_flows=len(self.ring),
            max_flows=self.ring.capacity,
            seen_flows=self.seen,
            uptime_ns=time.monotonic_ns() - self.started,
            flows_rate=rate,
            lost_ring_buffer=self.lost[LostReason.RINGBUF_FULL],
            lost_rate_limit=self.lost[LostReason.RATE_LIMIT],
            source=self.source,
        )
