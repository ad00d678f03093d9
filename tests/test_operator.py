"""cp-operator as real processes against real etcd: failover, fencing, bad input, GC."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from helpers import backend_for, eventually

from controlplane import codec
from controlplane.kvstore.backend import EtcdBackend
from controlplane.kvstore.embedded import EmbeddedEtcd
from controlplane.kvstore.heartbeat import Heartbeat
from controlplane.kvstore.keys import KeyLayout
from controlplane.kvstore.types import EventType
from controlplane.kvstore.watch import ListWatcher
from controlplane.model import Endpoint, Node, NodeName, NumericIdentity
from controlplane.telemetry import http_get

LAYOUT = KeyLayout()
LEASE, RENEW, RETRY, BEAT = 3, 2.0, 0.5, 0.5
FAST_FLAGS = [
    f"--heartbeat-interval={BEAT}",
    f"--lease-duration={LEASE}",
    f"--renew-deadline={RENEW}",
    f"--retry-period={RETRY}",
    "--gc-interval=0.5",
    "--metrics-address=127.0.0.1:0",
    "--timeout=3",
]
REPO = Path(__file__).resolve().parent.parent


class OperatorProcess:
    """One cp-operator process; its stderr goes to a file the test reads."""

    def __init__(self, tmp_path: Path, name: str, endpoints: list[str], *extra: str) -> None:
        self.name = name
        self.log_path = tmp_path / f"{name}.log"
        self.args = [
            sys.executable,
            "-m",
            "controlplane.operator.main",
            f"--kvstore-endpoints={','.join(endpoints)}",
            f"--id={name}",
            *FAST_FLAGS,
            *extra,
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.args, stdout=subprocess.DEVNULL, stderr=log, cwd=REPO, env=dict(os.environ)
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def port(self) -> int | None:
        match = re.search(r"listening on http://127\.0\.0\.1:(\d+)", self.log())
        return int(match.group(1)) if match else None

    async def wait_port(self) -> int:
        port = await eventually(self.port, timeout=30, message=f"{self.name} listening")
        assert port is not None
        return port

    async def metrics(self) -> str:
        status, text = await http_get("127.0.0.1", await self.wait_port(), "/metrics")
        assert status == 200
        assert isinstance(text, str)
        return text

    async def sample(self, name: str, labels: str = "") -> float | None:
        """A metric's value (``labels`` as rendered, e.g. ``resource="node"``)."""
        pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "")
        match = re.search(rf"^{pattern} (\S+)$", await self.metrics(), re.MULTILINE)
        return float(match.group(1)) if match else None

    async def health(self, path: str = "/healthz") -> tuple[int, Any]:
        return await http_get("127.0.0.1", await self.wait_port(), path)

    async def is_leader(self) -> bool:
        return await self.sample("cp_operator_leader") == 1.0

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float = 20) -> int:
        assert self.proc is not None
        proc = self.proc
        await eventually(lambda: proc.poll() is not None, timeout=timeout, message="exit")
        code = proc.returncode
        assert code is not None
        return code

    async def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
        try:
            await self.wait_exit(timeout=15)
        except AssertionError:
            self.proc.kill()
            self.proc.wait()


@dataclass(frozen=True)
class Beat:
    revision: int
    writer: str
    seq: int


class BeatRecorder:
    """Every heartbeat write as etcd orders it (the watch sees each revision once)."""

    def __init__(self, backend: EtcdBackend) -> None:
        self.backend = backend
        self.beats: list[Beat] = []

    async def run(self) -> None:
        async for event in ListWatcher(self.backend, LAYOUT.heartbeat).events():
            if event.type is not EventType.PUT:
                continue
            with contextlib.suppress(codec.DecodeError):
                beat = Heartbeat.decode(event.value)
                self.beats.append(Beat(event.revision, beat.writer, beat.seq))

    def by(self, writer: str) -> list[Beat]:
        return [b for b in self.beats if b.writer == writer]


@contextlib.asynccontextmanager
async def recording(backend: EtcdBackend) -> AsyncIterator[BeatRecorder]:
    recorder = BeatRecorder(backend)
    task = asyncio.create_task(recorder.run(), name="beat-recorder")
    try:
        yield recorder
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def operators(*procs: OperatorProcess) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for proc in procs:
            await proc.stop()


async def register(backend: EtcdBackend, *names: str) -> None:
    for name in names:
        node = Node(name=NodeName(name))
        await backend.put(LAYOUT.node("default", name), codec.encode("node", node.to_dict()))


async def claims(backend: EtcdBackend) -> dict[str, list[str]]:
    """Node -> the CIDRs claimed for it."""
    prefix = LAYOUT.ipam_cidr_prefix("default")
    out: dict[str, list[str]] = {}
    for kv in (await backend.list_prefix(prefix)).kvs:
        node = codec.decode("cidr-claim", kv.value)["node"]
        out.setdefault(node, []).append(kv.key[len(prefix) :].decode())
    return out


async def all_claimed(backend: EtcdBackend, names: list[str]) -> bool:
    return set(names) <= set(await claims(backend))


def assert_one_cidr_per_node(found: dict[str, list[str]]) -> None:
    doubles = {node: cidrs for node, cidrs in found.items() if len(cidrs) != 1}
    assert doubles == {}, f"nodes with several CIDRs: {doubles}"
    cidrs = [c for cs in found.values() for c in cs]
    assert len(cidrs) == len(set(cidrs))


def test_bad_flags_and_config_exit_2(tmp_path: Path) -> None:
    base = [sys.executable, "-m", "controlplane.operator.main"]
    cases = [
        ["--no-such-flag"],
        ["--heartbeat-interval=-1"],
        ["--kvstore-endpoints=not-a-url"],
        [f"--kvstore-config={tmp_path / 'missing.yaml'}"],
        ["--kvstore-endpoints=http://127.0.0.1:2379", "--renew-deadline=20"],
        ["--kvstore-endpoints=http://127.0.0.1:2379", "--cluster-pool-cidr=10.0.0.0/33"],
        ["--kvstore-endpoints=http://127.0.0.1:2379", "--metrics-address=nowhere"],
        ["--store=doublewrite-readcrd"],  # no kvstore
        ["--store=doublewrite-readkvstore", "--kvstore-endpoints=http://127.0.0.1:2379",
         f"--kubeconfig={tmp_path / 'missing-kubeconfig'}"],
        ["--store=doublewrite-readcrd", "--kvstore-endpoints=http://127.0.0.1:2379",
         "--migration-peer-kubeconfig=/dev/null"],  # both stores are at hand
    ]  # fmt: skip
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("clusters: [{name: a, endpoints: [http://x:1]}]\nbogus: 1\n")
    cases.append([f"--kvstore-config={bad_yaml}"])
    for args in cases:
        result = subprocess.run(base + args, capture_output=True, cwd=REPO, timeout=60)
        lines = result.stderr.decode().strip().splitlines()
        assert result.returncode == 2, (args, result.stderr)
        assert len(lines) == 1 and lines[0].startswith("cp-operator: error:"), (args, lines)


async def test_failover_after_kill_takes_over_within_lease(
    etcd1: EmbeddedEtcd, tmp_path: Path
) -> None:
    a = OperatorProcess(tmp_path, "op-a", etcd1.client_urls)
    b = OperatorProcess(tmp_path, "op-b", etcd1.client_urls)
    first = [f"node-{i}" for i in range(6)]
    later = [f"node-{i}" for i in range(6, 14)]
    async with backend_for(etcd1.client_urls) as backend, operators(a, b):
        await register(backend, *first)
        a.start()
        await eventually(a.is_leader, timeout=30, message="op-a leads")
        b.start()
        await b.wait_port()
        await eventually(lambda: _following(b, "op-a"), timeout=30, message="op-b follows")
        assert await b.sample("cp_operator_leader") == 0.0
        await eventually(lambda: all_claimed(backend, first), message="first nodes get CIDRs")
        # the gauge is set once the claim's write returned: poll, the write is seen first
        await eventually(
            lambda: _equals(a, "cp_ipam_cidrs_in_use", "", len(first)), message="CIDRs in use"
        )

        async with recording(backend) as beats:
            await eventually(lambda: beats.by("op-a"), message="op-a beats")
            assert a.proc is not None
            a.proc.kill()  # SIGKILL: no resignation, the lease has to expire
            killed_at = time.monotonic()
            await register(backend, *later)  # arrive during the failover
            limit = LEASE + RETRY + 6.0  # generous slack for a loaded 2-core machine
            await eventually(lambda: beats.by("op-b"), timeout=limit, message="op-b beats")
            took = time.monotonic() - killed_at
            assert took <= limit, took

        await eventually(lambda: all_claimed(backend, first + later), message="later nodes")
        assert await b.is_leader()
        found = await claims(backend)
        assert_one_cidr_per_node(found)
        assert set(found) == set(first + later)
        status, body = await b.health("/readyz")
        assert status == 200 and body["checks"]["election"]["detail"].startswith("leader")

        b.signal(signal.SIGTERM)
        assert await b.wait_exit() == 0
        leader_keys = await backend.list_prefix(LAYOUT.leader_prefix)
        assert leader_keys.kvs == ()  # resigned: the lease was revoked


async def test_paused_leader_is_fenced_and_rejoins_as_follower(
    etcd1: EmbeddedEtcd, tmp_path: Path
) -> None:
    a = OperatorProcess(tmp_path, "op-a", etcd1.client_urls)
    b = OperatorProcess(tmp_path, "op-b", etcd1.client_urls)
    async with backend_for(etcd1.client_urls) as backend, operators(a, b):
        await register(backend, "node-0", "node-1")
        a.start()
        await eventually(a.is_leader, timeout=30, message="op-a leads")
        b.start()
        await eventually(lambda: _following(b, "op-a"), timeout=30, message="op-b follows")
        await eventually(lambda: all_claimed(backend, ["node-0", "node-1"]))

        async with recording(backend) as beats:
            await eventually(lambda: beats.by("op-a"), message="op-a beats")
            a.signal(signal.SIGSTOP)
            await eventually(
                lambda: beats.by("op-b"), timeout=LEASE + RETRY + 10, message="op-b takes over"
            )
            takeover = beats.by("op-b")[0].revision
            await register(backend, "node-2", "node-3")
            await eventually(lambda: all_claimed(backend, [f"node-{i}" for i in range(4)]))
            resumed_at = len(a.log())
            a.signal(signal.SIGCONT)
            await eventually(
                lambda: "stepped down" in a.log()[resumed_at:], message="op-a steps down"
            )
            await eventually(lambda: _following(a, "op-b"), timeout=30, message="op-a follows")
            assert await a.sample("cp_operator_leader") == 0.0
            # Let op-b beat a few more times after op-a woke up.
            seen = len(beats.by("op-b"))
            await eventually(lambda: len(beats.by("op-b")) >= seen + 4, message="more beats")
            late = [beat for beat in beats.by("op-a") if beat.revision > takeover]
            assert late == [], f"the deposed leader wrote after the takeover: {late}"
            assert "allocated CIDR" not in a.log()[resumed_at:]
        assert await b.is_leader()
        assert_one_cidr_per_node(await claims(backend))


async def test_malformed_values_are_skipped_and_counted(
    etcd1: EmbeddedEtcd, tmp_path: Path
) -> None:
    a = OperatorProcess(tmp_path, "op-a", etcd1.client_urls)
    async with backend_for(etcd1.client_urls) as backend, operators(a):
        a.start()
        await eventually(a.is_leader, timeout=30, message="op-a leads")
        await backend.put(LAYOUT.node("default", "broken"), b"\xc1 not msgpack")
        await backend.put(LAYOUT.heartbeat, b"garbage")
        await backend.put(LAYOUT.node("default", "Not_A_Name"), b"x")
        await register(backend, "node-ok")
        await eventually(lambda: all_claimed(backend, ["node-ok"]), message="valid node served")
        await eventually(
            lambda: _at_least(a, "cp_store_malformed_values_total", 'resource="node"', 2),
            message="malformed nodes counted",
        )
        await eventually(
            lambda: _at_least(a, "cp_store_malformed_values_total", 'resource="heartbeat"', 1),
            message="malformed heartbeat counted",
        )
        assert a.proc is not None and a.proc.poll() is None
        status, body = await a.health("/readyz")
        assert status == 200, body
        assert body["checks"]["etcd"]["ok"] and body["checks"]["election"]["ok"]
        ok = await a.sample("cp_operator_heartbeat_writes_total", 'result="ok",shard="default"')
        assert ok is not None and ok >= 1
        a.signal(signal.SIGTERM)
        assert await a.wait_exit() == 0


async def test_state_of_gone_nodes_is_collected_after_grace(
    etcd1: EmbeddedEtcd, tmp_path: Path
) -> None:
    a = OperatorProcess(tmp_path, "op-a", etcd1.client_urls, "--node-gc-grace=1")
    async with backend_for(etcd1.client_urls) as backend, operators(a):
        await register(backend, "node-gone", "node-live")
        for node in ("node-gone", "node-live"):
            await backend.put(LAYOUT.ipam_lease(node, "10.0.0.5"), b"lease")
        live_ep = LAYOUT.ip("default", "10.0.1.7")
        gone_ep = LAYOUT.ip("default", "10.0.0.7")
        for key, node, ip in (
            (gone_ep, "node-gone", "10.0.0.7"),
            (live_ep, "node-live", "10.0.1.7"),
        ):
            endpoint = Endpoint(
                ip=IPv4Address(ip),
                identity=NumericIdentity(1000),
                node=NodeName(node),
                host_ip=IPv4Address("192.168.0.1"),
                name="pod",
                namespace="default",
            )
            await backend.put(key, codec.encode("endpoint", endpoint.to_dict()))
        a.start()
        await eventually(lambda: all_claimed(backend, ["node-gone", "node-live"]))
        await backend.delete(LAYOUT.node("default", "node-gone"))

        async def collected() -> bool:
            found = await claims(backend)
            leases = await backend.list_prefix(LAYOUT.ipam_node_leases("node-gone"))
            return "node-gone" not in found and not leases.kvs and not await backend.get(gone_ep)

        await eventually(collected, timeout=30, message="gone node's state collected")
        assert "node-live" in await claims(backend)
        assert await backend.get(live_ep) is not None
        assert (await backend.list_prefix(LAYOUT.ipam_node_leases("node-live"))).kvs
        # counted once the delete returned: poll, the delete itself is seen first
        await eventually(
            lambda: _equals(a, "cp_operator_node_gc_deleted_total", 'resource="endpoint"', 1.0),
            message="one endpoint counted as collected",
        )


async def _following(proc: OperatorProcess, leader: str) -> bool:
    try:
        _, body = await proc.health()
    except (OSError, TimeoutError):
        return False
    detail = body["checks"]["election"]["detail"]
    return bool(detail == f"following {leader}")


async def _equals(proc: OperatorProcess, name: str, labels: str, value: float) -> bool:
    return await proc.sample(name, labels) == value


async def _at_least(proc: OperatorProcess, name: str, labels: str, value: float) -> bool:
    current = await proc.sample(name, labels)
    return current is not None and current >= value


pytestmark = pytest.mark.timeout(180)
