"""`cpctl bench propagation`: endpoint propagation to every agent's datapath, per store
mode, next to bare etcd watch fan-out.

One agent creates endpoints; we measure the time from the creating agent issuing the
endpoint's write request (its ``write_issued_at``: the etcd transaction in kvstore mode,
the API server create in CRD mode) until every other agent's ipcache map holds it (each
agent's ``written_at``). Modes side by side, in interleaved rounds on one etcd:

- **kvstore**: N agent processes and an operator on the etcd directly;
- **crd**: N agent processes and an operator on a local Kubernetes API server (a
  `cpctl kube up` process) whose storage is the same etcd;
- **bare**: N-1 bare watcher processes watch a prefix while we put keys: the time from
  issuing a put until every watcher has printed it.

Both modes' agents run throughout (a mode's agents are idle during the other's rounds).
All times are the host-wide monotonic clock, so processes' stamps compare directly. Same
process count on every side (BENCHMARKING.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controlplane.agent.api import request
from controlplane.bench.common import (
    STORE_MODES,
    BenchError,
    Progress,
    delete_in_chunks,
    latency_summary_ms,
)
from controlplane.bench.kubeserver import KubeServerInfo, kube_server, prepare
from controlplane.config import KvstoreConfig
from controlplane.kvstore.backend import EtcdBackend
from controlplane.processes import Daemon, stop_all
from controlplane.stats import percentile

MODES = STORE_MODES
NAMESPACE = "bench"
PAUSE = 0.01
"""Seconds between one endpoint's create returning and the next (and between bare puts)."""
DELIVERY_TIMEOUT = 120.0
CREATE_RETRIES = 30
"""503 answers (store unavailable) a create is retried after, a second apart."""


async def _wait(
    what: str, check: Callable[[], Awaitable[tuple[int, int]]], timeout: float, progress: Progress
) -> None:
    deadline = time.monotonic() + timeout
    last_note = time.monotonic()
    while True:
        done, total = await check()
        if done >= total:
            return
        now = time.monotonic()
        if now - last_note > 5:
            progress(f"  {what}: {done}/{total}")
            last_note = now
        if now > deadline:
            raise BenchError(f"{what}: only {done}/{total} after {timeout:.0f}s")
        await asyncio.sleep(0.2)


@dataclass
class _Mode:
    """One store mode's processes and samples."""

    store: str
    operator: Daemon
    agents: list[Daemon]
    sockets: list[Path]
    all_: list[float] = field(default_factory=list)
    """Per endpoint: write issued -> the last of the other agents' maps holds it."""
    each: list[float] = field(default_factory=list)
    """Per endpoint and receiving agent."""
    creates: list[float] = field(default_factory=list)
    """Seconds each create request to the creating agent's API took."""
    unavailable: list[str] = field(default_factory=list)
    """The creating agent's 503 answers (store unavailable), each retried."""
    write_rates: list[float] = field(default_factory=list)
    """Per round: endpoint writes per second (first to last write issued)."""

    @property
    def daemons(self) -> list[Daemon]:
        return [self.operator, *self.agents]

    def summary(self) -> dict[str, Any]:
        return {
            "all_datapaths": latency_summary_ms(self.all_, 2),
            "each_datapath": latency_summary_ms(self.each, 2),
            "agent_create_request": latency_summary_ms(self.creates, 2),
            "create_503_retries": len(self.unavailable),
            "writes_per_s": round(statistics.median(self.write_rates), 1)
            if self.write_rates
            else None,
        }


def _mode(store: str, store_args: list[str], agents: int, run: str, workdir: Path) -> _Mode:
    where = workdir / store
    operator = Daemon(
        f"{store}-operator",
        "controlplane.operator.main",
        [*store_args, "--id", f"bench-{store}-operator", "--metrics-address", "127.0.0.1:0"],
        where / "operator.log",
    )
    sockets = [where / f"agent-{i}.sock" for i in range(agents)]
    nodes = [
        Daemon(
            f"{store}-agent-{i}",
            "controlplane.agent.main",
            [
                *store_args,
                "--node-name",
                f"bench-{run}-{i}",
                "--api-socket",
                str(sockets[i]),
                "--metrics-address",
                "none",
                "--no-flows",  # (the benchmark measures propagation, not flows)
                # many agents on one host: each its own userspace maps, never the shared
                # machine-wide pinned kernel ipcache, and no routes in the host's table
                "--datapath",
                "userspace",
                "--no-routes",
            ],
            where / f"agent-{i}.log",
        )
        for i in range(agents)
    ]
    return _Mode(store, operator, nodes, sockets)


@asynccontextmanager
async def _running(modes: Sequence[_Mode], progress: Progress) -> AsyncIterator[None]:
    daemons = [d for m in modes for d in m.daemons]
    try:
        for mode in modes:
            progress(
                f"starting 1 operator and {len(mode.agents)} agent processes ({mode.store})..."
            )
            for daemon in mode.daemons:
                await daemon.start()
        agents = [(d, s) for m in modes for d, s in zip(m.agents, m.sockets, strict=True)]

        async def ready() -> tuple[int, int]:
            count = 0
            for daemon in daemons:
                if not daemon.running:
                    raise BenchError(f"{daemon.name} exited: {daemon.log_tail(1)}")
            for _, sock in agents:
                try:
                    _, body = await request(sock, "GET", "/v1/status", timeout=5)
                    count += bool(body.get("ready"))
                except (OSError, TimeoutError):
                    pass
            return count, len(agents)

        await _wait("agents ready", ready, 60 + len(agents) * 3.0, progress)
        yield
    finally:
        progress(f"stopping {len(daemons)} processes...")
        await stop_all(daemons)


def _parse_stores(stores: Sequence[str]) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(stores))
    unknown = [s for s in chosen if s not in MODES]
    if not chosen or unknown:
        raise BenchError(f"stores: want some of {', '.join(MODES)}, got {', '.join(stores)}")
    return chosen


async def run_propagation_bench(
    config: KvstoreConfig,
    *,
    agents: int,
    endpoints: int,
    rounds: int,
    stores: Sequence[str] = ("kvstore",),
    bare: bool = True,
    interval: float | None = None,
    workdir: Path | None = None,
    progress: Progress,
) -> dict[str, Any]:
    """Agents' logs and sockets go under ``workdir`` (default: a new temporary directory).

    ``stores``: the modes measured side by side (``kvstore``, ``crd``); ``bare``: also
    the bare watch fan-out; ``interval``: start a create (and a bare put) every
    ``interval`` seconds, the same rate for every side as long as each keeps up (default:
    the next one ``PAUSE`` after the previous returned, so a slower create path writes at a
    lower rate). With kvstore and bare, the record keeps the keys of the
    kvstore-only benchmark (``agents_all_datapaths``, ``ratio_p99``, ...)."""
    chosen = _parse_stores(stores)
    workdir = workdir or Path(tempfile.mkdtemp(prefix="cp-bench-prop-"))
    run = uuid.uuid4().hex[:8]
    urls = ",".join(config.clusters[0].endpoints)
    load_start = os.getloadavg()
    bare_all: list[float] = []
    bare_each: list[float] = []
    modes: dict[str, _Mode] = {}
    async with AsyncExitStack() as stack:
        backend = await stack.enter_async_context(
            EtcdBackend(config.clusters[0], config.client, own_connection=True)
        )
        status = await backend.status()
        server: KubeServerInfo | None = None
        if "crd" in chosen:
            server = await stack.enter_async_context(
                kube_server(config.clusters[0].endpoints, workdir, progress)
            )
            await prepare(server, [NAMESPACE], progress)
        for store in chosen:
            if store == "kvstore":
                args = ["--store", "kvstore", "--kvstore-endpoints", urls]
                args += ["--kvstore-prefix", config.prefix]
            else:
                assert server is not None
                args = ["--store", "crd", "--kubeconfig", str(server.kubeconfig)]
            modes[store] = _mode(store, args, agents, run, workdir)
        stack.push_async_callback(
            delete_in_chunks, backend, f"{config.prefix}bench-propagation/".encode()
        )
        await stack.enter_async_context(_running(list(modes.values()), progress))

        async def bare_side(tag: str) -> None:
            await _bare_round(
                backend,
                config,
                urls,
                agents - 1,
                endpoints,
                interval,
                tag,
                workdir,
                bare_all,
                bare_each,
                progress,
            )

        def agents_side(mode: _Mode) -> Callable[[str], Awaitable[None]]:
            async def side(tag: str) -> None:
                await _agents_round(mode, endpoints, interval, tag, progress)

            return side

        sides: list[Callable[[str], Awaitable[None]]] = [bare_side] if bare else []
        sides += [agents_side(modes[s]) for s in chosen]
        for r in range(rounds):
            shift = r % len(sides)  # rotate who goes first: A B C, B C A, C A B
            for side in sides[shift:] + sides[:shift]:
                await side(f"{run}-r{r}")
    return _record(
        status.version,
        agents,
        endpoints,
        interval,
        rounds,
        chosen,
        bare,
        modes,
        bare_all,
        bare_each,
        load_start,
    )


def _ratio(a: dict[str, float], b: dict[str, float], key: str) -> float:
    return round(a[key] / b[key], 3) if b[key] > 0 else float("inf")


def _record(
    etcd_version: str,
    agents: int,
    endpoints: int,
    interval: float | None,
    rounds: int,
    stores: tuple[str, ...],
    bare: bool,
    modes: dict[str, _Mode],
    bare_all: list[float],
    bare_each: list[float],
    load_start: tuple[float, float, float],
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "benchmark": "propagation",
        "etcd_version": etcd_version,
        "agents": agents,
        "endpoints_per_round": endpoints,
        "interval_s": interval,
        "rounds": rounds,
        "stores": list(stores),
        "cpus": os.cpu_count(),
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "modes": {store: mode.summary() for store, mode in modes.items()},
    }
    notes = [
        f"per mode: {agents} agent processes and one operator, each with its own connection "
        "(kvstore: to etcd; crd: to the API server, a process of its own on the same etcd)",
        "a mode's figure: the creating agent issues the endpoint's write request -> every "
        "other agent's ipcache map written",
        (
            f"writes start every {interval * 1000:g} ms on every side"
            if interval
            else f"each write starts {PAUSE * 1000:g} ms after the previous create returned, "
            "so a mode with slower creates writes at a lower rate (writes_per_s)"
        ),
    ]
    if len(modes) > 1:
        notes.append("both modes' agents run throughout; the other mode's are idle meanwhile")
    if bare:
        summary = latency_summary_ms(bare_all, 2)
        record["bare_all_watchers"] = summary
        record["bare_each_watcher"] = latency_summary_ms(bare_each, 2)
        for store in modes:
            ours = record["modes"][store]["all_datapaths"]
            record["modes"][store]["ratio_to_bare"] = {
                k: _ratio(ours, summary, f"{k}_ms") for k in ("p50", "p99")
            }
        notes.append(
            f"bare: {agents - 1} watcher processes (ListWatcher only), put issued -> every "
            "watcher printed the key"
        )
        if "kvstore" in modes:  # the kvstore-only benchmark's keys
            kv = record["modes"]["kvstore"]
            record["agents_all_datapaths"] = kv["all_datapaths"]
            record["agents_each_datapath"] = kv["each_datapath"]
            record["ratio_p50"] = kv["ratio_to_bare"]["p50"]
            record["ratio_p99"] = kv["ratio_to_bare"]["p99"]
    if "crd" in modes and "kvstore" in modes:
        crd, kv = (
            record["modes"]["crd"]["all_datapaths"],
            record["modes"]["kvstore"]["all_datapaths"],
        )
        record["ratio_crd_kvstore"] = {k: _ratio(crd, kv, f"{k}_ms") for k in ("p50", "p99", "max")}
    record["notes"] = notes
    return record


async def _bare_round(
    backend: EtcdBackend,
    config: KvstoreConfig,
    urls: str,
    watchers_count: int,
    count: int,
    interval: float | None,
    tag: str,
    workdir: Path,
    bare_all: list[float],
    bare_each: list[float],
    progress: Progress,
) -> None:
    prefix = f"{config.prefix}bench-propagation/{tag}/"
    watchers = [
        Daemon(
            f"watch-{i}",
            "controlplane.bench.fanout_watcher",
            ["--endpoints", urls, "--prefix", prefix, "--count", str(count)],
            workdir / "bare" / f"{tag}-watch-{i}.log",
        )
        for i in range(watchers_count)
    ]
    try:
        progress(f"round {tag} bare: starting {len(watchers)} watcher processes...")
        for watcher in watchers:
            await watcher.start()

        async def ready() -> tuple[int, int]:
            done = 0
            for w in watchers:
                with contextlib.suppress(OSError):
                    done += "ready" in w.log_file.read_text(errors="replace")
            return done, len(watchers)

        await _wait("bare watchers ready", ready, 120, progress)
        put_at: dict[str, float] = {}
        pace = _Pace(interval)
        for i in range(count):
            await pace.next()
            key = f"{prefix}{i:05d}"
            put_at[key] = time.monotonic()
            await backend.put(key.encode(), b"x" * 100)

        async def finished() -> tuple[int, int]:
            return sum(1 for w in watchers if not w.running), len(watchers)

        await _wait("bare watchers done", finished, DELIVERY_TIMEOUT, progress)
        latest: dict[str, float] = {}
        for watcher in watchers:
            for line in watcher.log_file.read_text().splitlines():
                parts = line.split(" ", 1)
                if len(parts) == 2 and parts[1] in put_at:
                    delay = float(parts[0]) - put_at[parts[1]]
                    bare_each.append(delay)
                    latest[parts[1]] = max(latest.get(parts[1], 0.0), delay)
        if len(latest) != count:
            raise BenchError(f"bare watchers missed {count - len(latest)} keys")
        bare_all.extend(latest.values())
        progress(
            f"round {tag} bare: all {len(watchers)} watchers p50 "
            f"{percentile(list(latest.values()), 50) * 1000:.1f} ms"
        )
    finally:
        await stop_all(watchers)


async def _ipcache(sock: Path, wanted: set[str]) -> dict[str, float]:
    """Which of ``wanted`` prefixes the agent's ipcache map holds, with their write times."""
    _, rows = await request(sock, "GET", "/v1/ipcache", timeout=10)
    return {
        r["prefix"]: float(r["written_at"])
        for r in rows
        if r["prefix"] in wanted and "written_at" in r
    }


class _Pace:
    """Starts of a round's writes: every ``interval`` seconds from the first (at once when
    behind), or ``PAUSE`` after the previous write returned."""

    def __init__(self, interval: float | None) -> None:
        self.interval = interval
        self.count = 0
        self.start = 0.0

    async def next(self) -> None:
        if self.count == 0:
            self.start = time.monotonic()
        elif self.interval is None:
            await asyncio.sleep(PAUSE)
        else:
            await asyncio.sleep(
                max(0.0, self.start + self.count * self.interval - time.monotonic())
            )
        self.count += 1


async def _agents_round(
    mode: _Mode, count: int, interval: float | None, tag: str, progress: Progress
) -> None:
    creator, others = mode.sockets[0], mode.sockets[1:]
    published: dict[str, float] = {}
    names = []
    progress(f"round {tag} {mode.store}: creating {count} endpoints...")
    pace = _Pace(interval)
    for i in range(count):
        await pace.next()
        name = f"{tag}-{i}"
        body = {"namespace": NAMESPACE, "name": name, "labels": ["k8s:app=bench"]}
        started = time.monotonic()
        status, reply = await request(creator, "POST", "/v1/endpoints", body, timeout=30)
        for _ in range(CREATE_RETRIES):
            if status != 503:
                break
            # the agent found its store unavailable (on an overloaded host, a health check
            # that timed out): counted, and tried again; the latency is the retry's write's
            mode.unavailable.append(str(reply.get("error", reply)))
            progress(f"  {mode.store}: create {name} answered 503 ({reply}); retrying")
            await asyncio.sleep(1.0)
            status, reply = await request(creator, "POST", "/v1/endpoints", body, timeout=30)
        mode.creates.append(time.monotonic() - started)
        if status not in (200, 201):
            raise BenchError(f"creating an endpoint ({mode.store}) failed: {reply}")
        published[f"{reply['ip']}/32"] = float(reply["write_issued_at"])
        names.append(name)
    issued = sorted(published.values())
    if count > 1:
        mode.write_rates.append((count - 1) / max(issued[-1] - issued[0], 1e-9))
    wanted = set(published)
    written: dict[Path, dict[str, float]] = {}

    async def delivered() -> tuple[int, int]:
        done = 0
        for sock in others:
            if len(written.get(sock, {})) < count:
                written[sock] = await _ipcache(sock, wanted)
            done += len(written[sock]) == count
        return done, len(others)

    await _wait(
        f"{mode.store} agents' datapaths hold every endpoint", delivered, DELIVERY_TIMEOUT, progress
    )
    latest: dict[str, float] = {}
    for have in written.values():
        for prefix, at in have.items():
            delay = at - published[prefix]
            mode.each.append(delay)
            latest[prefix] = max(latest.get(prefix, 0.0), delay)
    mode.all_.extend(latest.values())
    progress(
        f"round {tag} {mode.store} agents: all {len(others)} datapaths p50 "
        f"{percentile(list(latest.values()), 50) * 1000:.1f} ms, "
        f"max {max(latest.values()) * 1000:.1f} ms (create request median "
        f"{statistics.median(mode.creates[-count:]) * 1000:.1f} ms)"
    )
    progress(f"round {tag} {mode.store}: deleting its endpoints...")
    for name in names:
        await request(creator, "DELETE", f"/v1/endpoints/{NAMESPACE}/{name}", timeout=30)

    async def withdrawn() -> tuple[int, int]:
        # the next side starts once every map has dropped them (no deletes in its figures;
        # a reused IP can never be taken for delivered by an entry of this round)
        done = 0
        for sock in mode.sockets:
            done += not await _ipcache(sock, wanted)
        return done, len(mode.sockets)

    await _wait(
        f"{mode.store} agents' datapaths drop the round's endpoints",
        withdrawn,
        DELIVERY_TIMEOUT,
        progress,
    )
