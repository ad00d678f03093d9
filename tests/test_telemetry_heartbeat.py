"""The telemetry endpoint and the heartbeat writer/monitor against real etcd."""

from __future__ import annotations

import asyncio
import contextlib
import time

from helpers import backend_for, eventually
from prometheus_client import CollectorRegistry, Counter

from controlplane.kvstore.embedded import EmbeddedEtcd
from controlplane.kvstore.heartbeat import Heartbeat, HeartbeatMonitor, write_heartbeat
from controlplane.kvstore.keys import KeyLayout
from controlplane.kvstore.types import absent
from controlplane.telemetry import Check, TelemetryServer, http_get


async def test_metrics_and_health_endpoints() -> None:
    registry = CollectorRegistry()
    Counter("cp_test_things_total", "things", registry=registry).inc(3)
    checks = {"etcd": Check(True, "reachable"), "heartbeat": Check(False, "stale 40s > 30s")}
    server = TelemetryServer(registry, lambda: checks)
    await server.start()
    try:
        status, text = await http_get("127.0.0.1", server.port, "/metrics")
        assert status == 200 and "cp_test_things_total 3.0" in text
        status, body = await http_get("127.0.0.1", server.port, "/readyz")
        assert status == 503 and body["ready"] is False
        assert body["checks"]["heartbeat"] == {"ok": False, "detail": "stale 40s > 30s"}
        assert body["checks"]["etcd"]["ok"] is True
        status, body = await http_get("127.0.0.1", server.port, "/healthz")
        assert status == 200 and body["ready"] is False
        checks["heartbeat"] = Check(True)
        status, _ = await http_get("127.0.0.1", server.port, "/readyz")
        assert status == 200
        status, _ = await http_get("127.0.0.1", server.port, "/nope")
        assert status == 404
    finally:
        await server.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_heartbeat_monitor_uses_local_receive_time(etcd1: EmbeddedEtcd) -> None:
    layout = KeyLayout()
    clock = FakeClock()
    async with backend_for(etcd1.client_urls) as backend:
        monitor = HeartbeatMonitor(backend, layout, interval=15, clock=clock)
        task = asyncio.create_task(monitor.run())
        try:
            assert not monitor.stale()  # a fresh monitor grants one window
            clock.now += 31
            assert monitor.stale()
            # The writer's wall clock is far in the past: irrelevant, we judge by receipt.
            beat = Heartbeat(ts=time.time() - 3600, seq=1, writer="op-a", interval=10)
            assert await write_heartbeat(backend, layout, beat)
            await eventually(lambda: monitor.updates == 1, message="heartbeat seen")
            assert not monitor.stale() and monitor.threshold == 20
            clock.now += 19
            assert not monitor.stale()
            clock.now += 2
            assert monitor.stale()
            await backend.put(layout.heartbeat, b"garbage")
            await eventually(lambda: monitor.malformed == 1, message="malformed counted")
            assert monitor.last == beat
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_fenced_heartbeat_write(etcd1: EmbeddedEtcd) -> None:
    layout = KeyLayout()
    async with backend_for(etcd1.client_urls) as backend:
        await backend.put(b"cp/.operator/leader/x", b"me")
        beat = Heartbeat(ts=time.time(), seq=2, writer="op-b", interval=15)
        assert not await write_heartbeat(backend, layout, beat, [absent(b"cp/.operator/leader/x")])
        assert await backend.get(layout.heartbeat) is None
