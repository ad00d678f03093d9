"""`cpctl bench propagation`: endpoint propagation to every agent's datapath vs bare fan-out.

One agent creates endpoints; we measure the time from the creating agent issuing the
endpoint's etcd write (its ``write_issued_at``) until every other agent's ipcache map holds
it (each agent's ``written_at``). Side by side, in interleaved rounds, the same number of
bare watcher processes watch a prefix while we put keys: the time from issuing a put until
every watcher has printed it. All times are the host-wide monotonic clock, so processes'
stamps compare directly. Same process count on both sides (BENCHMARKING.md).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from controlplane.agent.api import request
from controlplane.bench.common import (
    BenchError,
    Progress,
    delete_in_chunks,
    latency_summary_ms,
)
from controlplane.config import KvstoreConfig
from controlplane.kvstore.backend import EtcdBackend
from controlplane.processes import Daemon, stop_all
from controlplane.stats import percentile


async def _wait(what: str, check: Callable[[], Any], timeout: float, progress: Progress) -> None:
    deadline = time.monotonic() + timeout
    last_note = 0.0
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


async def run_propagation_bench(
    config: KvstoreConfig,
    *,
    agents: int,
    endpoints: int,
    rounds: int,
    workdir: Path | None = None,
    progress: Progress,
) -> dict[str, Any]:
    """Agents' logs and sockets go under ``workdir`` (default: a new temporary directory)."""
    workdir = workdir or Path(tempfile.mkdtemp(prefix="cp-bench-prop-"))
    run = uuid.uuid4().hex[:8]
    urls = ",".join(config.clusters[0].endpoints)
    common = ["--kvstore-endpoints", urls, "--kvstore-prefix", config.prefix]
    operator = Daemon(
        "operator",
        "controlplane.operator.main",
        [*common, "--id", "bench-operator", "--metrics-address", "127.0.0.1:0"],
        workdir / "operator.log",
    )
    nodes = [
        Daemon(
            f"bench-{run}-{i}",
            "controlplane.agent.main",
            [
                *common,
                "--node-name",
                f"bench-{run}-{i}",
                "--api-socket",
                str(workdir / f"agent-{i}.sock"),
                "--metrics-address",
                "none",
                "--no-flows",  # (the benchmark measures propagation, not flows)
                # many agents on one host: each its own userspace maps, never the shared
                # machine-wide pinned kernel ipcache
                "--datapath",
                "userspace",
            ],
            workdir / f"agent-{i}.log",
        )
        for i in range(agents)
    ]
    sockets = [workdir / f"agent-{i}.sock" for i in range(agents)]
    daemons = [operator, *nodes]
    results: dict[str, list[float]] = {
        "bare_all": [],
        "bare_each": [],
        "ours_all": [],
        "ours_each": [],
    }
    async with EtcdBackend(config.clusters[0], config.client, own_connection=True) as backend:
        try:
            progress(f"starting 1 operator and {agents} agent processes...")
            for daemon in daemons:
                await daemon.start()

            async def ready() -> tuple[int, int]:
                count = 0
                for daemon, sock in zip(nodes, sockets, strict=True):
                    if not daemon.running:
                        raise BenchError(f"{daemon.name} exited: {daemon.log_tail(1)}")
                    try:
                        _, body = await request(sock, "GET", "/v1/status", timeout=5)
                        count += bool(body.get("ready"))
                    except (OSError, TimeoutError):
                        pass
                return count, agents

            await _wait("agents ready", ready, 60 + agents * 3.0, progress)
            status = await backend.status()
            for r in range(rounds):
                sides = [_bare_round, _agents_round] if r % 2 == 0 else [_agents_round, _bare_round]
                for side in sides:
                    await side(
                        backend,
                        config,
                        urls,
                        sockets,
                        endpoints,
                        f"{run}-r{r}",
                        workdir,
                        results,
                        progress,
                    )
        finally:
            await stop_all(daemons)
            await delete_in_chunks(backend, f"{config.prefix}bench-propagation/".encode())
    bare_all, ours_all = (
        latency_summary_ms(results["bare_all"], 2),
        latency_summary_ms(results["ours_all"], 2),
    )
    return {
        "benchmark": "propagation",
        "etcd_version": status.version,
        "agents": agents,
        "endpoints_per_round": endpoints,
        "rounds": rounds,
        "bare_all_watchers": bare_all,
        "bare_each_watcher": latency_summary_ms(results["bare_each"], 2),
        "agents_all_datapaths": ours_all,
        "agents_each_datapath": latency_summary_ms(results["ours_each"], 2),
        "ratio_p50": round(ours_all["p50_ms"] / bare_all["p50_ms"], 3),
        "ratio_p99": round(ours_all["p99_ms"] / bare_all["p99_ms"], 3),
        "notes": [
            f"{agents} agent processes (plus one operator) vs {agents} bare watcher "
            "processes, each with its own etcd connection",
            "ours: creating agent issues the endpoint's etcd write -> every other agent's "
            "ipcache map written; bare: put issued -> every watcher printed the key",
        ],
    }


async def _bare_round(
    backend: EtcdBackend,
    config: KvstoreConfig,
    urls: str,
    sockets: Sequence[Path],
    count: int,
    tag: str,
    workdir: Path,
    results: dict[str, list[float]],
    progress: Progress,
) -> None:
    prefix = f"{config.prefix}bench-propagation/{tag}/"
    watchers = [
        Daemon(
            f"watch-{i}",
            "controlplane.bench.fanout_watcher",
            ["--endpoints", urls, "--prefix", prefix, "--count", str(count)],
            workdir / f"{tag}-watch-{i}.log",
        )
        for i in range(len(sockets) - 1)
    ]
    try:
        for watcher in watchers:
            await watcher.start()

        async def ready() -> tuple[int, int]:
            done = sum(
                1
                for w in watchers
                if w.log_file.exists() and "ready" in w.log_file.read_text(errors="replace")
            )
            return done, len(watchers)

        await _wait("bare watchers ready", ready, 120, progress)
        put_at: dict[str, float] = {}
        for i in range(count):
            key = f"{prefix}{i:05d}"
            put_at[key] = time.monotonic()
            await backend.put(key.encode(), b"x" * 100)
            await asyncio.sleep(0.01)

        async def finished() -> tuple[int, int]:
            return sum(1 for w in watchers if not w.running), len(watchers)

        await _wait("bare watchers done", finished, 120, progress)
        latest: dict[str, float] = {}
        for watcher in watchers:
            for line in watcher.log_file.read_text().splitlines():
                parts = line.split(" ", 1)
                if len(parts) == 2 and parts[1] in put_at:
                    delay = float(parts[0]) - put_at[parts[1]]
                    results["bare_each"].append(delay)
                    latest[parts[1]] = max(latest.get(parts[1], 0.0), delay)
        if len(latest) != count:
            raise BenchError(f"bare watchers missed {count - len(latest)} keys")
        results["bare_all"].extend(latest.values())
        progress(
            f"round {tag} bare: all {len(watchers)} watchers p50 "
            f"{percentile(list(latest.values()), 50) * 1000:.1f} ms"
        )
    finally:
        await stop_all(watchers)


async def _agents_round(
    backend: EtcdBackend,
    config: KvstoreConfig,
    urls: str,
    sockets: Sequence[Path],
    count: int,
    tag: str,
    workdir: Path,
    results: dict[str, list[float]],
    progress: Progress,
) -> None:
    creator, others = sockets[0], sockets[1:]
    published: dict[str, float] = {}
    names = []
    for i in range(count):
        name = f"{tag}-{i}"
        body = {"namespace": "bench", "name": name, "labels": ["k8s:app=bench"]}
        status, reply = await request(creator, "POST", "/v1/endpoints", body)
        if status not in (200, 201):
            raise BenchError(f"creating an endpoint failed: {reply}")
        published[f"{reply['ip']}/32"] = float(reply["write_issued_at"])
        names.append(name)
        await asyncio.sleep(0.01)
    written: dict[Path, dict[str, float]] = {}

    async def delivered() -> tuple[int, int]:
        done = 0
        for sock in others:
            if len(written.get(sock, {})) == count:
                done += 1
                continue
            _, rows = await request(sock, "GET", "/v1/ipcache", timeout=10)
            have = {
                r["prefix"]: float(r["written_at"])
                for r in rows
                if r["prefix"] in published and "written_at" in r
            }
            written[sock] = have
            done += len(have) == count
        return done, len(others)

    await _wait("agents' datapaths hold every endpoint", delivered, 120, progress)
    latest: dict[str, float] = {}
    for have in written.values():
        for prefix, at in have.items():
            delay = at - published[prefix]
            results["ours_each"].append(delay)
            latest[prefix] = max(latest.get(prefix, 0.0), delay)
    results["ours_all"].extend(latest.values())
    progress(
        f"round {tag} agents: all {len(others)} datapaths p50 "
        f"{percentile(list(latest.values()), 50) * 1000:.1f} ms"
    )
    for name in names:
        await request(creator, "DELETE", f"/v1/endpoints/bench/{name}")
