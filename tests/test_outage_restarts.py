"""One outage, one restart: agents and real operator processes on a 3-member etcd.

A quorum loss warrants exactly one restart per agent, even though the operator's
heartbeat is late after it (the operator re-elects after the same outage); a killed etcd
leader, which etcd absorbs in about a second, warrants none.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers import eventually, holds_for

from controlplane.agent.agent import Agent
from controlplane.kvstore.embedded import EmbeddedEtcd
from tests.test_agent import agent_settings, api, armed, give_cidrs, kv_config, running
from tests.test_operator import OperatorProcess, operators

BEAT = 2.0
"""The operator's heartbeat interval (the agents' staleness threshold is twice this)."""
OPERATOR_FLAGS = [f"--heartbeat-interval={BEAT}"]  # lease, renew and retry: the defaults
NODES = {"node-a": "127.0.0.11", "node-b": "127.0.0.12"}


def _agents(etcd: EmbeddedEtcd, tmp_path: Path) -> list[Agent]:
    return [
        Agent(
            agent_settings(
                tmp_path,
                node,
                ip,
                heartbeat_interval=BEAT,
                status_check_interval=0.5,
                quorum_check_timeout=1.0,
                restart_spread=0.5,
            ),
            kv_config(etcd),
        )
        for node, ip in NODES.items()
    ]


@contextlib.asynccontextmanager
async def _cluster(etcd: EmbeddedEtcd, tmp_path: Path) -> AsyncIterator[list[Agent]]:
    """Two operators (real processes) and two agents, every agent healthy and armed."""
    await give_cidrs(etcd, *NODES)
    ops = [
        OperatorProcess(tmp_path, name, etcd.client_urls, *OPERATOR_FLAGS)
        for name in ("op-a", "op-b")
    ]
    agents = _agents(etcd, tmp_path)
    async with operators(*ops), contextlib.AsyncExitStack() as stack:
        for op in ops:
            op.start()
        for agent in agents:
            await stack.enter_async_context(running(agent))
        for agent in agents:
            await asyncio.wait_for(agent.wait_ready(), 30)

        def all_armed() -> bool:  # ready, read a quorum, seen a beat written since
            return all(
                armed(agent) and all(s.arm.heartbeat for s in agent.shard_health())
                for agent in agents
            )

        await eventually(all_armed, timeout=30, message="every agent armed for both triggers")
        yield agents
        for op in ops:  # an outage is an expected condition: no daemon logs a traceback
            assert "Traceback" not in op.log(), f"{op.name} logged a traceback:\n{op.log()}"


async def _leader(etcd: EmbeddedEtcd) -> int:
    found: list[int] = []

    async def elected() -> bool:
        index = await etcd.leader_index()
        if index is not None:
            found.append(index)
        return index is not None

    await eventually(elected, timeout=20, message="an etcd leader")
    return found[-1]


def _healthy(agents: list[Agent]) -> bool:
    return all(a.ready and a.status()["kvstore"]["healthy"] for a in agents)


def _no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    logged = [r for r in caplog.records if r.exc_info is not None]
    assert not logged, f"the agents logged tracebacks: {[r.getMessage() for r in logged]}"


async def test_quorum_loss_restarts_each_agent_once(
    etcd3: EmbeddedEtcd, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with _cluster(etcd3, tmp_path) as agents:
        followers = [1, 2]
        for i in followers:
            etcd3.pause_member(i)
        paused_at = time.monotonic()
        try:
            await eventually(
                lambda: all(a.restarts == 1 for a in agents),
                timeout=20,
                message="every agent restarted for the quorum loss",
            )
            await asyncio.sleep(max(0.0, 8.0 - (time.monotonic() - paused_at)))
        finally:
            for i in followers:
                etcd3.resume_member(i)
        await eventually(lambda: _healthy(agents), timeout=60, message="healthy again")
        # Past the operator's re-election and several heartbeat windows: still one each.
        await holds_for(lambda: all(a.restarts == 1 for a in agents), 4 * BEAT + 6.0, "twice")
        assert {a.last_restart_reason for a in agents} == {"no-quorum"}
    _no_tracebacks(caplog)


async def test_killed_etcd_leader_costs_no_restart(
    etcd3: EmbeddedEtcd, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with _cluster(etcd3, tmp_path) as agents:
        leader = await _leader(etcd3)
        await etcd3.kill_member(leader)
        try:
            await _leader(etcd3)
            await holds_for(
                lambda: all(a.restarts == 0 for a in agents), 4 * BEAT + 6.0, "restarted"
            )
            assert _healthy(agents)
        finally:
            await etcd3.start_member(leader)
    _no_tracebacks(caplog)


async def test_a_request_in_flight_when_the_session_restarts_gets_a_clean_503(
    etcd1: EmbeddedEtcd, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await give_cidrs(etcd1, "node-a")
    agent = Agent(agent_settings(tmp_path, "node-a", "127.0.0.11"), kv_config(etcd1))
    async with running(agent):
        await asyncio.wait_for(agent.wait_ready(), 30)
        await eventually(lambda: armed(agent), message="armed")
        etcd1.pause_member(0)
        try:
            body = {"namespace": "default", "name": "web", "labels": ["k8s:app=web"]}
            pending = asyncio.create_task(api(agent, "POST", "/v1/endpoints", body))
            await eventually(lambda: agent.restarts == 1, timeout=20, message="restarted")
            status, answer = await asyncio.wait_for(pending, 20)
            assert status == 503 and "error" in answer, (status, answer)
        finally:
            etcd1.resume_member(0)
        await eventually(lambda: agent.ready, timeout=30, message="ready again")
        status, _ = await api(agent, "POST", "/v1/endpoints", body)
        assert status == 201
    _no_tracebacks(caplog)
