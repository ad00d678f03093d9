"""The restart decision and the heartbeat's age, as pure logic (one outage, one restart)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import cast

import pytest

from controlplane.agent.health import Failure, Observation, RestartArm, ShardHealth
from controlplane.kvstore.backend import EtcdBackend
from controlplane.kvstore.heartbeat import Heartbeat, HeartbeatMonitor
from controlplane.kvstore.keys import KeyLayout


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def obs(
    *,
    quorum: Failure | None = None,
    stale: bool = False,
    read: int | None = 100,
    beat: int | None = None,
) -> Observation:
    return Observation(
        quorum_error=quorum,
        error_detail="down" if quorum else "",
        heartbeat_age=9.0 if stale else 0.1,
        heartbeat_threshold=2.0,
        heartbeat_stale=stale,
        read_revision=None if quorum else read,
        beat_revision=beat,
    )


def test_a_quorum_loss_then_a_late_heartbeat_is_one_restart() -> None:
    arm = RestartArm()
    health = ShardHealth("default", max_errors=2, arm=arm)
    assert health.record(obs(read=100, beat=90), ready=True) is None  # first ready read: floor
    assert health.record(obs(read=110, beat=105), ready=True) is None  # a beat after it: armed
    assert arm.heartbeat
    health.record(obs(quorum=Failure.NO_QUORUM), ready=True)
    assert health.record(obs(quorum=Failure.NO_QUORUM), ready=True) is Failure.NO_QUORUM
    arm.restarted()  # the agent restarts; the next session carries the count
    health = ShardHealth("default", max_errors=2, arm=arm).carry(health)
    # etcd is back, the operator still re-elects: stale, but no second restart.
    for _ in range(5):
        assert health.record(obs(read=120, beat=105, stale=True), ready=True) is None
    assert not health.healthy and health.failure is Failure.HEARTBEAT_STALE
    # A beat written before the restart but seen late (a lagging watch) is no proof...
    health.record(obs(read=121, beat=118, stale=False), ready=True)
    assert not arm.heartbeat
    # ...one written after the first read of the new session is.
    assert health.record(obs(read=130, beat=125), ready=True) is None
    assert arm.heartbeat and health.healthy
    # The operator dies later: that is a new outage, and it restarts once.
    health.record(obs(read=140, beat=125, stale=True), ready=True)
    assert health.record(obs(read=141, beat=125, stale=True), ready=True) is Failure.HEARTBEAT_STALE
    assert health.record(obs(read=142, beat=125, stale=True), ready=True) is None


def test_connection_failures_rearm_only_once_a_ready_session_reads() -> None:
    arm = RestartArm()
    health = ShardHealth("default", max_errors=1, arm=arm)
    # A process whose first session never got ready: a restart would mend nothing.
    assert health.record(obs(quorum=Failure.UNREACHABLE), ready=False) is None
    assert health.record(obs(read=100), ready=False) is None and not arm.connection
    assert health.record(obs(read=101), ready=True) is None and arm.connection
    assert health.record(obs(quorum=Failure.UNREACHABLE), ready=True) is Failure.UNREACHABLE
    arm.restarted()
    # The new session re-lists while etcd is swamped by every agent doing the same: its
    # reads succeed now and then and time out now and then. The same outage: no restart.
    for _ in range(3):
        assert health.record(obs(read=110), ready=False) is None
        assert health.record(obs(quorum=Failure.NO_QUORUM), ready=False) is None
    assert not arm.connection
    # Ready, and a read succeeds: a later outage is a new one.
    assert health.record(obs(read=120), ready=True) is None and arm.connection
    assert health.record(obs(quorum=Failure.UNREACHABLE), ready=True) is Failure.UNREACHABLE


def test_a_heartbeat_restart_disarms_the_connection_trigger_until_ready_again() -> None:
    arm = RestartArm()
    health = ShardHealth("default", max_errors=2, arm=arm)
    assert health.record(obs(read=100, beat=90), ready=True) is None
    assert health.record(obs(read=110, beat=105), ready=True) is None
    assert arm.connection and arm.heartbeat
    # the operators stop: the heartbeat goes stale, one restart
    health.record(obs(read=120, beat=105, stale=True), ready=True)
    assert health.record(obs(read=121, beat=105, stale=True), ready=True) is (
        Failure.HEARTBEAT_STALE
    )
    arm.restarted()
    health = ShardHealth("default", max_errors=2, arm=arm).carry(health)
    # every agent re-lists at once and etcd answers late: the same outage, no restart
    for _ in range(3):
        assert health.record(obs(quorum=Failure.NO_QUORUM), ready=False) is None
    assert not arm.connection
    # ready, a quorum read: a later outage restarts again
    assert health.record(obs(read=130, beat=125), ready=True) is None and arm.connection
    health.record(obs(quorum=Failure.NO_QUORUM), ready=True)
    assert health.record(obs(quorum=Failure.NO_QUORUM), ready=True) is Failure.NO_QUORUM


def _monitor(clock: Clock) -> HeartbeatMonitor:
    # The watch (run()) is not started: these tests feed note() as it and the reads do.
    backend = cast(EtcdBackend, SimpleNamespace(name="default"))
    return HeartbeatMonitor(backend, KeyLayout(), interval=1.0, clock=clock)


def _beat(seq: int) -> bytes:
    return Heartbeat(ts=0.0, seq=seq, writer="op-a", interval=1.0).encode()


def test_monitor_takes_beats_in_revision_order_from_watch_and_reads() -> None:
    clock = Clock()
    monitor = _monitor(clock)
    monitor.note(_beat(2), revision=20)  # a quorum read saw it first
    clock.now += 1.5
    monitor.note(_beat(1), revision=10)  # the lagging watch delivers an older one
    assert monitor.last is not None and monitor.last.seq == 2 and monitor.revision == 20
    assert monitor.age() == pytest.approx(1.5)
    monitor.note(_beat(2), revision=20)  # the watch catches up: no news
    assert monitor.updates == 1
    monitor.note(_beat(3), revision=30)
    assert monitor.updates == 2 and monitor.age() == 0.0


def test_monitor_grants_a_window_after_an_etcd_disturbance() -> None:
    clock = Clock()
    monitor = _monitor(clock)
    monitor.note(_beat(1), revision=10)
    clock.now += 1.9
    monitor.disturbed()  # e.g. etcd elected a new leader: the operator's writes stalled
    clock.now += 1.9
    assert monitor.age() == pytest.approx(1.9) and not monitor.stale()
    clock.now += 0.2
    assert monitor.stale()


def test_a_malformed_write_is_counted_once_however_often_it_is_seen() -> None:
    monitor = _monitor(Clock())
    for revision in (10, 10, 10):  # the watch and two quorum reads see one write
        monitor.note(b"garbage", revision)
    assert monitor.malformed == 1 and monitor.last is None
    monitor.note(b"garbage", 11)  # written again: counted again
    assert monitor.malformed == 2 and monitor.revision == 0  # no beat, no proof for the arm
