"""A worker process: many real agents in one event loop, reporting their state.

``python -m controlplane.scale.worker SPEC_JSON``. Each agent is a real
:class:`~controlplane.agent.agent.Agent` with userspace maps and its own etcd connections
(the agent's store session opens its own subchannel pool), its local API on its own unix
socket, no telemetry port.

Commands arrive on stdin, one JSON object a line: ``{"op": "churn", "rate": R, "id": N}``
(endpoint operations per second in this worker; 0 stops churn and acknowledges once the
operations in flight are done), ``{"op": "digest", "on": B, "id": N}`` (compute the
ipcache digests, which cost CPU, only while on; acknowledged after a report with them),
``{"op": "identity-burst", "count": N, "id": N}`` (create N endpoints with label sets never
seen before, all at once, over the agents, then delete them; acknowledged with the time it
took), ``{"op": "stop"}``.

Reports go to stdout, one JSON object a line: ``{"type": "state", ...}`` every
``report_interval`` with each agent's readiness, health, restarts (each with its
monotonic time and reason), per-shard recoveries, owned endpoints and a digest of the
endpoint part of its ipcache (with the monotonic time its map last changed), plus
churn counters, the process's RSS and how many watches re-listed because etcd had compacted
their revision; ``{"type": "ready"}`` once every agent is ready and populated;
``{"type": "ack", "id": N, "result": ...}`` for a finished command. Times are
``time.monotonic()``, which is host-wide on Linux, so the harness compares them directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import random
import struct
import sys
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controlplane.agent.agent import Agent
from controlplane.agent.settings import AgentSettings
from controlplane.config import ClientSettings, CrdConfig, EtcdClusterConfig, KvstoreConfig
from controlplane.datapath.ipcache import encode_key
from controlplane.model import IPNetwork, NodeName, parse_ip

log = logging.getLogger("cp.scale.worker")
PAGE = os.sysconf("SC_PAGE_SIZE")
DIGEST_INTERVAL = 0.1
SETTLE = 0.3
"""Seconds a map must be unchanged before its digest is computed."""
DIGEST_EVERY = 1.0
"""At most one digest per agent this often (a slow catch-up pauses often)."""
DIGEST_BUDGET = 0.05
"""Seconds of digests per observation pass; the agents left over go first next pass. When
the worker's own loop stalls, every map in it looks settled at once, and digesting 50 maps
of 10k entries in one pass blocked the loop for seconds: all its agents' quorum reads
timed out together and they restarted (standard, 200 agents, 10,000 endpoints)."""


_ENTRY = struct.Struct("=I")
_V4_MAPPED = b"\x00" * 10 + b"\xff\xff"


def entry_bytes(prefix: str, identity: int) -> bytes:
    """An endpoint as the ipcache holds it: its encoded key and its identity."""
    return encode_key(ipaddress.ip_network(prefix)) + _ENTRY.pack(identity)


def endpoint_digest(entries: Iterable[bytes]) -> str:
    """One digest of a set of :func:`entry_bytes`; the harness computes the same of the
    store's endpoints."""
    digest = hashlib.sha256()
    for entry in sorted(entries):
        digest.update(entry)
    return digest.hexdigest()[:16]


def pool_entries(items: Iterable[tuple[bytes, bytes]], pool: IPNetwork) -> list[bytes]:
    """The ipcache entries (raw key, raw value) of prefixes inside the pool, as
    :func:`entry_bytes`; on the raw bytes, as decoding 10k entries costs ~0.4 s."""
    if isinstance(pool, ipaddress.IPv4Network):
        net, mask = int(pool.network_address), int(pool.netmask)
        low_bits = 96 + pool.prefixlen
        return [
            key + value[:4]
            for key, value in items
            if key[4:16] == _V4_MAPPED
            and _ENTRY.unpack_from(key)[0] >= low_bits
            and int.from_bytes(key[16:20], "big") & mask == net
        ]
    net6, mask6 = int(pool.network_address), int(pool.netmask)
    return [
        key + value[:4]
        for key, value in items
        if _ENTRY.unpack_from(key)[0] >= pool.prefixlen
        and int.from_bytes(key[4:20], "big") & mask6 == net6
    ]


def kvstore_from_spec(spec: dict[str, Any]) -> KvstoreConfig | CrdConfig:
    """The agents' store: ``{"crd": KUBECONFIG}`` or the kvstore's clusters and shards."""
    if "crd" in spec:
        return CrdConfig(kubeconfig=spec["crd"])
    clusters = tuple(EtcdClusterConfig(name, tuple(urls)) for name, urls in spec["clusters"])
    shards = {kind: tuple(names) for kind, names in spec.get("shards", {}).items()}
    client = ClientSettings(request_timeout=5.0, keepalive_time=5.0, keepalive_timeout=2.0)
    return KvstoreConfig(clusters, shards, client=client)


def rss_bytes() -> int:
    """This process's resident set size."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


class CompactionCounter(logging.Handler):
    """Counts the list-watchers' "revision compacted; re-listing" warnings (the watch code
    logs one per watch that had to re-list)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "compacted" in str(record.msg):
            self.count += 1


@dataclass
class Tracked:
    agent: Agent
    restarts: list[tuple[float, str, float | None]] = field(default_factory=list)
    """(when, reason, when ready again or None)."""
    seen_restarts: int = 0
    digest: str = ""
    digest_since: float = 0.0
    malformed: float = 0.0
    changed_at: float = 0.0
    """When its map last changed (its write counters moved)."""
    digested: tuple[int, int, int] = (-1, -1, -1)
    digested_at: float = 0.0
    count: int = 0
    writes: tuple[int, int, int] = (-1, -1, -1)
    churned: list[str] = field(default_factory=list)
    serial: int = 0


class Worker:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.pool = ipaddress.ip_network(spec["pool_cidr"])
        self.labels: list[str] = [f"k8s:app=app{i}" for i in range(spec["label_sets"])]
        config = kvstore_from_spec(spec["kvstore"])
        self.crd = isinstance(config, CrdConfig)
        # with proxy groups, each agent reaches etcd through its group's proxies
        groups = [kvstore_from_spec(g) for g in spec.get("kvstore_groups", [])]
        group_of: dict[str, int] = spec.get("groups", {})
        timings = spec["agent"]
        sockets = Path(spec["socket_dir"])
        self.tracked: list[Tracked] = []
        for node, ip in spec["nodes"]:
            settings = AgentSettings(
                node=NodeName(node),
                node_ips=(parse_ip(ip),),
                api_socket=sockets / f"{node}.sock",
                telemetry_port=None,
                **timings,
            )
            own = groups[group_of[node]] if node in group_of else config
            self.tracked.append(Tracked(Agent(settings, own)))
        self.rate = 0.0
        self._reports = 0
        self.digesting = False
        """Digests cost ~10 ms per 10k entries: computed only while the harness asks."""
        self.digest_budget = DIGEST_BUDGET
        self._digest_next = 0
        """The agent the next digest pass starts with (a pass may stop at its budget)."""
        self.in_flight: set[asyncio.Task[None]] = set()
        self.churn: dict[str, Any] = {"ops": 0, "ok": 0, "failed": 0, "errors": {}}
        self.out = sys.stdout
        self.compactions = CompactionCounter()
        logging.getLogger("controlplane.kvstore.watch").addHandler(self.compactions)

    def emit(self, record: dict[str, Any]) -> None:
        self.out.write(json.dumps(record, separators=(",", ":")) + "\n")
        self.out.flush()

    # -- observation ----------------------------------------------------------------

    def _observe(self) -> None:
        now = time.monotonic()
        for t in self.tracked:
            agent = t.agent
            while t.seen_restarts < agent.restarts:
                t.seen_restarts += 1
                at = now  # the agent stamps its restart in wall time: back to monotonic
                if agent.last_restart_at is not None:
                    at = now - max(0.0, time.time() - agent.last_restart_at)
                t.restarts.append((round(at, 3), agent.last_restart_reason or "unknown", None))
            if t.restarts and t.restarts[-1][2] is None and agent.ready:
                at, reason, _ = t.restarts[-1]
                t.restarts[-1] = (at, reason, round(now, 3))
            stats = agent.reconciler.stats
            writes = (stats.updates, stats.deletes, len(agent.ipcache))
            if writes != t.writes:
                t.writes, t.changed_at = writes, now
        if self.digesting:
            self._digest(now)

    def _digest(self, now: float) -> None:
        """Digest the settled maps, within :data:`DIGEST_BUDGET`, starting where the last
        pass stopped."""
        count, started = len(self.tracked), time.monotonic()
        for i in range(count):
            if i and time.monotonic() - started >= self.digest_budget:  # at least one a pass
                self._digest_next = (self._digest_next + i) % count
                return
            t = self.tracked[(self._digest_next + i) % count]
            # only a settled map: a digest of 10k entries costs ~10 ms, and an agent that is
            # catching up changes every few ms (digesting it then starved the agents)
            if (
                t.writes != t.digested
                and now - t.changed_at >= SETTLE
                and now - t.digested_at >= DIGEST_EVERY
            ):
                t.digested_at = now
                entries = pool_entries(t.agent.ipcache.map.items(), self.pool)
                t.digest, t.digest_since, t.count = (
                    endpoint_digest(entries),
                    t.changed_at,
                    len(entries),
                )
                t.digested = t.writes

    def _malformed(self, t: Tracked) -> float:
        """The agent's malformed-values counter, read every 4th report (a collect of its
        whole registry is not free)."""
        if self._reports % 4 == 0:
            t.malformed = float(t.agent.status()["malformed_skipped"])
        return t.malformed

    def _state(self) -> dict[str, Any]:
        agents = []
        for t in self.tracked:
            agent = t.agent
            shards = agent.shard_health()
            owned = sorted(str(e.ip) for e in agent.owned.items.values() if e.ip is not None)
            agents.append(
                {
                    "node": str(agent.settings.node),
                    "ready": agent.ready,
                    "healthy": bool(shards) and all(s.healthy for s in shards),
                    "restarts": t.restarts,
                    # CRD mode has no heartbeat to arm on: healthy is as armed as it gets
                    "armed": bool(shards)
                    and all(s.arm.heartbeat or (self.crd and s.healthy) for s in shards),
                    "ipcache": len(agent.ipcache),
                    "recoveries": {s.name: s.arm.recoveries for s in shards},
                    "digest": t.digest,
                    "digest_since": t.digest_since,
                    "count": t.count,
                    "owned": len(owned),
                    "owned_digest": hashlib.sha256("\n".join(owned).encode()).hexdigest()[:16],
                    "malformed": self._malformed(t),
                }
            )
        self._reports += 1
        return {
            "type": "state",
            "t": time.monotonic(),
            "agents": agents,
            "churn": self.churn,
            "rss": rss_bytes(),
            "compactions": self.compactions.count,
        }

    async def _report(self) -> None:
        interval = self.spec["report_interval"]
        next_report = 0.0
        while True:
            self._observe()
            now = time.monotonic()
            if now >= next_report:
                self.emit(self._state())
                next_report = now + interval
            await asyncio.sleep(DIGEST_INTERVAL)

    # -- endpoints --------------------------------------------------------------------

    async def _create(self, t: Tracked, name: str, label: str) -> bool:
        self.churn["ops"] += 1
        try:
            await t.agent.create_endpoint("scale", name, [label])
        except Exception as exc:  # NotReady, a 503-worthy store error: counted by kind
            self._failed(exc)
            return False
        self.churn["ok"] += 1
        return True

    def _failed(self, exc: Exception) -> None:
        status = getattr(exc, "status", None)
        words = str(exc).split(":")[0][:60]
        kind = f"{type(exc).__name__} {status}: {words}" if status else type(exc).__name__
        errors = self.churn["errors"]
        if kind not in errors:
            log.warning("churn: first %s: %s", kind, exc)
        errors[kind] = errors.get(kind, 0) + 1
        self.churn["failed"] += 1

    async def _populate(self) -> None:
        per_agent = self.spec["endpoints_per_agent"]
        gate = asyncio.Semaphore(16)

        async def one(t: Tracked, k: int) -> None:
            name = f"{t.agent.settings.node}-e{k}"
            label = self.labels[zlib.crc32(name.encode()) % len(self.labels)]
            async with gate:
                for _ in range(50):  # a fault or restart in between: try again
                    if await self._create(t, name, label):
                        return
                    await asyncio.sleep(0.2)

        # round-robin over the agents: one agent's creates queue behind each other
        await asyncio.gather(*(one(t, k) for k in range(per_agent) for t in self.tracked))

    async def _identity_burst(self, count: int) -> dict[str, Any]:
        """``count`` creates with fresh label sets (one identity allocation each) at once,
        round-robin over the agents; then their deletes. The creates' wall time."""
        created: list[tuple[Tracked, str]] = []
        tag = f"{os.getpid()}-{time.monotonic_ns()}"

        async def one(k: int) -> None:
            t = self.tracked[k % len(self.tracked)]
            name = f"{t.agent.settings.node}-i{k}"
            label = f"k8s:app=burst-{tag}-{k}"
            try:
                await t.agent.create_endpoint("scale", name, [label])
            except Exception as exc:
                self._failed(exc)
                return
            created.append((t, name))

        start = time.monotonic()
        await asyncio.gather(*(one(k) for k in range(count)))
        took = time.monotonic() - start
        for t, name in created:
            try:
                await t.agent.delete_endpoint("scale", name)
            except Exception as exc:
                self._failed(exc)
        return {"ok": len(created), "failed": count - len(created), "seconds": round(took, 3)}

    async def _churn_one(self) -> None:
        t = random.choice(self.tracked)
        if t.churned and random.random() < 0.5:
            name = t.churned.pop(0)
            self.churn["ops"] += 1
            try:
                await t.agent.delete_endpoint("scale", name)
                self.churn["ok"] += 1
            except Exception as exc:
                t.churned.insert(0, name)
                self._failed(exc)
            return
        t.serial += 1
        name = f"{t.agent.settings.node}-c{t.serial}"
        if await self._create(t, name, random.choice(self.labels)):
            t.churned.append(name)

    async def _churn(self) -> None:
        while True:
            if self.rate <= 0:
                await asyncio.sleep(0.05)
                continue
            task = asyncio.create_task(self._churn_one())
            self.in_flight.add(task)
            task.add_done_callback(self.in_flight.discard)
            await asyncio.sleep(1.0 / self.rate)

    async def _commands(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            command = json.loads(line)
            if command["op"] == "stop":
                return
            if command["op"] == "digest":
                self.digesting = bool(command["on"])
                for t in self.tracked:  # a digest of an older map says nothing now
                    if t.writes != t.digested:
                        t.digest = ""
                if self.digesting:
                    self._observe()
                    self.emit(self._state())
                self.emit({"type": "ack", "id": command.get("id", 0)})
            if command["op"] == "churn":
                self.rate = float(command["rate"])
                if self.rate <= 0 and self.in_flight:
                    await asyncio.gather(*self.in_flight, return_exceptions=True)
                self.emit({"type": "ack", "id": command.get("id", 0)})
            if command["op"] == "identity-burst":
                result = await self._identity_burst(int(command["count"]))
                self.emit({"type": "ack", "id": command.get("id", 0), "result": result})

    # -- lifecycle --------------------------------------------------------------------

    async def _setup(self) -> None:
        for t in self.tracked:
            await asyncio.wait_for(t.agent.started.wait(), 60)
        await asyncio.wait_for(
            asyncio.gather(*(t.agent.wait_ready() for t in self.tracked)),
            self.spec["ready_timeout"],
        )
        await self._populate()
        self.emit({"type": "ready"})
        await self._churn()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            runs = [
                group.create_task(t.agent.run(), name=f"agent:{t.agent.settings.node}")
                for t in self.tracked
            ]
            reporter = group.create_task(self._report(), name="report")
            setup = group.create_task(self._setup(), name="setup-and-churn")
            await self._commands()  # until "stop" or the harness closes our stdin
            setup.cancel()
            for t in self.tracked:
                t.agent.stop()
            await asyncio.gather(*runs, return_exceptions=True)
            reporter.cancel()


def main() -> None:
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    spec = json.loads(sys.argv[1])
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(Worker(spec).run())


if __name__ == "__main__":
    main()
