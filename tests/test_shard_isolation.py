"""Shard isolation: a fault on one etcd cluster costs only that cluster's resources.

Two real clusters (``main`` and ``b``), identities, endpoints and IPAM sharded over both,
two real operator processes and four agents. While ``b`` is paused for several heartbeat
intervals, ``main``'s heartbeat never goes stale for any agent, no agent restarts its whole
control plane (only ``b``'s part, at most once), creates whose shards are all on ``main``
succeed and the others get a 503 naming ``b`` at once; after ``b`` is back every agent's
map converges, and no daemon logs a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest
import yaml
from helpers import FAST, eventually

from controlplane.agent.agent import Agent
from controlplane.config import EtcdClusterConfig, KvstoreConfig
from controlplane.kvstore.embedded import EmbeddedEtcd
from controlplane.kvstore.shards import ShardMap
from controlplane.model import Labels
from tests.test_agent import agent_settings, api, running
from tests.test_operator import OperatorProcess, operators

BEAT = 1.0
SHARDED = ("identities", "endpoints", "ipam")


def _config(main: EmbeddedEtcd, b: EmbeddedEtcd) -> KvstoreConfig:
    return KvstoreConfig(
        clusters=(
            EtcdClusterConfig("main", tuple(main.client_urls)),
            EtcdClusterConfig("b", tuple(b.client_urls)),
        ),
        shards={kind: ("main", "b") for kind in SHARDED},
        client=FAST,
    )


def _config_file(tmp_path: Path, main: EmbeddedEtcd, b: EmbeddedEtcd) -> Path:
    path = tmp_path / "kvstore.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "request-timeout": FAST.request_timeout,
                "clusters": [
                    {"name": "main", "endpoints": list(main.client_urls)},
                    {"name": "b", "endpoints": list(b.client_urls)},
                ],
                "shards": {kind: ["main", "b"] for kind in SHARDED},
            }
        )
    )
    return path


def _pick(config: KvstoreConfig) -> tuple[list[str], str, str, list[str], list[str]]:
    """Node names (two on ``main`` for endpoints and IPAM, two with endpoints on ``b``) and
    label sets whose identity lives on ``main`` / on ``b``."""
    shards = ShardMap(config)  # never connected: placement only
    on_main: list[str] = []
    on_b: list[str] = []
    for i in range(200):
        node = f"node-{i}"
        ep, ipam = shards.shard_for("endpoints", node).name, shards.shard_for("ipam", node).name
        if ep == ipam == "main" and len(on_main) < 2:
            on_main.append(node)
        elif ep == "b" and len(on_b) < 2:
            on_b.append(node)
    labels_main: list[str] = []
    labels_b: list[str] = []
    for i in range(200):
        label = f"k8s:app=app{i}"
        shard = shards.shard_for("identities", Labels.from_strings([label]).canonical()).name
        (labels_main if shard == "main" else labels_b).append(label)
    return on_main + on_b, on_main[0], on_b[0], labels_main[:4], labels_b[:4]


async def test_a_paused_shard_costs_only_its_own_resources(
    etcd1: EmbeddedEtcd, second_etcd: EmbeddedEtcd, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _config(etcd1, second_etcd)
    nodes, healthy_node, b_node, labels_main, labels_b = _pick(config)
    config_file = _config_file(tmp_path, etcd1, second_etcd)
    ops = [
        OperatorProcess(
            tmp_path,
            name,
            etcd1.client_urls,
            f"--kvstore-config={config_file}",
            f"--heartbeat-interval={BEAT}",
        )
        for name in ("op-a", "op-b")
    ]
    agents = {
        node: Agent(
            agent_settings(
                tmp_path,
                node,
                f"127.0.0.{11 + i}",
                heartbeat_interval=BEAT,
                status_check_interval=0.5,
                quorum_check_timeout=1.0,
            ),
            config,
        )
        for i, node in enumerate(nodes)
    }
    async with operators(*ops), contextlib.AsyncExitStack() as stack:
        for op in ops:
            op.start()
        for agent in agents.values():
            await stack.enter_async_context(running(agent))
        for agent in agents.values():
            await asyncio.wait_for(agent.wait_ready(), 60)

        def shard(agent: Agent, name: str) -> dict[str, object]:
            found = [s.to_json() for s in agent.shard_health() if s.name == name]
            return found[0] if found else {}

        await eventually(
            lambda: all(
                shard(a, n).get("restart_armed") == {"connection": True, "heartbeat": True}
                for a in agents.values()
                for n in ("main", "b")
            ),
            timeout=30,
            message="every agent sees both heartbeats advancing",
        )
        created: dict[str, tuple[str, int]] = {}  # ip -> (node, identity)

        async def create(node: str, name: str, label: str) -> tuple[int, dict[str, object]]:
            body = {"namespace": "default", "name": name, "labels": [label]}
            status, answer = await api(agents[node], "POST", "/v1/endpoints", body)
            if status == 201:
                created[str(answer["ip"])] = (node, int(answer["identity"]))
            return status, answer

        for i, node in enumerate(nodes):  # before the fault: one endpoint per node
            status, _ = await create(node, f"before-{i}", labels_main[0])
            assert status == 201

        second_etcd.pause_member(0)
        main_stale: list[str] = []
        try:
            await eventually(
                lambda: all(shard(a, "b").get("reachable") is False for a in agents.values()),
                timeout=10,
                message="every agent sees b fail",
            )
            paused_at = time.monotonic()
            while time.monotonic() - paused_at < 6 * BEAT:  # several heartbeat windows
                for node, agent in agents.items():
                    if shard(agent, "main").get("heartbeat_stale"):
                        main_stale.append(node)
                # A create that needs only main succeeds...
                status, answer = await create(
                    healthy_node, f"during-{len(created)}", labels_main[1]
                )
                assert status == 201, answer
                # ...one that needs b is refused at once, naming b.
                asked = time.monotonic()
                status, answer = await create(b_node, f"refused-{len(created)}", labels_main[1])
                assert status == 503 and "shard b" in str(answer["error"]), answer
                # at once: well within a request timeout (5 s), whatever the load
                assert time.monotonic() - asked < 2.0
                status, answer = await create(healthy_node, "on-b-identity", labels_b[0])
                assert status == 503 and "shard b" in str(answer["error"]), answer
                # A delete that needs b is refused at once too.
                asked = time.monotonic()
                status, answer = await api(
                    agents[b_node], "DELETE", "/v1/endpoints/default/before-2"
                )
                assert status == 503 and "shard b" in str(answer["error"]), answer
                assert time.monotonic() - asked < 2.0
                await asyncio.sleep(0.5)
        finally:
            second_etcd.resume_member(0)
        assert main_stale == [], f"main's heartbeat looked stale to {sorted(set(main_stale))}"

        def converged() -> bool:
            for agent in agents.values():
                for ip, (_node, identity) in created.items():
                    found = agent.cache.endpoints.get(ip)
                    if found is None or found.identity != identity:
                        return False
            return all(a.status()["kvstore"]["healthy"] for a in agents.values())

        await eventually(converged, timeout=60, message="every map converged after b is back")
        for node, agent in agents.items():
            assert agent.restarts == 0, f"{node} restarted its whole control plane"
            assert shard(agent, "main")["recoveries"] == 0, node
            assert int(str(shard(agent, "b")["recoveries"])) <= 1, node
        status, _ = await create(b_node, "after", labels_b[1])
        assert status == 201
    for op in ops:
        assert "Traceback" not in op.log(), f"{op.name} logged a traceback:\n{op.log()}"
    logged = [r.getMessage() for r in caplog.records if r.exc_info is not None]
    assert logged == [], f"the agents logged tracebacks: {logged}"
