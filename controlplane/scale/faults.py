"""The fault injectors. Each applies its fault, keeps it for the scenario's duration (or
until every agent reacted), heals it, and returns notes for the report. Healing is in a
``finally``: a harness error never leaves a member or an operator paused."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from controlplane import codec
from controlplane.agent.api import request
from controlplane.config import EtcdClusterConfig
from controlplane.kvstore.backend import EtcdBackend
from controlplane.kvstore.embedded import EmbeddedEtcd
from controlplane.kvstore.keys import KeyLayout
from controlplane.kvstore.shards import ShardMap
from controlplane.model import Labels
from controlplane.scale import crd_store, etcd_metrics
from controlplane.scale.cluster import CLIENT, Cluster
from controlplane.scale.fleet import Fleet, FleetError, wait_for
from controlplane.scale.proxy import Mode
from controlplane.scale.scenario import FaultSpec

LAYOUT = KeyLayout()
Notes = dict[str, Any]
AFFECTED = "_affected_agents"
"""A note (not reported) naming the agents a fault targeted: the others must not restart."""


@dataclass
class Context:
    cluster: Cluster
    fleet: Fleet
    progress: Callable[[str], None]
    socket_dir: str


async def _leader(etcd: EmbeddedEtcd, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        index = await etcd.leader_index()
        if index is not None:
            return index
        if time.monotonic() > deadline:
            raise FleetError(f"etcd {etcd.members[0].name}: no leader within {timeout:.0f}s")
        await asyncio.sleep(0.1)


async def _keep(
    ctx: Context,
    fault: FaultSpec,
    t0: float,
    until_restarted: bool,
    nodes: set[str] | None = None,
) -> None:
    """Keep the fault for its duration; with ``until_restarted``, also until every agent
    (of ``nodes``, if given) restarted since ``t0`` (bounded: duration + 30 s), so the fault
    is long enough to count."""
    deadline = t0 + fault.duration + (30.0 if until_restarted else 0.0)
    total = len(ctx.fleet.agents) if nodes is None else len(nodes)
    while True:
        now = time.monotonic()
        done = ctx.fleet.count(
            lambda v: (nodes is None or v.node in nodes) and any(r.at >= t0 for r in v.restarts)
        )
        ctx.progress(f"fault held {now - t0:4.1f}s, agents restarted {done}/{total}")
        if now >= t0 + fault.duration and (not until_restarted or done >= total):
            return
        if now >= deadline:
            return
        await asyncio.sleep(0.1)


async def etcd_member_kill(ctx: Context, fault: FaultSpec, t0: float) -> Notes:
    etcd = next(iter(ctx.cluster.etcds.values()))
    await etcd.kill_member(fault.member)
    try:
        await _keep(ctx, fault, t0, False)
    finally:
        await etcd.start_member(fault.member)
    return {"member": fault.member}


async def etcd_leader_kill(ctx: Context, fault: FaultSpec, t0: float) -> Notes:
    etcd = next(iter(ctx.cluster.etcds.values()))
    leader = await _leader(etcd)
    await etcd.kill_member(leader)
    try:
        elected = time.monotonic()
        new = await _leader(etcd)
        elected = time.monotonic() - elected
        await _keep(ctx, fault, t0, False)
    finally:
        await etcd.start_member(leader)
    return {"killed_member": leader, "new_leader": new, "election_s": round(elected, 2)}


async def quorum_loss(ctx: Context, fault: FaultSpec, t0: float) -> Notes:
    etcd = next(iter(ctx.cluster.etcds.values()))
    leader = await _leader(etcd)
    paused = [i for i in range(len(etcd.members)) if i != leader][:2]
    for i in paused:
        etcd.pause_member(i)
    try:
        await _keep(ctx, fault, t0, fault.expect_restarts != 0)
    finally:
        for i in paused:
            etcd.resume_member(i)
    return {"paused_members": paused}


async def operators_paused(ctx: Context, fault: FaultSpec, t0: float) -> Notes:
    for daemon in ctx.cluster.operators:
        daemon.signal(signal.SIGSTOP)
    try:
        await _keep(ctx, fault, t0, fault.expect_restarts != 0)
    finally:
        for daemon in ctx.cluster.operators:
            daemon.signal(signal.SIGCONT)
    return {"paused": [d.name for d in ctx.cluster.operators]}


async def operator_leader_kill(ctx: Context, fault: FaultSpec, t0: float) -> Notes:
    leader = await ctx.cluster.operator_leader()
    if leader is None:
        raise FleetError("no operator leader to kill")
    daemon = ctx.cluster.operator(leader)
    await daemon.kill()
    took = 0.0
    try:
        start = time.monotonic()
        deadline = start + 30
        while (new := await ctx.cluster.operator_leader()) in (None, leader):
            ctx.progress(f"operator {leader} killed, waiting for a new leader")
            if time.monotonic() > deadline:
                raise FleetError("no new operator leader within 30s")
            await asyncio.sleep(0.1)
        took = time.monotonic() - start
        await _keep(ctx, fault, t0, False)
    finally:
        await daemon.start()
    return {"killed": leader, "new_leader": new, "failover_s": round(took, 2)}


async def worker_kill(ctx: Context, fault: FaultSpec, t0: float) -> Notes:
    worker = ctx.fleet.workers[fault.member]
    agents = len(worker.spec["nodes"])
    await ctx.fleet.kill(worker)
    try:
        await _keep(ctx, fault, t0, False)
    finally:
        await ctx.fleet.start(worker)
    ready = await wait_for(
        lambda: (int(worker.ready.is_set()), 1),
        f"worker {worker.index} back ({agents} agents)",
        # its agents boot and list the whole store again: at 10,000 endpoints on a loaded
        # machine that took longer than 120 s (standard)
        max(120.0, ctx.cluster.scenario.agents.ready_timeout),
        ctx.progress,
    )
    return {"worker": worker.index, "agents": agents, "back_after_s": round(ready, 2)}


def _malformed_keys() -> list[tuple[str, bytes]]:
    """(kind, key) under every watched prefix; the values are not envelopes."""
    return [
        ("endpoints", LAYOUT.ip("default", "10.255.255.254")),
        ("nodes", LAYOUT.node("default", "zz-malformed")),
        ("identities", LAYOUT.identity_id(65001)),
        ("identities", LAYOUT.identity_labels("k8s:app=zz-malformed")),
        ("identities", LAYOUT.identity_value("k8s:app=zz-malformed", "zz-malformed")),
        ("ipam", LAYOUT.ipam_cidr("default", "10.255.0.0/24")),
        ("ipam", LAYOUT.ipam_lease("zz-malformed", "10.255.0.9")),
        ("policies", LAYOUT.policy("scale", "zz-malformed")),
    ]


async def _keep_until_counted(
    ctx: Context, fault: FaultSpec, t0: float, before: dict[str, float], what: str
) -> int:
    """Keep a malformed-input fault for its duration, then until every agent's malformed
    counter moved past ``before`` (bounded); how many agents counted one."""

    def counted() -> int:
        return ctx.fleet.count(lambda v: float(v.state.get("malformed", 0)) > before[v.node])

    await _keep(ctx, fault, t0, False)
    with contextlib.suppress(FleetError):  # the report says how many did
        await wait_for(
            lambda: (counted(), len(before)),
            f"agents that counted a malformed {what}",
            30,
            ctx.progress,
        )
    return counted()


async def malformed_values(ctx: Context, fault: FaultSpec, t0: float) -> Notes:
    bad = [b"\xc1not msgpack", codec.encode("endpoint", {"ip": 7}), b"\x93\x01\x02\x03"]
    before = {n: float(v.state.get("malformed", 0)) for n, v in ctx.fleet.agents.items()}
    written: list[tuple[EtcdBackend, bytes]] = []
    async with ShardMap(ctx.cluster.config, own_connection=True) as shards:
        for i, (kind, key) in enumerate(_malformed_keys()):
            targets = shards.all() if kind in ("nodes", "policies") else shards.shards(kind)
            for backend in targets:
                await backend.put(key, bad[i % len(bad)])
                written.append((backend, key))

        try:
            counted = await _keep_until_counted(ctx, fault, t0, before, "value")
        finally:
            for backend, key in written:
                await backend.delete(key)
    return {"keys": len(written), "agents_that_counted": counted, "agents": len(before)}


async def _healthy_shard_creates(ctx: Context, paused: str, stop: asyncio.Event) -> dict[str, int]:
    """Creates through the local API of an agent whose endpoints and IPAM live on another
    shard, for a label set whose identity does too: each must succeed while ``paused`` is."""
    placement = ShardMap(ctx.cluster.config)  # never connected: placement only
    node = next(
        (
            n
            for n in ctx.fleet.agents
            if placement.shard_for("endpoints", n).name != paused
            and placement.shard_for("ipam", n).name != paused
        ),
        None,
    )
    label = next(
        f"k8s:app=healthy{i}"
        for i in range(1000)
        if placement.shard_for(
            "identities", Labels.from_strings([f"k8s:app=healthy{i}"]).canonical()
        ).name
        != paused
    )
    results = {"ok": 0, "failed": 0}
    if node is None:
        return results
    sock = f"{ctx.socket_dir}/{node}.sock"
    serial = 0
    while not stop.is_set():
        serial += 1
        body = {"namespace": "scale", "name": f"{node}-h{serial}", "labels": [label]}
        try:
            status, _ = await request(sock, "POST", "/v1/endpoints", body, timeout=5)
        except (OSError, TimeoutError):
            status = 0
        results["ok" if status in (200, 201) else "failed"] += 1
        await asyncio.sleep(0.5)
    return results


async def shard_paused(ctx: Context, fault: FaultSpec, t0: float) -> Notes:
    etcd = ctx.cluster.etcds[fault.cluster]
    stop = asyncio.Event()
    for i in range(len(etcd.members)):
        etcd.pause_member(i)
    creates = asyncio.create_task(_healthy_shard_creates(ctx, fault.cluster, stop))
    try:
        await _keep(ctx, fault, t0, False)
    finally:
        stop.set()
        for i in range(len(etcd.members)):
            etcd.resume_member(i)
    results = await creates
    return {"paused_cluster": fault.cluster, "healthy_shard_creates": results}


def _groups(ctx: Context, fault: FaultSpec) -> range:
    """The proxy groups a fault affects: ``fraction`` of them, at least one."""
    total = len(ctx.cluster.proxies)
    return range(max(1, round(fault.fraction * total)))


async def agent_partition(ctx: Context, fault: FaultSpec, t0: float) -> Notes:
    """Cut a fraction of the agents (their proxy groups) from every etcd member: their
    connections hang (blackhole) or are reset; etcd, the operators and the other agents
    carry on. Each cut agent's quorum reads fail, so it restarts once (the restart
    disarms it until a ready session reads a quorum again); the others must not."""
    groups = _groups(ctx, fault)
    proxies = ctx.cluster.group_proxies(groups)
    cut = {n for n, v in ctx.fleet.agents.items() if v.group in groups}
    mode = Mode(fault.mode)
    reset_before = sum(p.stats.reset for p in proxies)
    for proxy in proxies:
        await proxy.set_mode(mode)
    try:
        await _keep(ctx, fault, t0, fault.expect_restarts != 0, cut)
    finally:
        for proxy in proxies:
            await proxy.set_mode(Mode.PASS)
    return {
        "mode": fault.mode,
        "groups_cut": len(groups),
        "groups": len(ctx.cluster.proxies),
        "agents_cut": len(cut),
        "connections_reset": sum(p.stats.reset for p in proxies) - reset_before,
        AFFECTED: sorted(cut),
    }


async def etcd_latency(ctx: Context, fault: FaultSpec, t0: float) -> Notes:
    """``latency_ms`` added to each direction between a fraction of the agents and etcd."""
    groups = _groups(ctx, fault)
    proxies = ctx.cluster.group_proxies(groups)
    delay = fault.latency_ms / 1000
    for proxy in proxies:
        proxy.set_latency(delay, delay)
    try:
        await _keep(ctx, fault, t0, False)
    finally:
        for proxy in proxies:
            proxy.set_latency(0.0, 0.0)
    affected = ctx.fleet.count(lambda v: v.group in groups)
    return {"latency_ms_each_way": fault.latency_ms, "agents": affected}


async def compact_defrag(ctx: Context, fault: FaultSpec, t0: float) -> Notes:
    """Compact every etcd cluster to its current revision and defragment each member while
    the churn runs; then (with proxies) reset every agent connection once, so that every
    watch resumes from its last revision and those the compaction passed must re-list."""
    urls = [u for etcd in ctx.cluster.etcds.values() for u in etcd.client_urls]
    before = await etcd_metrics.db_sizes(urls)
    compactions_before = ctx.fleet.compactions()
    revisions = {}
    for cluster in ctx.cluster.config.clusters:
        async with EtcdBackend(cluster, CLIENT, own_connection=True) as backend:
            revisions[cluster.name] = revision = await backend.current_revision()
            await backend.compact(revision, physical=True)
        for url in cluster.endpoints:
            member = EtcdClusterConfig(cluster.name, (url,))
            async with EtcdBackend(member, CLIENT, own_connection=True) as backend:
                await backend.defragment()
    after = await etcd_metrics.db_sizes(urls)
    proxies = ctx.cluster.group_proxies(range(len(ctx.cluster.proxies)))
    reset_before = sum(p.stats.reset for p in proxies)
    for proxy in proxies:
        await proxy.sever()
    await _keep(ctx, fault, t0, False)
    relisted = ctx.fleet.compactions() - compactions_before
    return {
        "compacted_to": revisions,
        "db_bytes_before": sum(s[etcd_metrics.DB_SIZE] for s in before.values()),
        "db_bytes_after": sum(s[etcd_metrics.DB_SIZE] for s in after.values()),
        "severed_connections": sum(p.stats.reset for p in proxies) - reset_before,
        "watches_relisted": relisted,
    }


async def apiserver_restart(ctx: Context, fault: FaultSpec, t0: float) -> Notes:
    """CRD mode: SIGKILL the API server, start it again after ``duration``. The agents
    must not restart and must keep their maps (sampled: no ipcache below half its size
    before), then converge."""
    server = ctx.cluster.apiserver
    if server is None:
        raise FleetError("no API server (not a CRD-mode scenario)")
    before = {n: int(v.state.get("ipcache", 0)) for n, v in ctx.fleet.agents.items()}
    lowest = dict(before)
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            for n, v in ctx.fleet.agents.items():
                if v.state:
                    lowest[n] = min(lowest[n], int(v.state.get("ipcache", lowest[n])))
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample())
    await server.kill()
    try:
        await _keep(ctx, fault, t0, False)
    finally:
        back = await ctx.cluster.start_apiserver()
        done.set()
        await sampler
    shrunk = sorted(f"{n}: {lowest[n]} of {before[n]}" for n in before if lowest[n] < before[n] / 2)
    return {
        "serving_again_after_s": round(back, 2),
        "ipcache_lowest_share": round(
            min((lowest[n] / before[n] for n in before if before[n]), default=1.0), 3
        ),
        "maps_shrunk": shrunk,
    }


async def malformed_objects(ctx: Context, fault: FaultSpec, t0: float) -> Notes:
    """CRD mode: objects the schema admits but no reader can use (an endpoint without a
    valid IP, an identity named by no number, a node with a garbage address, a PodCIDR
    that is no network), deleted after ``duration``."""
    kubeconfig = ctx.cluster.kubeconfig
    before = {n: float(v.state.get("malformed", 0)) for n, v in ctx.fleet.agents.items()}
    written = await crd_store.write_malformed(kubeconfig)

    try:
        counted = await _keep_until_counted(ctx, fault, t0, before, "object")
    finally:
        await crd_store.delete_malformed(kubeconfig)
    return {"objects": written, "agents_that_counted": counted, "agents": len(before)}


INJECTORS: dict[str, Callable[[Context, FaultSpec, float], Awaitable[Notes]]] = {
    "etcd-member-kill": etcd_member_kill,
    "etcd-leader-kill": etcd_leader_kill,
    "quorum-loss": quorum_loss,
    "operators-paused": operators_paused,
    "operator-leader-kill": operator_leader_kill,
    "worker-kill": worker_kill,
    "malformed-values": malformed_values,
    "shard-paused": shard_paused,
    "agent-partition": agent_partition,
    "etcd-latency": etcd_latency,
    "compact-defrag": compact_defrag,
    "apiserver-restart": apiserver_restart,
    "malformed-objects": malformed_objects,
}
